"""Qwen3-Next (`qwen3_next`): Gated DeltaNet and gated attention layers with a mixture of experts and a shared expert
(modeling.py, whose glue Qwen3.5 shares), its checkpoints (loading.py) and named sizes."""

from __future__ import annotations

from pathlib import Path

from transformers import Qwen3NextConfig

from ..granitemoehybrid import HybridFamily
from ..registry import register_family
from .loading import MODEL_TYPE, from_published, load_qwen3_next, read_qwen3_next_config, save_qwen3_next
from .modeling import Qwen3NextLM, QwenHybridLayer, QwenHybridModel


def _every_4th_full(n: int) -> list[str]:
    return ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]


QWEN3_NEXT_ARCHITECTURES = {
    # Qwen/Qwen3-Next-80B-A3B-Instruct's config.json as published (48 layers, attention every 4th, 512 experts of
    # which 10 + the shared one per token); not checked against the hub file here (no network), so the tests check
    # counts on the micro size by hand arithmetic
    "qwen3-next-80b-a3b": dict(
        vocab_size=151936, hidden_size=2048, num_hidden_layers=48, layer_types=_every_4th_full(48),
        num_attention_heads=16, num_key_value_heads=2, head_dim=256, intermediate_size=5120,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, decoder_sparse_step=1, norm_topk_prob=True, rms_norm_eps=1e-6,
        tie_word_embeddings=False, max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
        bos_token_id=151643, eos_token_id=151645),
    # every part at small sizes (linear attention with 2 key heads shared by 6 value heads, gated attention with
    # GQA and a quarter of each head rotated, experts with a shared expert on two layers and a dense MLP on one):
    # what checks build (`mambapeft methods`, the conformance battery). The experts' widths are multiples of 4
    # floats: transformers' grouped matmul (what the battery's merged checkpoint runs in) needs 16-byte strides
    "qwen3-next-micro": dict(
        vocab_size=41, hidden_size=20, num_hidden_layers=3,
        layer_types=["linear_attention", "full_attention", "linear_attention"], num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=9, linear_num_key_heads=2, linear_num_value_heads=6,
        linear_key_head_dim=4, linear_value_head_dim=3, linear_conv_kernel_dim=3, num_experts=3,
        num_experts_per_tok=2, moe_intermediate_size=4, shared_expert_intermediate_size=7, decoder_sparse_step=1,
        mlp_only_layers=[1], bos_token_id=None, eos_token_id=None, pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}),
}


@register_family
class Qwen3NextFamily(HybridFamily):
    name = MODEL_TYPE
    title = "Qwen3-Next"
    model_class = Qwen3NextLM
    config_class = Qwen3NextConfig
    architectures = QWEN3_NEXT_ARCHITECTURES
    check_architecture = "qwen3-next-micro"
    # placement/both with the SSM part on the whole input layers: the fused in_proj_qkvz interleaves q, k, v, z per
    # key head, so lora_p_x (the x rows) has no block to adapt here
    default_method = ("lora_in_proj:r=8", "lora_attn:r=8", "lora_mlp:r=8")

    def config(self, name: str, **overrides):
        return Qwen3NextConfig(**{**self.architectures[name.lower()], **overrides})

    def read_config(self, folder: Path):
        return read_qwen3_next_config(folder), "hf"

    def claims_config(self, raw: dict) -> bool:
        return raw.get("model_type") == MODEL_TYPE

    def normalise_keys(self, state: dict) -> dict:
        return from_published(state)

    def save(self, model, folder) -> None:
        save_qwen3_next(model, folder)


__all__ = ["Qwen3NextLM", "QwenHybridLayer", "QwenHybridModel", "load_qwen3_next", "read_qwen3_next_config",
           "save_qwen3_next", "Qwen3NextFamily", "QWEN3_NEXT_ARCHITECTURES"]
