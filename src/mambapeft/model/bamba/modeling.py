"""IBM Bamba (`bamba`): Granite 4.0-H's ancestor, Mamba-2 and attention layers each followed by a gated MLP, on
our own module tree (transformers' BambaForCausalLM's parameter names).

    input_ids (b, L) --embed_tokens--> h                                         [hooks: soft prompt tokens]
    each layer i (config.layers_block_type[i]: "linear_attention" / "full_attention"):
        h = h + mixer(input_layernorm(h))       our Mamba2Mixer, or transformers' BambaAttention (GQA, RoPE from
                                                transformers' BambaRotaryEmbedding, partial rotary as configured)
        h = h + feed_forward(pre_ff_layernorm(h))   transformers' BambaMLP: down(silu(gate(x)) * up(x))
    final_layernorm --> lm_head --> logits; loss + z_loss_coefficient * mean(logsumexp(logits)^2) as transformers

The glue is Granite 4.0-H's (model/granitemoehybrid/modeling.py), without the multipliers and the experts.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import BambaConfig
from transformers.models.bamba.modeling_bamba import BambaAttention, BambaMLP, BambaRMSNorm, BambaRotaryEmbedding

from ...errors import NotApplicable
from ..granitemoehybrid.modeling import (
    ATTENTION_ROLES,
    GraniteHybridLM,
    layer_kind,
    mixer_from_config,
)
from ..interface import Projection, TensorSlot
from ..mamba.lm import MambaLMOutput
from ..mamba2 import Mamba2Mixer


class BambaLayer(nn.Module):
    def __init__(self, config: BambaConfig, index: int):
        super().__init__()
        self.kind = layer_kind(config.layers_block_type[index])
        self.input_layernorm = BambaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.pre_ff_layernorm = BambaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mamba = mixer_from_config(config) if self.kind == "mamba" else None
        self.self_attn = BambaAttention(config, index) if self.kind == "attention" else None
        self.feed_forward = BambaMLP(config)

    @property
    def ssm(self) -> Mamba2Mixer | None:
        return self.mamba

    def forward(self, h, mask, attn_mask, position_embeddings, state):
        x = self.input_layernorm(h)
        if self.mamba is not None:
            x = self.mamba(x, mask, state)
        else:
            length = x.shape[1]
            x = self.self_attn(x, position_embeddings=position_embeddings, attention_mask=attn_mask, cache=state)[0]
            if state is not None:
                state.advance(mask, length)
        h = h + x
        return h + self.feed_forward(self.pre_ff_layernorm(h))


class BambaModelOurs(nn.Module):
    def __init__(self, config: BambaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(BambaLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = BambaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        with torch.device("cpu"):               # real numbers even when the model is built on the meta device
            self.rotary_emb = BambaRotaryEmbedding(config)


class BambaLM(GraniteHybridLM):
    """Bamba causal language model (`config`: a transformers BambaConfig)."""

    family = "bamba"
    fingerprint_keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "layers_block_type",
                        "num_attention_heads", "num_key_value_heads", "intermediate_size", "mamba_n_heads",
                        "mamba_n_groups", "mamba_d_state", "mamba_d_head", "mamba_d_conv", "mamba_expand",
                        "mamba_conv_bias", "mamba_proj_bias", "attention_bias", "mlp_bias")

    decoder_class = BambaModelOurs
    builds_experts = False
    embedding_multiplier = logits_scaling = 1.0        # no µP scalars

    @property
    def final_norm(self) -> nn.Module:
        return self.model.final_layernorm

    def part_types(self) -> dict[str, str]:
        parts = {}
        for i, layer in enumerate(self.model.layers):
            parts[f"model.layers.{i}.{'mamba' if layer.kind == 'mamba' else 'self_attn'}"] = layer.kind
            parts[f"model.layers.{i}.feed_forward"] = "mlp"
        return parts

    def layer_projections(self, role: str) -> list[Projection]:
        if role in ATTENTION_ROLES:
            return self.attention_projections(role)
        return self.gated_mlp_projections(role, [layer.feed_forward for layer in self.model.layers])

    def layer_tensors(self, role: str) -> list[TensorSlot]:
        raise NotApplicable(f"{self.family} has no experts (a dense MLP after every layer)")

    def forward(self, *args, labels=None, **kwargs) -> MambaLMOutput:
        out = super().forward(*args, labels=labels, **kwargs)
        coefficient = self.config.z_loss_coefficient or 0.0
        if labels is not None and coefficient > 0:
            out.loss = out.loss + coefficient * out.logits.logsumexp(dim=-1).pow(2).mean()
        return out

    def save_pretrained(self, folder) -> None:
        from ..checkpoint import write_hf_checkpoint

        write_hf_checkpoint(self, folder)
