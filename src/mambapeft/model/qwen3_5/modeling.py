"""Qwen3.5's text model (`qwen3_5`, transformers' Qwen3_5ForCausalLM): Qwen3-Next's layout with a dense gated MLP
after every layer and Qwen3.5's own modules, on our module tree (transformers' parameter names).

    input_ids (b, L) --embed_tokens--> h                                          [hooks: soft prompt tokens]
    each layer i (config.layer_types[i]: "linear_attention" / "full_attention"):
        h = h + mixer(input_layernorm(h))     our GatedDeltaNetMixer with four input projections (in_proj_qkv,
                                              in_proj_z, in_proj_b, in_proj_a), or transformers' Qwen3_5Attention
                                              (output-gated GQA, q/k norms, partial RoPE)
        h = h + mlp(post_attention_layernorm(h))      transformers' Qwen3_5MLP: down(silu(gate(x)) * up(x))
    norm --> lm_head --> logits

Positions: transformers' Qwen3_5TextRotaryEmbedding is the multimodal (M-RoPE) one; for text, its three position
rows (time, height, width) are the same token index, and then it is plain partial RoPE. We pass it the token index,
as transformers' text forward does. The glue is Qwen3-Next's (model/qwen3_next/modeling.py).
"""

from __future__ import annotations

from transformers.models.qwen3_5.modeling_qwen3_5 import (
    Qwen3_5Attention,
    Qwen3_5MLP,
    Qwen3_5RMSNorm,
    Qwen3_5TextRotaryEmbedding,
)

from ...errors import NotApplicable
from ..qwen3_next.modeling import Qwen3NextLM, QwenHybridLayer, QwenHybridModel


class Qwen3_5Layer(QwenHybridLayer):
    # no MoE block class: no layer has experts (type(None) is what `is_moe` and the initialisation never meet)
    parts = {"attention": Qwen3_5Attention, "mlp": Qwen3_5MLP, "moe": type(None), "norm": Qwen3_5RMSNorm}

    @staticmethod
    def has_experts(config, index: int) -> bool:
        return False                                   # the dense Qwen3.5 sizes (the MoE ones are qwen3_5_moe)


class Qwen3_5Model(QwenHybridModel):
    layer_class = Qwen3_5Layer
    rotary_class = Qwen3_5TextRotaryEmbedding


class Qwen3_5LM(Qwen3NextLM):
    """Qwen3.5 causal language model, text only (`config`: a transformers Qwen3_5TextConfig)."""

    family = "qwen3_5"
    decoder_class = Qwen3_5Model
    fingerprint_keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "layer_types",
                        "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                        "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                        "linear_value_head_dim", "linear_conv_kernel_dim", "attention_bias")

    def layer_tensors(self, role: str):
        if role in ("router", "experts_in", "experts_out"):
            raise NotApplicable(f"{self.family} has no experts (a dense MLP after every layer; Qwen3.5's MoE sizes "
                                "are transformers' qwen3_5_moe, not this family)")
        return super().layer_tensors(role)
