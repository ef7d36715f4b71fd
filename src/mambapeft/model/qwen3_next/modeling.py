"""Qwen3-Next (`qwen3_next`): Gated DeltaNet and gated attention layers, three to one, each followed by a mixture of
experts with a shared expert (or a dense MLP), on our own module tree (transformers' Qwen3NextForCausalLM's parameter
names). The glue here serves Qwen3.5 too (model/qwen3_5/), which transformers derives from Qwen3-Next the same way.

Shapes: batch b, length L, width d, vocabulary V.

    input_ids (b, L) --embed_tokens--> h                                          [hooks: soft prompt tokens]
    each layer i (config.layer_types[i]: "linear_attention" / "full_attention"):
        h = h + mixer(input_layernorm(h))
              linear_attn: our GatedDeltaNetMixer (model/gated_deltanet.py: every hook stage it has)
              self_attn:   transformers' Qwen3NextAttention: GQA, q and k RMSNormed per head, partial RoPE, and an
                           output gate (q_proj's rows interleave each head's query and its gate: o * sigmoid(gate))
        h = h + mlp(post_attention_layernorm(h))
              transformers' Qwen3NextSparseMoeBlock (top-k experts + sigmoid-gated shared expert) on the layers
              (i + 1) % decoder_sparse_step == 0 outside mlp_only_layers; Qwen3NextMLP on the others
    norm --> lm_head --> logits (b, L, V)

Every RMSNorm outside the mixer is transformers' (1 + w) form (weights initialised at 0, so a norm weight of 0 means
scale 1); the mixer's gated norm is a plain w form (initialised at 1), as in transformers.

The loop over layers, the masks, the positions and the attention cache are Granite 4.0-H's
(model/granitemoehybrid/modeling.py, `GraniteHybridLM.forward`), with the multipliers at 1: only the layer, the
module tree and the interface answers are ours here. Linear-attention layers count as "mamba" layers in
`layer_types()` (the interface's name for a recurrent layer: the SSM methods adapt them).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import Qwen3NextConfig
from transformers.models.qwen3_next.modeling_qwen3_next import (
    Qwen3NextAttention,
    Qwen3NextMLP,
    Qwen3NextRMSNorm,
    Qwen3NextRotaryEmbedding,
    Qwen3NextSparseMoeBlock,
)

from ...errors import NotApplicable
from ..gated_deltanet import GatedDeltaNetMixer, GatedDeltaNetState, mixer_from_config
from ..granitemoehybrid.modeling import (
    ATTENTION_ROLES,
    AttentionState,
    GraniteHybridLM,
    layer_kind,
)
from ..interface import Projection, TensorSlot
from ..mamba.lm import MambaState


class QwenHybridLayer(nn.Module):
    """One decoder layer: a mixer (`linear_attn` or `self_attn`, the other None) and the MLP or MoE block after it.
    The transformers classes come from `parts` (a family's subclass names its own)."""

    parts = {"attention": Qwen3NextAttention, "mlp": Qwen3NextMLP, "moe": Qwen3NextSparseMoeBlock,
             "norm": Qwen3NextRMSNorm}

    def __init__(self, config, index: int):
        super().__init__()
        self.kind = layer_kind(config.layer_types[index])
        norm = self.parts["norm"]
        self.input_layernorm = norm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = norm(config.hidden_size, eps=config.rms_norm_eps)
        self.linear_attn = mixer_from_config(config) if self.kind == "mamba" else None
        self.self_attn = self.parts["attention"](config, index) if self.kind == "attention" else None
        self.mlp = self.parts["moe"](config) if self.has_experts(config, index) else \
            self.parts["mlp"](config, intermediate_size=config.intermediate_size)

    @staticmethod
    def has_experts(config, index: int) -> bool:
        """transformers' rule for a Qwen3-Next layer's block after the mixer."""
        return (index not in config.mlp_only_layers and config.num_experts > 0
                and (index + 1) % config.decoder_sparse_step == 0)

    @property
    def ssm(self) -> GatedDeltaNetMixer | None:
        return self.linear_attn

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, self.parts["moe"])

    def forward(self, h, mask, attn_mask, position_embeddings, state):
        """h (b, L, d) -> (b, L, d). mask (b, L) of real tokens; attn_mask (granitemoehybrid's `causal_key_mask`)."""
        x = self.input_layernorm(h)
        if self.linear_attn is not None:
            x = self.linear_attn(x, mask, state)
        else:
            length = x.shape[1]
            x = self.self_attn(x, position_embeddings=position_embeddings, attention_mask=attn_mask, cache=state)[0]
            if state is not None:
                state.advance(mask, length)
        h = h + x
        out = self.mlp(self.post_attention_layernorm(h))
        return h + (out[0] if isinstance(out, tuple) else out)


class QwenHybridModel(nn.Module):
    """The decoder without the head (transformers' Qwen3NextModel / Qwen3_5TextModel's module names)."""

    layer_class = QwenHybridLayer
    rotary_class = Qwen3NextRotaryEmbedding

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(self.layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = self.layer_class.parts["norm"](config.hidden_size, eps=config.rms_norm_eps)
        with torch.device("cpu"):               # real numbers even when the model is built on the meta device
            self.rotary_emb = self.rotary_class(config)


class Qwen3NextLM(GraniteHybridLM):
    """Qwen3-Next causal language model (`config`: a transformers Qwen3NextConfig)."""

    family = "qwen3_next"
    decoder_class = QwenHybridModel
    fingerprint_keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "layer_types",
                        "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                        "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                        "linear_value_head_dim", "linear_conv_kernel_dim", "attention_bias", "num_experts",
                        "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step",
                        "mlp_only_layers")

    embedding_multiplier = logits_scaling = 1.0        # no µP scalars

    @classmethod
    def check_config(cls, config: Qwen3NextConfig) -> None:
        super().check_config(config)
        if getattr(config, "output_router_logits", False):
            raise ValueError("output_router_logits (the router's load-balancing loss added to the loss) is not "
                             "supported: set it to false (the published configs do)")

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None):
        """Random initialisation as transformers' _init_weights does it (normal, std initializer_range; the (1 + w)
        norms at 0; the mixers' gated norm and dt_bias at 1, A uniform in [0.01, 16]): for from_config; loading
        overwrites it."""
        if seed is not None:
            torch.manual_seed(seed)
        std = self.config.initializer_range
        norm_class = self.model.layer_class.parts["norm"]
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d)):
                module.weight.normal_(std=std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, norm_class):
                module.weight.zero_()
            elif isinstance(module, self.model.layer_class.parts["moe"]):
                for p in (module.gate.weight, module.experts.gate_up_proj, module.experts.down_proj):
                    p.normal_(std=std)
        for mixer in self.peft_mixers():
            mixer.norm.weight.fill_(1.0)
            mixer.dt_bias.fill_(1.0)
            mixer.A_log.copy_(torch.empty_like(mixer.A_log).uniform_(0.01, 16).log())

    # ------------------------------------------------------------------ the PEFT interface (model/interface.py)

    def part_types(self) -> dict[str, str]:
        parts = {}
        for i, layer in enumerate(self.model.layers):
            parts[f"model.layers.{i}.{'linear_attn' if layer.kind == 'mamba' else 'self_attn'}"] = layer.kind
            parts[f"model.layers.{i}.mlp"] = "moe" if layer.is_moe else "mlp"
        return parts

    def _mlps(self) -> list[nn.Module]:
        """Every gated MLP: the dense blocks and the MoE blocks' shared experts."""
        return [layer.mlp.shared_expert if layer.is_moe else layer.mlp for layer in self.model.layers]

    def layer_projections(self, role: str) -> list[Projection]:
        if role in ATTENTION_ROLES:
            # q_proj's rows hold each head's query and its output gate side by side: the whole layer is the role
            return self.attention_projections(role)
        return self.gated_mlp_projections(role, self._mlps())

    def layer_tensors(self, role: str) -> list[TensorSlot]:
        moes = [layer.mlp for layer in self.model.layers if layer.is_moe]
        where = {"router": lambda m: TensorSlot(m.gate, "weight"),
                 "experts_in": lambda m: TensorSlot(m.experts, "gate_up_proj"),
                 "experts_out": lambda m: TensorSlot(m.experts, "down_proj")}
        if role not in where:
            raise NotApplicable(f"{self.family} has no {role!r} tensor")
        if not moes:
            raise NotApplicable(f"this {self.family} model has no experts (num_experts 0 or every layer in "
                                "mlp_only_layers: a dense model)")
        return [where[role](m) for m in moes]

    def record_state_growth(self, n: int) -> None:
        raise NotApplicable(f"{self.family}'s Gated DeltaNet state is a d_k x d_v matrix per head: it does not grow")

    # ------------------------------------------------------------------ running

    def new_state(self) -> MambaState:
        """An empty state for generation: a GatedDeltaNetState per linear-attention layer, an AttentionState per
        attention one."""
        return MambaState([GatedDeltaNetState() if layer.kind == "mamba" else AttentionState()
                           for layer in self.model.layers])

    def save_pretrained(self, folder) -> None:
        """config.json + model.safetensors that transformers' ...ForCausalLM and our loader both read (refused while
        PEFT parts are attached: save the adapter, or merge first)."""
        from ..registry import family_of_model

        family_of_model(self).save(self, folder)
