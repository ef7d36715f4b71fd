"""TII Falcon-H1 (`falcon_h1`): attention and a Mamba-2 mixer side by side in every layer, µP multipliers on every
stream (modeling.py), its checkpoints (loading.py) and named sizes."""

from __future__ import annotations

from pathlib import Path

from transformers import FalconH1Config

from ...assets import BUILTIN_FALCON_H1
from ...errors import ConfigError, did_you_mean
from ..granitemoehybrid import HybridFamily
from ..registry import register_family
from .loading import MODEL_TYPE, build_falcon_h1, load_falcon_h1, read_falcon_h1_config
from .modeling import FalconH1LM

FALCON_H1_ARCHITECTURES = {
    # tiiuae/Falcon-H1-0.5B's sizes and µP multipliers as third-party ports of its config.json list them (mlx-lm,
    # Megatron-Bridge); not checked against the hub file here (no network)
    "falcon-h1-0.5b": dict(
        vocab_size=32784, hidden_size=1024, num_hidden_layers=36, intermediate_size=2048, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, mamba_d_ssm=1536, mamba_n_heads=24, mamba_d_head=64, mamba_d_state=128,
        mamba_n_groups=1, mamba_d_conv=4, mamba_chunk_size=128, mamba_conv_bias=True, mamba_proj_bias=False,
        mamba_rms_norm=False, mamba_norm_before_gate=False, projectors_bias=False, tie_word_embeddings=False,
        max_position_embeddings=131072, rope_parameters={"rope_type": "default", "rope_theta": 1e11},
        embedding_multiplier=5.656854249492381, lm_head_multiplier=0.0390625, key_multiplier=0.390625,
        attention_in_multiplier=1.0, attention_out_multiplier=0.9375, ssm_in_multiplier=1.25,
        ssm_out_multiplier=0.23570226039551587, mlp_multipliers=[0.8838834764831844, 0.5859375],
        ssm_multipliers=[0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738]),
    # every part at odd small sizes, every multiplier far from 1 and each in_proj block its own µP factor, the
    # grouped gated norm on, GQA 4 over 2: what checks build (`mambapeft methods`, the conformance battery)
    "falcon-h1-micro": dict(
        vocab_size=37, hidden_size=16, num_hidden_layers=2, intermediate_size=10, num_attention_heads=4,
        num_key_value_heads=2, mamba_d_ssm=20, mamba_n_heads=4, mamba_d_head=5, mamba_d_state=6, mamba_n_groups=2,
        mamba_d_conv=3, mamba_chunk_size=8, mamba_rms_norm=True, mamba_norm_before_gate=False,
        embedding_multiplier=2.5, lm_head_multiplier=0.3, key_multiplier=0.6, attention_in_multiplier=1.7,
        attention_out_multiplier=0.4, ssm_in_multiplier=1.5, ssm_out_multiplier=0.35, mlp_multipliers=[0.7, 1.8],
        ssm_multipliers=[0.3, 2.5, 0.6, 1.9, 0.45], bos_token_id=None, eos_token_id=None, pad_token_id=None),
}


def falcon_h1_config(name: str, **overrides) -> FalconH1Config:
    key = name.lower()
    if key not in FALCON_H1_ARCHITECTURES:
        raise ConfigError(f"unknown Falcon-H1 architecture {name!r}{did_you_mean(key, FALCON_H1_ARCHITECTURES)}; "
                          f"known: {', '.join(FALCON_H1_ARCHITECTURES)}")
    return FalconH1Config(**{**FALCON_H1_ARCHITECTURES[key], **overrides})


@register_family
class FalconH1Family(HybridFamily):
    name = "falcon_h1"
    title = "Falcon-H1"
    model_class = FalconH1LM
    config_class = FalconH1Config
    architectures = FALCON_H1_ARCHITECTURES
    builtins = {"tiny-falcon-h1": BUILTIN_FALCON_H1}       # scripts/pretrain_tiny_falcon_h1.py
    check_architecture = "falcon-h1-micro"

    def config(self, name: str, **overrides):
        return falcon_h1_config(name, **overrides)

    def read_config(self, folder: Path):
        return read_falcon_h1_config(folder), "hf"

    def claims_config(self, raw: dict) -> bool:
        return raw.get("model_type") == MODEL_TYPE


__all__ = ["FalconH1LM", "build_falcon_h1", "load_falcon_h1", "read_falcon_h1_config", "falcon_h1_config",
           "FalconH1Family", "FALCON_H1_ARCHITECTURES"]
