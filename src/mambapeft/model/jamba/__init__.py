"""AI21 Jamba (`jamba`): Mamba-1 mixers (with RMS norms on dt, B and C) and attention layers, dense MLPs and
mixtures of experts (modeling.py), its checkpoints (loading.py) and named sizes."""

from __future__ import annotations

from pathlib import Path

from transformers import JambaConfig

from ...assets import BUILTIN_JAMBA
from ...errors import ConfigError, did_you_mean
from ..granitemoehybrid import HybridFamily
from ..registry import register_family
from .loading import (
    MODEL_TYPE,
    build_jamba,
    from_published,
    load_jamba,
    read_jamba_config,
    save_jamba,
)
from .modeling import JambaLM

JAMBA_ARCHITECTURES = {
    # transformers' JambaConfig defaults, which its docstring gives as ai21labs/Jamba-v0.1's (52B total, 12B
    # active): 32 layers, attention at i % 8 == 4, 16 experts (top 2) at every odd layer; not checked against the
    # hub file here (no network)
    "jamba-v0.1": dict(
        vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_experts=16, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=8, attn_layer_offset=4, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
        mamba_dt_rank=256, rms_norm_eps=1e-6, tie_word_embeddings=False),
    # every part at small sizes: a Mamba layer with a dense MLP, an attention layer with experts (3, top 2), GQA 4
    # over 2, dt rank 3: what checks build (`mambapeft methods`, the conformance battery). Widths whose float32 rows
    # are multiples of 16 bytes, so transformers' default grouped-matmul experts load the merged folders as they are
    "jamba-micro": dict(
        vocab_size=41, hidden_size=20, intermediate_size=12, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=3, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=2, attn_layer_offset=1, mamba_d_state=6, mamba_d_conv=3, mamba_expand=2, mamba_dt_rank=3,
        bos_token_id=None, eos_token_id=None, pad_token_id=None),
}


def jamba_config(name: str, **overrides) -> JambaConfig:
    key = name.lower()
    if key not in JAMBA_ARCHITECTURES:
        raise ConfigError(f"unknown Jamba architecture {name!r}{did_you_mean(key, JAMBA_ARCHITECTURES)}; "
                          f"known: {', '.join(JAMBA_ARCHITECTURES)}")
    return JambaConfig(**{**JAMBA_ARCHITECTURES[key], **overrides})


@register_family
class JambaFamily(HybridFamily):
    name = "jamba"
    title = "Jamba"
    model_class = JambaLM
    config_class = JambaConfig
    architectures = JAMBA_ARCHITECTURES
    builtins = {"tiny-jamba": BUILTIN_JAMBA}       # scripts/pretrain_tiny_jamba.py
    check_architecture = "jamba-micro"

    def config(self, name: str, **overrides):
        return jamba_config(name, **overrides)

    def read_config(self, folder: Path):
        return read_jamba_config(folder), "hf"

    def claims_config(self, raw: dict) -> bool:
        return raw.get("model_type") == MODEL_TYPE

    def normalise_keys(self, state: dict) -> dict:
        return from_published(state)

    def save(self, model, folder) -> None:
        save_jamba(model, folder)


__all__ = ["JambaLM", "build_jamba", "load_jamba", "read_jamba_config", "save_jamba", "jamba_config", "JambaFamily",
           "JAMBA_ARCHITECTURES"]
