"""Qwen3.5's text model (`qwen3_5`): Gated DeltaNet and gated attention layers, three to one, each followed by a
dense MLP (modeling.py, on Qwen3-Next's glue), its checkpoints (loading.py) and named sizes."""

from __future__ import annotations

from pathlib import Path

from transformers import Qwen3_5TextConfig

from ...assets import BUILTIN_QWEN3_5
from ..granitemoehybrid import HybridFamily
from ..registry import register_family
from .loading import is_qwen3_5_config, load_qwen3_5, read_qwen3_5_config, text_model_keys
from .modeling import Qwen3_5LM


def _every_4th_full(n: int) -> list[str]:
    return ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]


QWEN3_5_ARCHITECTURES = {
    # Qwen/Qwen3.5-0.8B's text_config as published (24 layers, [3 linear, 1 full] x 6, 16 + 16 linear heads of
    # 128 x 128, 8 attention heads / 2 KV of 256, a quarter of each rotated, tied head); the vision tower is not
    # part of the text model
    "qwen3.5-0.8b": dict(
        vocab_size=248320, hidden_size=1024, num_hidden_layers=24, layer_types=_every_4th_full(24),
        intermediate_size=3584, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_section": [11, 11, 10], "mrope_interleaved": True},
        eos_token_id=248044),
    # every part at odd small sizes (value heads sharing key heads, GQA, partial RoPE, odd widths): what checks
    # build (`mambapeft methods`, the conformance battery)
    "qwen3.5-micro": dict(
        vocab_size=37, hidden_size=16, num_hidden_layers=3,
        layer_types=["linear_attention", "linear_attention", "full_attention"], intermediate_size=11,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, linear_num_key_heads=1, linear_num_value_heads=3,
        linear_key_head_dim=4, linear_value_head_dim=5, linear_conv_kernel_dim=4, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
}


@register_family
class Qwen3_5Family(HybridFamily):
    name = "qwen3_5"
    title = "Qwen3.5"
    model_class = Qwen3_5LM
    config_class = Qwen3_5TextConfig
    architectures = QWEN3_5_ARCHITECTURES
    builtins = {"tiny-qwen3.5": BUILTIN_QWEN3_5}             # scripts/pretrain_tiny_qwen3_5.py
    check_architecture = "qwen3.5-micro"

    def config(self, name: str, **overrides):
        return Qwen3_5TextConfig(**{**self.architectures[name.lower()], **overrides})

    def read_config(self, folder: Path):
        return read_qwen3_5_config(folder), "hf"

    def claims_config(self, raw: dict) -> bool:
        return is_qwen3_5_config(raw)

    def normalise_keys(self, state: dict) -> dict:
        return text_model_keys(state)


__all__ = ["Qwen3_5LM", "load_qwen3_5", "read_qwen3_5_config", "Qwen3_5Family", "QWEN3_5_ARCHITECTURES"]
