"""TII Falcon-H1 (`falcon_h1`): attention and a Mamba-2 mixer side by side in every layer, then a gated MLP, with
µP multipliers on every stream; on our own module tree (transformers' FalconH1ForCausalLM's parameter names).

Shapes: batch b, length L, width d, vocabulary V; Mamba-2 inner width E (mamba_d_ssm), G groups of state size N,
H heads.

    input_ids (b, L) --embed_tokens--> h * embedding_multiplier                  [hooks: soft prompt tokens]
    each layer (all alike, "parallel"):
        x = input_layernorm(h)
        m = mamba(x * ssm_in_multiplier) * ssm_out_multiplier
              our Mamba2Mixer (model/mamba2/modeling.py, every hook stage), with in_proj's output rows
              [z (E) | x (E) | B (G N) | C (G N) | dt (H)] multiplied by the per-row µP vector (ssm_multipliers:
              one factor per block) right after in_proj, as transformers does; its norm is Falcon-H1's
              (mamba_rms_norm: a grouped RMS norm before or after the silu(z) gate, or only the gate)
        a = self_attn(x * attention_in_multiplier) * attention_out_multiplier
              transformers' FalconH1Attention (GQA, RoPE; keys times key_multiplier inside it)
        h = h + m + a
        h = h + feed_forward(pre_ff_layernorm(h))
              transformers' FalconH1MLP: down(up(x) * silu(gate(x) * gate_mult)) * down_mult
    final_layernorm --> lm_head --> * lm_head_multiplier --> logits (b, L, V)

Where the multipliers meet adapters: every multiplier acts on a module's input or output, never on its weight, so an
adapter on a module (LoRA on in_proj, q_proj, gate_proj ...) sits inside the multiplier exactly where a merged
weight does: the LoRA delta on in_proj's rows is scaled by the µP vector like the pretrained rows, and merging it
into in_proj.weight (W + BA) gives the same output through the same vector, in transformers too. The µP vector is a
non-persistent buffer, as in transformers: rebuilt from the config, never saved.

A layer's state for generation is one `ParallelState`: the Mamba-2 mixer's conv and scan state and the attention's
keys and values side by side, so the glue's row selection and joining (model/lm.py map_rows, cat_rows) handle it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import FalconH1Config
from transformers.models.falcon_h1.modeling_falcon_h1 import (
    FalconH1Attention,
    FalconH1MLP,
    FalconH1RMSNorm,
    FalconH1RotaryEmbedding,
)

from ...errors import NotApplicable
from ..granitemoehybrid.modeling import (
    ATTENTION_ROLES,
    AttentionState,
    GraniteHybridLM,
)
from ..interface import Projection, TensorSlot, unwrap
from ..mamba.lm import MambaState
from ..mamba2 import Mamba2Mixer


class FalconH1Gate(nn.Module):
    """Falcon-H1's norm of the scan output y (b, L, E) gated by z: with mamba_rms_norm, weight * rms_norm(y * silu(z))
    (norm_before_gate False, what mamba_ssm's kernel does) or weight * rms_norm(y) * silu(z) (True), per group of E/G
    channels; without it, y * silu(z) alone and no weight (transformers' FalconH1RMSNormGated / nn.Identity)."""

    def __init__(self, E: int, groups: int, eps: float, rms_norm: bool, norm_before_gate: bool):
        super().__init__()
        self.rms_norm, self.norm_before_gate = rms_norm, norm_before_gate
        self.group_size, self.eps = E // groups, eps
        if rms_norm:
            self.weight = nn.Parameter(torch.ones(E))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gate = F.silu(z.float())
        if not self.rms_norm:
            return (y.float() * gate).to(y.dtype)
        t = y.float() if self.norm_before_gate else y.float() * gate                         # (..., E)
        groups = t.unflatten(-1, (-1, self.group_size))                                      # (..., G, E/G)
        t = self.weight * (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return (t * gate if self.norm_before_gate else t).to(y.dtype)


class FalconH1Mixer(Mamba2Mixer):
    """Our Mamba-2 mixer with Falcon-H1's differences: the µP vector on in_proj's output rows, its own width
    (mamba_d_ssm), separate biases for in_proj (mamba_proj_bias) and out_proj (projectors_bias), and its gate."""

    display_name = "Falcon-H1's Mamba-2 mixer"

    def __init__(self, config: FalconH1Config):
        E = config.mamba_d_ssm if config.mamba_d_ssm is not None else config.mamba_expand * config.hidden_size
        super().__init__(config.hidden_size, d_state=config.mamba_d_state, d_conv=config.mamba_d_conv,
                         head_dim=config.mamba_d_head, n_groups=config.mamba_n_groups,
                         conv_bias=config.mamba_conv_bias, bias=config.mamba_proj_bias, norm_eps=config.rms_norm_eps,
                         chunk_size=config.mamba_chunk_size, dt_limit=tuple(config.time_step_limit), d_inner=E)
        self.norm = FalconH1Gate(E, config.mamba_n_groups, config.rms_norm_eps, config.mamba_rms_norm,
                                 config.mamba_norm_before_gate)
        self.out_proj = nn.Linear(E, config.hidden_size, bias=config.projectors_bias)
        self.ssm_multipliers = tuple(float(m) for m in config.ssm_multipliers)                # z, x, B, C, dt
        with torch.device("cpu"):               # real numbers even when the model is built on the meta device
            self.register_buffer("mup_vector", self.build_mup_vector(), persistent=False)     # (2E+2GN+H,)

    def build_mup_vector(self) -> torch.Tensor:
        """(2E + 2GN + H,): ssm_multipliers[k] over the k-th block of in_proj's output rows (z, x, B, C, dt), for
        the mixer's current sizes (a merged additional scan grows N)."""
        E, G, N, H = self.d_inner, self.n_groups, self.d_state, self.num_heads
        sizes = [E, E, G * N, G * N, H]
        return torch.cat([torch.full((n,), m) for n, m in zip(sizes, self.ssm_multipliers, strict=True)])

    def scale_in_proj(self, zxbcdt: torch.Tensor) -> torch.Tensor:
        if self.mup_vector.shape[0] != zxbcdt.shape[-1]:     # in_proj grew (additional scan merged): N changed
            self.mup_vector = self.build_mup_vector()
        return zxbcdt * self.mup_vector.to(device=zxbcdt.device, dtype=zxbcdt.dtype)

    def in_proj_block_scale(self, role: str) -> float:
        return self.ssm_multipliers[("Z", "X", "B", "C", "dt").index(role)]

    def tensors(self, role: str) -> list[TensorSlot]:
        if role == "norm" and not unwrap(self.norm).rms_norm:
            raise self.not_applicable("gated norm", "this Falcon-H1 model gates with silu(z) alone (mamba_rms_norm "
                                                    "false): there is no norm weight")
        return super().tensors(role)

    @torch.no_grad()
    def reset_parameters(self):
        for module in (self.in_proj, self.out_proj, self.conv1d):
            module.reset_parameters()
        self.reset_ssm_parameters()
        if self.norm.rms_norm:
            self.norm.weight.fill_(1.0)


@dataclass
class ParallelState(AttentionState):
    """One Falcon-H1 layer's past: the attention's keys and values (AttentionState's fields; `offset` is the cache
    length, which is also the count of tokens the mixer has seen) and the Mamba-2 mixer's conv and scan state
    (Mamba2MixerState's fields, read by the mixer under the same names)."""

    conv: torch.Tensor | None = None
    ssm: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @staticmethod
    def cat_rows(states: list[ParallelState], **changes) -> ParallelState:
        """The rows of several states in order: the attention part as AttentionState.cat_rows joins it (shorter
        caches left-padded), the mixer's tensors stacked by row."""
        attention = AttentionState.cat_rows(states)
        first = states[0]
        joined = {k: torch.cat([getattr(s, k) for s in states]) if getattr(first, k) is not None else None
                  for k in ("conv", "ssm")}
        extra = {k: torch.cat([s.extra[k] for s in states]) for k in first.extra}
        return ParallelState(attention.key, attention.value, attention.key_mask, attention.offset, attention.shift,
                             extra=extra, **joined)


class FalconH1Layer(nn.Module):
    """One decoder layer: `mamba` and `self_attn` side by side on the same normed input, then `feed_forward`."""

    kind = "parallel"

    def __init__(self, config: FalconH1Config, index: int):
        super().__init__()
        self.feed_forward = FalconH1MLP(config)
        self.mamba = FalconH1Mixer(config)
        self.self_attn = FalconH1Attention(config, index)
        self.input_layernorm = FalconH1RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.pre_ff_layernorm = FalconH1RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ssm_in_multiplier = config.ssm_in_multiplier
        self.ssm_out_multiplier = config.ssm_out_multiplier
        self.attention_in_multiplier = config.attention_in_multiplier
        self.attention_out_multiplier = config.attention_out_multiplier

    @property
    def ssm(self) -> FalconH1Mixer:
        return self.mamba

    def forward(self, h, mask, attn_mask, position_embeddings, state: ParallelState | None):
        """h (b, L, d) -> (b, L, d). mask (b, L) of real tokens (Mamba); attn_mask (see `causal_key_mask`)."""
        x = self.input_layernorm(h)
        length = x.shape[1]
        past = state.offset if state is not None else 0
        m = self.mamba(x * self.ssm_in_multiplier, mask, state)                   # the mixer moves state.offset ...
        if state is not None:
            state.offset = past                                                   # ... which the attention owns
        a = self.self_attn(x * self.attention_in_multiplier, position_embeddings, attn_mask, cache=state)[0]
        if state is not None:
            state.advance(mask, length)                                           # offset: past + length
        h = h + (m * self.ssm_out_multiplier + a * self.attention_out_multiplier)
        return h + self.feed_forward(self.pre_ff_layernorm(h))


class FalconH1ModelOurs(nn.Module):
    """The decoder without the head (transformers' FalconH1Model's module names)."""

    def __init__(self, config: FalconH1Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(FalconH1Layer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = FalconH1RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        with torch.device("cpu"):               # real numbers even when the model is built on the meta device
            self.rotary_emb = FalconH1RotaryEmbedding(config)


class FalconH1LM(GraniteHybridLM):
    """Falcon-H1 causal language model (`config`: a transformers FalconH1Config)."""

    family = "falcon_h1"
    fingerprint_keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
                        "num_key_value_heads", "intermediate_size", "mamba_d_ssm", "mamba_n_heads", "mamba_d_head",
                        "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_conv_bias", "mamba_proj_bias",
                        "mamba_rms_norm", "projectors_bias", "attention_bias", "mlp_bias")

    decoder_class = FalconH1ModelOurs
    builds_experts = False

    @property
    def final_norm(self) -> nn.Module:
        return self.model.final_layernorm

    @property
    def embedding_multiplier(self) -> float:
        return self.config.embedding_multiplier

    @property
    def logits_scaling(self) -> float:
        return 1.0 / self.config.lm_head_multiplier      # the glue divides by it: logits = head(h) * multiplier

    def layer_types(self) -> list[str]:
        return ["parallel"] * len(self.model.layers)

    def new_state(self) -> MambaState:
        """An empty state for generation: one ParallelState per layer (mixer and attention together)."""
        return MambaState([ParallelState() for _ in self.model.layers])

    def part_types(self) -> dict[str, str]:
        parts = {}
        for i in range(len(self.model.layers)):
            parts[f"model.layers.{i}.mamba"] = "mamba"
            parts[f"model.layers.{i}.self_attn"] = "attention"
            parts[f"model.layers.{i}.feed_forward"] = "mlp"
        return parts

    def layer_projections(self, role: str) -> list[Projection]:
        if role in ATTENTION_ROLES:
            return self.attention_projections(role)                  # every layer has one
        return self.gated_mlp_projections(role, [layer.feed_forward for layer in self.model.layers])

    def layer_tensors(self, role: str) -> list[TensorSlot]:
        raise NotApplicable(f"{self.family} has no experts (a dense MLP after every layer)")

    def save_pretrained(self, folder) -> None:
        """config.json + model.safetensors (transformers' names; the µP vector is rebuilt from the config, not
        saved), which transformers' FalconH1ForCausalLM and `load_falcon_h1` both load."""
        from ..checkpoint import write_hf_checkpoint

        write_hf_checkpoint(self, folder)
