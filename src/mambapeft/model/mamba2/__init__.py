"""Mamba-2 language models (Hugging Face `Mamba2ForCausalLM` and mamba_ssm's Mamba2 checkpoints).

    modeling.py       the SSD mixer (every applicable PEFT hook stage) and the language model on Mamba-1's
    loading.py        reading Hugging Face and mamba_ssm configs
    architectures.py  the published sizes by name
"""

from __future__ import annotations

from pathlib import Path

from transformers import Mamba2Config

from ...assets import BUILTIN_MAMBA2
from ..language import HFLanguageFamily
from ..mamba import normalise_keys
from ..registry import register_family
from ..summary import language_summary, language_summary_lines
from .architectures import HUB_IDS, MAMBA2_ARCHITECTURES, mamba2_config
from .loading import is_mamba2_config, read_mamba2_config
from .modeling import GatedRMSNorm, Mamba2LM, Mamba2Mixer, Mamba2MixerState


@register_family
class Mamba2Family(HFLanguageFamily):
    name = "mamba2"
    title = "Mamba-2"
    model_class = Mamba2LM
    config_class = Mamba2Config
    architectures = MAMBA2_ARCHITECTURES
    hub_ids = HUB_IDS
    builtins = {"tiny-mamba2": BUILTIN_MAMBA2, "builtin-mamba2": BUILTIN_MAMBA2}
    check_architecture = "mamba2-tiny"
    transformers_class = "Mamba2ForCausalLM"

    def config(self, name: str, **overrides):
        return mamba2_config(name, **overrides)

    def read_config(self, folder: Path):
        return read_mamba2_config(folder)

    def claims_config(self, raw: dict) -> bool:
        return is_mamba2_config(raw)

    def normalise_keys(self, state: dict) -> dict:
        return normalise_keys(state)

    def summary(self, model) -> dict:
        m = model.backbone.layers[0].mixer
        sizes = {"d_inner": m.d_inner, "d_state": m.d_state, "dt_rank": None, "d_conv": m.d_conv,
                 "num_heads": m.num_heads, "head_dim": m.head_dim, "n_groups": m.n_groups}
        parts = ("in_proj", "conv1d", "dt_bias", "A_log", "D", "norm", "out_proj")
        return language_summary(model, parts, sizes, renamed={"norm": "gated_norm"})

    def summary_lines(self, summary: dict) -> list[str]:
        return language_summary_lines(
            summary, f"d_inner (E) {summary['d_inner']}   heads (H) {summary['num_heads']} x head_dim (P) "
                     f"{summary['head_dim']}   groups (G) {summary['n_groups']}   d_state (N) {summary['d_state']}   "
                     f"d_conv (K) {summary['d_conv']}")


__all__ = ["HUB_IDS", "MAMBA2_ARCHITECTURES", "mamba2_config", "GatedRMSNorm", "Mamba2LM", "Mamba2Mixer",
           "Mamba2MixerState", "Mamba2Family"]
