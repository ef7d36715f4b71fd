"""NVIDIA Nemotron-H / Nemotron Nano 2 (`nemotron_h`): one mixer per block, of four kinds, on our own module tree.

Shapes: batch b, length L, width d. Parameter names are those of transformers' NemotronHForCausalLM.

    input_ids (b, L) --embeddings--> h                                           [hooks: soft prompt tokens]
    each block i (config.layers_block_type[i]):  h = h + mixer(norm(h))
        "mamba" (linear_attention)   our Mamba2Mixer (model/mamba2.py, every hook stage; inner width
                                     mamba_num_heads x mamba_head_dim, not necessarily expand x d)
        "attention" (full_attention) transformers' NemotronHAttention (GQA, no positional encoding)
        "mlp"                        transformers' NemotronHMLP: down_proj(relu2(up_proj(x))), no gate
        "moe"                        transformers' NemotronHMoE: sigmoid router with grouped top-k, experts as stacked
                                     up_proj / down_proj tensors, and a shared expert (an MLP)
    norm_f --> lm_head --> logits (b, L, V)

The glue is Granite 4.0-H's (model/granitemoehybrid/modeling.py: the attention's KV cache as an `AttentionState`
in our MambaState, the padding and causal masks, generation); what differs is the block and the module names.
Published checkpoints name the model `backbone` and keep each expert's weights as a module of its own
(backbone.layers.i.mixer.experts.e.up_proj.weight); reading takes either layout, writing writes the published one.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import NemotronHConfig
from transformers.models.nemotron_h.modeling_nemotron_h import (
    NemotronHAttention,
    NemotronHMLP,
    NemotronHMoE,
    NemotronHRMSNorm,
)

from ...errors import NotApplicable
from ..granitemoehybrid.modeling import (
    ATTENTION_ROLES,
    ATTENTION_TYPES,
    MAMBA_TYPES,
    AttentionState,
    GraniteHybridLM,
    PassState,
    whole_projections,
)
from ..interface import Projection, TensorSlot
from ..mamba.lm import MambaState
from ..mamba2 import Mamba2Mixer, Mamba2MixerState


def block_kind(block_type: str) -> str:
    """"mamba", "attention", "mlp" or "moe" for a config.layers_block_type entry."""
    if block_type in MAMBA_TYPES:
        return "mamba"
    if block_type in ATTENTION_TYPES:
        return "attention"
    if block_type in ("mlp", "moe"):
        return block_type
    raise ValueError(f"unknown Nemotron-H block type {block_type!r}")


def mixer_from_config(config: NemotronHConfig) -> Mamba2Mixer:
    return Mamba2Mixer(
        config.hidden_size,
        d_state=config.ssm_state_size,
        d_conv=config.conv_kernel,
        head_dim=config.mamba_head_dim,
        d_inner=config.mamba_num_heads * config.mamba_head_dim,
        n_groups=config.n_groups,
        conv_bias=config.use_conv_bias,
        bias=config.use_bias,
        norm_eps=config.layer_norm_epsilon,
        chunk_size=config.chunk_size,
        dt_limit=tuple(config.time_step_limit),
    )


class NemotronHLayer(nn.Module):
    """One block: h + mixer(norm(h)), the mixer of the block's kind."""

    def __init__(self, config: NemotronHConfig, index: int):
        super().__init__()
        self.kind = block_kind(config.layers_block_type[index])
        self.norm = NemotronHRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        build = {"mamba": lambda: mixer_from_config(config), "attention": lambda: NemotronHAttention(config, index),
                 "mlp": lambda: NemotronHMLP(config), "moe": lambda: NemotronHMoE(config, index)}
        self.mixer = build[self.kind]()

    @property
    def ssm(self) -> Mamba2Mixer | None:
        return self.mixer if self.kind == "mamba" else None

    def forward(self, h, mask, attn_mask, position_embeddings, state):
        x = self.norm(h.to(self.norm.weight.dtype))
        if self.kind == "mamba":
            x = self.mixer(x, mask, state)
        elif self.kind == "attention":
            length = x.shape[1]
            x = self.mixer(x, attn_mask, cache=state)[0]
            if state is not None:
                state.advance(mask, length)
        else:
            x = self.mixer(x)
            if state is not None:
                state.offset += x.shape[1]
        return h + x


class NemotronHModelOurs(nn.Module):
    """The decoder without the head (transformers' NemotronHModel's module names)."""

    def __init__(self, config: NemotronHConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                       _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(NemotronHLayer(config, i) for i in range(len(config.layers_block_type)))
        self.norm_f = NemotronHRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class NemotronHLM(GraniteHybridLM):
    """Nemotron-H causal language model (`config`: a transformers NemotronHConfig)."""

    family = "nemotron_h"
    embedding_path = "model.embeddings"
    fingerprint_keys = ("model_type", "hidden_size", "vocab_size", "layers_block_type", "num_attention_heads",
                        "num_key_value_heads", "head_dim", "intermediate_size", "mamba_num_heads", "mamba_head_dim",
                        "ssm_state_size", "n_groups", "conv_kernel", "use_conv_bias", "use_bias", "n_routed_experts",
                        "moe_intermediate_size", "moe_shared_expert_intermediate_size", "moe_latent_size")

    decoder_class = NemotronHModelOurs
    embedding_multiplier = logits_scaling = 1.0        # no µP scalars

    @classmethod
    def check_config(cls, config: NemotronHConfig) -> None:
        if config.mamba_hidden_act != "silu":
            raise ValueError(f"only silu Mamba activations are supported, the config asks for "
                             f"{config.mamba_hidden_act!r}")

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.embeddings

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm_f

    def new_state(self) -> MambaState:
        """An empty state for generation: per block a Mamba2MixerState, an AttentionState or a PassState."""
        kinds = {"mamba": Mamba2MixerState, "attention": AttentionState}
        return MambaState([kinds.get(layer.kind, PassState)() for layer in self.model.layers])

    def part_types(self) -> dict[str, str]:
        return {f"model.layers.{i}.mixer": layer.kind for i, layer in enumerate(self.model.layers)}

    def _mixers(self, kind: str) -> list[nn.Module]:
        return [layer.mixer for layer in self.model.layers if layer.kind == kind]

    def layer_projections(self, role: str) -> list[Projection]:
        if role in ATTENTION_ROLES:
            attention = self._mixers("attention")
            if not attention:
                raise NotApplicable(f"this {self.family} model has no attention blocks")
            return whole_projections(attention, (role,))
        if role == "gate_proj":
            raise NotApplicable(f"{self.family}'s MLPs have no gate (down_proj(relu2(up_proj(x))))")
        # the MLP blocks and the MoE blocks' shared experts (MLPs of their own)
        mlps = self._mixers("mlp") + [moe.shared_experts for moe in self._mixers("moe")]
        attr = {"mlp_in": "up_proj", "up_proj": "up_proj", "mlp_out": "down_proj", "down_proj": "down_proj"}.get(role)
        if attr is None:
            raise NotApplicable(f"{self.family} has no {role!r} projection")
        if not mlps:
            raise NotApplicable(f"this {self.family} model has no MLP or MoE blocks")
        return whole_projections(mlps, (attr,))

    def layer_tensors(self, role: str) -> list[TensorSlot]:
        where = {"router": lambda m: TensorSlot(m.gate, "weight"),
                 "experts_in": lambda m: TensorSlot(m.experts, "up_proj"),
                 "experts_out": lambda m: TensorSlot(m.experts, "down_proj")}
        if role not in where:
            raise NotApplicable(f"{self.family} has no {role!r} tensor")
        moes = self._mixers("moe")
        if not moes:
            raise NotApplicable(f"this {self.family} model has no experts (no moe blocks)")
        return [where[role](m) for m in moes]

    def save_pretrained(self, folder) -> None:
        """config.json + model.safetensors in the published layout, which transformers' NemotronHForCausalLM and
        `load_nemotron_h` both load (refused while PEFT parts are attached)."""
        from ..registry import family_of_model

        family_of_model(self).save(self, folder)
