"""IBM Granite 4.0-H (`granitemoehybrid`): Mamba-2 and attention layers with MLPs and experts (modeling.py), its
checkpoints (loading.py) and named sizes (architectures.py). The hybrid glue in modeling.py (our Mamba-2 mixer beside
transformers' attention, MLP and MoE modules, one state for both) serves Nemotron-H and Bamba too."""

from __future__ import annotations

from pathlib import Path

from transformers import GraniteMoeHybridConfig

from ...assets import BUILTIN_ATTENTION, BUILTIN_GRANITE_H
from ..language import HFLanguageFamily
from ..registry import register_family
from .architectures import GRANITE_HYBRID_ARCHITECTURES, granite_hybrid_config
from .loading import (
    PUBLISHED_NAMES,
    build_granite_hybrid,
    is_granite_hybrid_config,
    load_granite_hybrid,
    read_granite_hybrid_config,
    renamed,
    save_granite_hybrid,
)
from .modeling import AttentionState, GraniteHybridLM, hybrid_summary


class HybridFamily(HFLanguageFamily):
    """What the hybrid families share: summaries by layer type, and the default method: a run without --method
    trains every layer type (`placement/both`: LoRA on the SSM mixers, the attention projections and the MLPs), not
    the pure-SSM default, which would leave the attention layers (and Nemotron-H's MLP layers) frozen, nor peft's
    attention-only default (4 of 56 layers of Nemotron Nano 9B v2)."""

    embedding_key = "model.embed_tokens.weight"
    default_method = ("placement/both",)

    def summary(self, model) -> dict:
        return hybrid_summary(model)

    def summary_lines(self, summary: dict) -> list[str]:
        kinds = "   ".join(f"{k} {v}" for k, v in summary["layers"].items())
        return [f"  model_type   {summary['model_type']}",
                f"  d_model {summary['d_model']}   n_layer {summary['n_layer']}   vocab {summary['vocab_size']}",
                f"  layers: {kinds}",
                f"parameters     {summary['parameters']['total']:,}",
                *(f"  {k:<12} {v:,}" for k, v in summary["parameters"].items() if k != "total")]


@register_family
class GraniteHybridFamily(HybridFamily):
    name = "granitemoehybrid"
    title = "Granite 4.0-H"
    model_class = GraniteHybridLM
    config_class = GraniteMoeHybridConfig
    architectures = GRANITE_HYBRID_ARCHITECTURES
    # scripts/pretrain_tiny_granite_h.py; tiny-attention (every layer attention) scripts/pretrain_tiny_attention.py
    builtins = {"tiny-granite-h": BUILTIN_GRANITE_H, "tiny-attention": BUILTIN_ATTENTION}
    check_architecture = "granite-hybrid-micro"
    transformers_class = "GraniteMoeHybridForCausalLM"

    def config(self, name: str, **overrides):
        return granite_hybrid_config(name, **overrides)

    def read_config(self, folder: Path):
        return read_granite_hybrid_config(folder), "hf"

    def claims_config(self, raw: dict) -> bool:
        return is_granite_hybrid_config(raw)

    def normalise_keys(self, state: dict) -> dict:
        return renamed(state, PUBLISHED_NAMES)

    def save(self, model, folder) -> None:
        save_granite_hybrid(model, folder)


__all__ = ["GRANITE_HYBRID_ARCHITECTURES", "granite_hybrid_config", "AttentionState", "GraniteHybridLM",
           "build_granite_hybrid", "load_granite_hybrid", "read_granite_hybrid_config", "save_granite_hybrid",
           "GraniteHybridFamily", "HybridFamily"]
