"""AI21 Jamba (`jamba`): Mamba-1 mixers and attention layers in one stack, each followed by a gated MLP or a mixture
of experts, on our own module tree (transformers' JambaForCausalLM's parameter names).

Shapes: batch b, length L, width d, vocabulary V.

    input_ids (b, L) --embed_tokens--> h                                         [hooks: soft prompt tokens]
    each layer i (config.layers_block_type[i], from attn_layer_period / attn_layer_offset):
        h = h + mixer(input_layernorm(h))
              mixer: our MambaMixer (model/mamba/mixer.py: in_proj, conv1d, x_proj, dt_proj, A_log (E, N), D, out_proj,
                     with Jamba's RMS norms on dt_low, B and C: dt_layernorm, b_layernorm, c_layernorm), or
                     transformers' JambaAttention (GQA, no positional encoding at all)
        h = h + feed_forward(pre_ff_layernorm(h))
              feed_forward: transformers' JambaMLP (down(silu(gate(x)) * up(x))) where layers_num_experts[i] == 1,
                     else transformers' JambaSparseMoeBlock (softmax router, top-k weights not renormalised, experts
                     as stacked gate_up_proj (E, 2I, d) / down_proj (E, d, I) tensors)
    final_layernorm --> lm_head --> logits (b, L, V)

Why our Mamba-1 mixer and not transformers' JambaMambaMixer: every MambaPEFT Mamba-1 method (LoRA on in_proj, x_proj,
dt_proj, out_proj, partial LoRA on the X/Z/dt/B/C rows, additional scan, affix, SDT, the state methods) is written
against our mixer's extension points, so Jamba gets all of them unchanged. The glue (KV cache as an `AttentionState`
in our MambaState, masks, generation) is Granite 4.0-H's (model/granitemoehybrid/modeling.py).

Published checkpoints (and transformers' save_pretrained) keep each expert as modules of its own
(feed_forward.experts.e.{gate,up,down}_proj.weight); loading.py stacks and unstacks them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import JambaConfig
from transformers.models.jamba.modeling_jamba import JambaAttention, JambaMLP, JambaRMSNorm, JambaSparseMoeBlock

from ...errors import NotApplicable
from ..granitemoehybrid.modeling import (
    ATTENTION_ROLES,
    GATED_MLP_ROLES,
    AttentionState,
    GraniteHybridLM,
    layer_kind,
)
from ..interface import Projection, TensorSlot
from ..mamba.lm import MambaState
from ..mamba.mixer import MambaMixer, MixerState


def mixer_from_config(config: JambaConfig) -> MambaMixer:
    """Our Mamba-1 mixer with a Jamba layer's sizes and its dt/B/C norms (eps: the model's rms_norm_eps)."""
    return MambaMixer(
        config.hidden_size,
        d_state=config.mamba_d_state,
        d_conv=config.mamba_d_conv,
        expand=config.mamba_expand,
        dt_rank=config.mamba_dt_rank,
        conv_bias=config.mamba_conv_bias,
        bias=config.mamba_proj_bias,
        bcdt_norm_eps=config.rms_norm_eps,
    )


class JambaLayer(nn.Module):
    """One decoder layer: a mixer (`mamba` or `self_attn`, the other None), then `feed_forward` (an MLP or experts)."""

    def __init__(self, config: JambaConfig, index: int):
        super().__init__()
        self.kind = layer_kind(config.layers_block_type[index])
        self.input_layernorm = JambaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.pre_ff_layernorm = JambaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mamba = mixer_from_config(config) if self.kind == "mamba" else None
        self.self_attn = JambaAttention(config, index) if self.kind == "attention" else None
        self.is_moe = config.layers_num_experts[index] > 1
        self.feed_forward = JambaSparseMoeBlock(config) if self.is_moe else JambaMLP(config)

    @property
    def ssm(self) -> MambaMixer | None:
        return self.mamba

    def forward(self, h, mask, attn_mask, position_embeddings, state):
        """h (b, L, d) -> (b, L, d). mask (b, L) of real tokens (Mamba); attn_mask (`causal_key_mask`)."""
        x = self.input_layernorm(h)
        if self.mamba is not None:
            x = self.mamba(x, mask, state)
        else:
            length = x.shape[1]
            x = self.self_attn(x, attention_mask=attn_mask, cache=state)[0]
            if state is not None:
                state.advance(mask, length)
        h = h + x
        return h + self.feed_forward(self.pre_ff_layernorm(h))


class JambaModelOurs(nn.Module):
    """The decoder without the head (transformers' JambaModel's module names); no rotary module (Jamba has no
    positional encoding: its Mamba layers carry the order)."""

    def __init__(self, config: JambaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(JambaLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = JambaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = None


class JambaLM(GraniteHybridLM):
    """Jamba causal language model (`config`: a transformers JambaConfig)."""

    family = "jamba"
    fingerprint_keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
                        "num_key_value_heads", "intermediate_size", "num_experts", "num_experts_per_tok",
                        "expert_layer_period", "expert_layer_offset", "attn_layer_period", "attn_layer_offset",
                        "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank", "mamba_conv_bias",
                        "mamba_proj_bias")

    decoder_class = JambaModelOurs
    embedding_multiplier = logits_scaling = 1.0        # no µP scalars

    @property
    def final_norm(self) -> nn.Module:
        return self.model.final_layernorm

    def new_state(self) -> MambaState:
        """An empty state for generation: a MixerState per Mamba layer, an AttentionState per attention one."""
        return MambaState([MixerState() if layer.kind == "mamba" else AttentionState() for layer in self.model.layers])

    def part_types(self) -> dict[str, str]:
        parts = {}
        for i, layer in enumerate(self.model.layers):
            parts[f"model.layers.{i}.{'mamba' if layer.kind == 'mamba' else 'self_attn'}"] = layer.kind
            parts[f"model.layers.{i}.feed_forward"] = "moe" if layer.is_moe else "mlp"
        return parts

    def layer_projections(self, role: str) -> list[Projection]:
        if role in ATTENTION_ROLES:
            return self.attention_projections(role)
        mlps = [layer.feed_forward for layer in self.model.layers if not layer.is_moe]
        if role in GATED_MLP_ROLES and not mlps:
            raise NotApplicable(f"this {self.family} model has no dense MLP (experts after every layer)")
        return self.gated_mlp_projections(role, mlps)

    def layer_tensors(self, role: str) -> list[TensorSlot]:
        where = {"router": lambda m: TensorSlot(m.router, "weight"),
                 "experts_in": lambda m: TensorSlot(m.experts, "gate_up_proj"),
                 "experts_out": lambda m: TensorSlot(m.experts, "down_proj")}
        if role not in where:
            raise NotApplicable(f"{self.family} has no {role!r} tensor")
        moes = [layer.feed_forward for layer in self.model.layers if layer.is_moe]
        if not moes:
            raise NotApplicable(f"this {self.family} model has no experts (num_experts 1: a dense model)")
        return [where[role](m) for m in moes]

    def save_pretrained(self, folder) -> None:
        """config.json + model.safetensors in the published layout (one module per expert), which transformers'
        JambaForCausalLM and `load_jamba` both load (refused while PEFT parts are attached)."""
        from ..registry import family_of_model

        family_of_model(self).save(self, folder)
