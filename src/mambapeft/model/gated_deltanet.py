"""The Gated DeltaNet mixer: the linear-recurrent layer of Qwen3.5 (`qwen3_5`) and Qwen3-Next (`qwen3_next`).

Shapes: batch b, length L, model width d, key heads H_k of d_k channels, value heads H = R H_k of d_v channels
(value head h reads key head h // R), conv kernel K. Parameter names are those of transformers'
`Qwen3_5GatedDeltaNet` and `Qwen3NextGatedDeltaNet`, so their state dicts load as they are.

    h (b, L, d) --in_proj_qkv--> [q (H_k d_k) | k (H_k d_k) | v (H d_v)]     qwen3_5: four projections;
                --in_proj_z--> z (H d_v)   --in_proj_b--> b (H)   --in_proj_a--> a (H)   qwen3_next: two fused ones
    [q | k | v] --causal depthwise conv1d (no bias)--> silu
    beta = sigmoid(b);  g = -exp(A_log) softplus(a + dt_bias)                 (H per token; A_log, dt_bias (H,))
    o = gated_delta_rule(q, k, v, g, beta, l2-normalised q and k)             (b, L, H, d_v)  scan/gated_delta.py
    y = norm.weight * rms_norm(o) * silu(z)      per head over d_v: norm *before* the gate (unlike Mamba-2's)
    out = out_proj(y)                                                         (b, L, d)

Qwen3-Next fuses the input projections and interleaves them per key head: in_proj_qkvz's rows are, for each key
head, [q (d_k) | k (d_k) | v (R d_v) | z (R d_v)], and in_proj_ba's [b (R) | a (R)]; `layout="qwen3_next"` builds
those two layers and reorders their outputs into the qwen3_5 order. The math after the projections is the same.

What it shares with Mamba-2 (mamba2.py): a per-head scalar decay exp(-exp(A_log) softplus(a + dt_bias)), a depthwise
causal conv on the scan's inputs, a gated RMSNorm before out_proj. What differs: the state of a head is a matrix
(d_k x d_v) written by the delta rule, k and q play the parts of Mamba's B and C, v that of x, a that of dt; there is
no D skip.

Extension points, as in the other mixers:

* every projection is *called as a module* (a LoRA wrapper on it cannot be bypassed); conv1d.weight, A_log, dt_bias
  and norm.weight are read as attributes at every call (a parametrization applies). No fused kernel takes raw weights.
* `hooks` insert soft tokens before the input projections (stage "before_in_proj", width d) or after them (stage
  "after_in_proj", width 2 H_k d_k + 2 H d_v + 2 H: [q | k | v | z | b | a] in qwen3_5's order for both layouts),
  taken out again before out_proj; they give the recurrence an initial state (H, d_k, d_v) (stage
  "initial_state") and add state offsets before the gated norm (stage "state_offset"): h' (H, d_k, d_v) read through
  the normalised, scaled query of each step (o_t += h'^T q_t, the part C_t h' plays in Mamba), or y' (H, d_v).
* `step` is the one-token path of generation: the conv on the last K inputs and one step of the recurrence, both
  from `GatedDeltaNetState`; `forward` takes it by itself for a length-1 input that continues a state.

Padding: as in transformers, padded positions are zeroed before the projections; in addition g and beta are zeroed
there, so the state passes padding unchanged (left padding then also keeps a learned initial state for the first
real token; without one the state is zero through the padding and the outputs are transformers').
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import NotApplicable
from ..scan.gated_delta import gated_delta_rule, gated_delta_step
from ..scan.gated_delta_reference import l2_normalize
from .hooks import drop_inserted, insert_from_hooks
from .interface import PeftMixerInterface, Projection, TensorSlot, unwrap

LAYOUTS = ("qwen3_5", "qwen3_next")


@dataclass
class GatedDeltaNetState:
    """What a new token needs from the past of one Gated DeltaNet mixer (generation)."""

    conv: torch.Tensor | None = None   # (b, 2 H_k d_k + H d_v, K-1): the last K-1 inputs of the causal conv
    ssm: torch.Tensor | None = None    # (b, H, d_k, d_v) float32: the recurrent state of every value head
    offset: int = 0                    # tokens consumed so far


class HeadRMSNormGated(nn.Module):
    """transformers' Qwen3_5RMSNormGated / Qwen3NextRMSNormGated: weight * rms_norm(y) * silu(z) over each head's d_v
    channels, the norm before the gate; the weight (d_v,) is shared by the heads."""

    def __init__(self, d: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y32 = y.float()
        normed = (y32 * torch.rsqrt(y32.pow(2).mean(-1, keepdim=True) + self.eps)).to(y.dtype)
        return (self.weight * normed * F.silu(z.float())).to(y.dtype)


def _masked(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return t if mask is None else t * mask[:, :, None].to(t.dtype)


class GatedDeltaNetMixer(nn.Module, PeftMixerInterface):
    display_name = "the Gated DeltaNet mixer"
    peft_stages = frozenset({"before_in_proj", "after_in_proj", "initial_state", "state_offset"})
    num_directions = 1

    def __init__(
        self,
        d_model: int,
        *,
        num_key_heads: int = 16,
        num_value_heads: int = 32,
        key_head_dim: int = 128,
        value_head_dim: int = 128,
        d_conv: int = 4,
        norm_eps: float = 1e-6,
        layout: str = "qwen3_5",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown projection layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        if num_value_heads % num_key_heads:
            raise ValueError(f"{num_value_heads} value heads cannot share {num_key_heads} key heads evenly")
        self.layout = layout
        self.d_model = d_model
        self.num_key_heads, self.num_heads = num_key_heads, num_value_heads
        self.key_head_dim, self.head_dim = key_head_dim, value_head_dim
        self.key_dim = num_key_heads * key_head_dim
        self.d_inner = self.value_dim = num_value_heads * value_head_dim
        self.d_state = key_head_dim                # states per value channel
        self.d_conv = d_conv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        factory = {"device": device, "dtype": dtype}
        H = num_value_heads

        if layout == "qwen3_5":
            self.in_proj_qkv = nn.Linear(d_model, self.conv_dim, bias=False, **factory)
            self.in_proj_z = nn.Linear(d_model, self.value_dim, bias=False, **factory)
            self.in_proj_b = nn.Linear(d_model, H, bias=False, **factory)
            self.in_proj_a = nn.Linear(d_model, H, bias=False, **factory)
        else:
            self.in_proj_qkvz = nn.Linear(d_model, self.conv_dim + self.value_dim, bias=False, **factory)
            self.in_proj_ba = nn.Linear(d_model, 2 * H, bias=False, **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=False, **factory)
        self.dt_bias = nn.Parameter(torch.ones(H, **factory))
        self.A_log = nn.Parameter(torch.empty(H, **factory))
        self.norm = HeadRMSNormGated(value_head_dim, norm_eps, **factory)
        self.out_proj = nn.Linear(self.value_dim, d_model, bias=False, **factory)
        self.hooks = nn.ModuleList()
        if self.A_log.device.type != "meta":
            with torch.no_grad():                   # transformers' initialisation: A uniform in [0.01, 16]
                self.A_log.copy_(torch.empty(H).uniform_(0.01, 16).log())

    # ------------------------------------------------------------------ the PEFT interface (model/interface.py)

    def projections(self, role: str) -> list[Projection]:
        """qwen3_5: "qkv", "z", "b", "a" (its four input layers), "in_proj" (all four), the row blocks "q", "k", "v"
        of in_proj_qkv, and Mamba's names for the parts that play the same role: "X" = v, "Z" = z, "B" = k,
        "C" = q, "dt" = a. qwen3_next: "qkvz", "ba", "in_proj" (both); its rows interleave q, k, v, z per key
        head, so no row block stands for one of them. Both: "out_proj"."""
        K, V, H = self.key_dim, self.value_dim, self.num_heads
        if role == "out_proj":
            return [Projection(self, "out_proj", (0, self.d_model))]
        if role in ("x_proj", "dt_proj"):
            raise self.not_applicable(role, "q, k, v, the gate z, beta's b and the decay's a come straight out of the "
                                            "input projections")
        if self.layout == "qwen3_5":
            layers = {"qkv": ("in_proj_qkv", self.conv_dim), "z": ("in_proj_z", V), "b": ("in_proj_b", H),
                      "a": ("in_proj_a", H)}
            layers.update({"Z": layers["z"], "dt": layers["a"]})
            if role in layers:
                attr, width = layers[role]
                return [Projection(self, attr, (0, width))]
            if role == "in_proj":
                return [Projection(self, layers[r][0], (0, layers[r][1])) for r in ("qkv", "z", "b", "a")]
            rows = {"q": (0, K), "k": (K, 2 * K), "v": (2 * K, 2 * K + V)}
            rows.update({"C": rows["q"], "B": rows["k"], "X": rows["v"]})
            if role in rows:
                return [Projection(self, "in_proj_qkv", rows[role])]
        else:
            layers = {"qkvz": ("in_proj_qkvz", self.conv_dim + V), "ba": ("in_proj_ba", 2 * H)}
            if role in layers:
                attr, width = layers[role]
                return [Projection(self, attr, (0, width))]
            if role == "in_proj":
                return [Projection(self, attr, (0, width)) for attr, width in layers.values()]
            if role in ("q", "k", "v", "z", "b", "a", "qkv", "X", "Z", "B", "C", "dt"):
                raise self.not_applicable(f"projection {role!r}", "Qwen3-Next's fused in_proj_qkvz and in_proj_ba "
                                          "interleave q, k, v, z (and b, a) per key head, so no block of rows is "
                                          "that part alone")
        raise self.not_applicable(f"projection {role!r}")

    def tensors(self, role: str) -> list[TensorSlot]:
        where = {"A_log": (self, "A_log"), "dt_bias": (self, "dt_bias"), "conv": (unwrap(self.conv1d), "weight"),
                 "norm": (unwrap(self.norm), "weight")}
        if role == "D":
            raise self.not_applicable("D", "the output is read from the state alone, with no skip of the input")
        if role not in where:
            raise self.not_applicable(f"tensor {role!r}")
        return [TensorSlot(*where[role])]

    def require_stage(self, stage: str, method: str) -> None:
        if stage == "extend_state":
            raise NotApplicable(f"{method}: {self.display_name} has no extra state dimensions to add: its state is a "
                                "d_k x d_v matrix per head written by the delta rule, not independent (channel, "
                                "state) pairs, so neither additional scan's extra A columns with B and C rows nor "
                                "SDT's selection of channels and states has a counterpart")
        super().require_stage(stage, method)

    def soft_token_width(self, stage: str) -> int:
        widths = {"before_in_proj": self.d_model, "after_in_proj": self.in_proj_width}
        if stage not in widths:
            return super().soft_token_width(stage)
        return widths[stage]

    @property
    def in_proj_width(self) -> int:
        """The input projections' outputs together: [q | k | v | z | b | a]."""
        return self.conv_dim + self.value_dim + 2 * self.num_heads

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.num_heads, self.key_head_dim, self.head_dim)

    @property
    def channel_shape(self) -> tuple[int, ...]:
        return (self.num_heads, self.head_dim)

    # ------------------------------------------------------------------ forward

    def _project(self, h: torch.Tensor):
        """h (b, L, d) -> qkv (b, L, 2 H_k d_k + H d_v) in the conv's channel order, z (b, L, H, d_v), b and a
        (b, L, H)."""
        bsz, length = h.shape[:2]
        H, Hk, dv = self.num_heads, self.num_key_heads, self.head_dim
        if self.layout == "qwen3_5":
            qkv, z = self.in_proj_qkv(h), self.in_proj_z(h)
            b, a = self.in_proj_b(h), self.in_proj_a(h)
        else:   # per key head: [q | k | v (R d_v) | z (R d_v)] and [b (R) | a (R)]
            R = H // Hk
            q, k, v, z = self.in_proj_qkvz(h).view(bsz, length, Hk, -1).split(
                [self.key_head_dim, self.key_head_dim, R * dv, R * dv], dim=-1)
            b, a = self.in_proj_ba(h).view(bsz, length, Hk, 2 * R).split([R, R], dim=-1)
            qkv = torch.cat([t.reshape(bsz, length, -1) for t in (q, k, v)], dim=-1)
            b, a = b.reshape(bsz, length, H), a.reshape(bsz, length, H)
        return qkv, z.reshape(bsz, length, H, dv), b, a

    def _gates(self, b: torch.Tensor, a: torch.Tensor, mask):
        """beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias) (b, L, H); zero on padding (see the docstring)."""
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        if mask is not None:
            pad = mask[:, :, None] == 0
            beta, g = beta.masked_fill(pad, 0.0), g.masked_fill(pad, 0.0)
        return g, beta

    def _split_heads(self, qkv: torch.Tensor):
        """(b, L, conv_dim) -> q, k (b, L, H_k, d_k), v (b, L, H, d_v)."""
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        return (q.unflatten(-1, (self.num_key_heads, self.key_head_dim)),
                k.unflatten(-1, (self.num_key_heads, self.key_head_dim)),
                v.unflatten(-1, (self.num_heads, self.head_dim)))

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None,
                state: GatedDeltaNetState | None = None) -> torch.Tensor:
        """hidden_states (b, L, d) -> (b, L, d). mask (b, L): 1 for real tokens, 0 for padding. state: continue from
        it and update it (generation); a single token that continues a state takes the one-step path.

        Soft tokens (hooks' `tokens`): stage "before_in_proj" inserts (n, d) into the input, stage "after_in_proj"
        (n, 2 H_k d_k + 2 H d_v + 2 H) into the projections' outputs [q | k | v | z | b | a] (qwen3_5's order, for
        both layouts); both are dropped again before out_proj. Only a fresh sequence gets them (offset 0)."""
        offset = state.offset if state is not None else 0
        length = hidden_states.shape[1]
        h = _masked(hidden_states, mask)
        h, mask, kept = insert_from_hooks(self.hooks, "before_in_proj", 0, h, mask, offset)       # (b, L1, d)
        qkv, z, b, a = self._project(h)
        if any(hook.tokens("after_in_proj", 0, qkv.shape[1], offset) is not None for hook in self.hooks):
            joined = torch.cat([qkv, z.flatten(-2), b, a], dim=-1)                     # (b, L1, in_proj_width)
            joined, mask, kept_after = insert_from_hooks(self.hooks, "after_in_proj", 0, joined, mask, offset)
            qkv, z, b, a = joined.split([self.conv_dim, self.value_dim, self.num_heads, self.num_heads], dim=-1)
            z = z.unflatten(-1, (self.num_heads, self.head_dim))
            kept = kept + kept_after
        if state is not None and qkv.shape[1] == 1 and state.ssm is not None and state.conv is not None:
            out = self._step(qkv, z, b, a, state, mask)
        else:
            bsz = qkv.shape[0]
            qkv = F.silu(self._causal_conv(qkv, state))                                 # (b, L2, conv_dim)
            q, k, v = self._split_heads(qkv)
            g, beta = self._gates(b, a, mask)
            h0 = state.ssm if state is not None and state.ssm is not None else self._initial_state(bsz)
            o, last = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=state is not None,
                                       use_qk_l2norm=True)                              # (b, L2, H, d_v)
            if state is not None:
                state.ssm = last
            out = self.norm(self._add_offsets(o, q), z).flatten(-2)                     # (b, L2, H d_v)
        if state is not None:
            state.offset += length                                                      # real tokens only
        return self.out_proj(drop_inserted(out, kept))                                  # (b, L, d)

    def _causal_conv(self, qkv: torch.Tensor, state: GatedDeltaNetState | None) -> torch.Tensor:
        """Depthwise conv over time that sees only the past; with a state, continues from its last inputs."""
        length = qkv.shape[1]
        xt = qkv.mT                                                                     # (b, conv_dim, L)
        if state is None:
            return self.conv1d(xt)[..., :length].mT
        past = self.d_conv - 1
        if state.conv is None:
            state.conv = xt.new_zeros(xt.shape[0], self.conv_dim, past)
        full = torch.cat([state.conv.to(xt.dtype), xt], dim=-1)                         # (b, conv_dim, K-1+L)
        state.conv = full[..., full.shape[-1] - past:]
        return self.conv1d(full)[..., past: past + length].mT

    def _initial_state(self, batch: int) -> torch.Tensor | None:
        """The hooks' initial state (b, H, d_k, d_v), or None (zeros)."""
        starts = [h0 for hook in self.hooks if (h0 := hook.initial_state(0)) is not None]
        if not starts:
            return None
        h0 = sum(starts)
        return h0.float().expand(batch, *h0.shape)

    def _add_offsets(self, o: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """o (b, L, H, d_v) plus the hooks' state offsets: h' (H, d_k, d_v) read by the query as the state is
        (l2-normalised, scaled by 1/sqrt(d_k), repeated to the value heads), or y' (H, d_v)."""
        for hook in self.hooks:
            found = hook.state_offset(0)
            if found is None:
                continue
            kind, value = found
            if kind == "h":
                read = l2_normalize(q.float()) * self.key_head_dim**-0.5                     # (b, L, H_k, d_k)
                read = read.repeat_interleave(self.num_heads // self.num_key_heads, dim=2)   # (b, L, H, d_k)
                o = o + torch.einsum("blhk,hkv->blhv", read, value.float()).to(o.dtype)
            else:
                o = o + value.to(o.dtype)
        return o

    def step(self, hidden_states: torch.Tensor, state: GatedDeltaNetState,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """One token continuing `state`: hidden_states (b, 1, d) -> (b, 1, d). The conv runs on the window of the
        last K inputs and the recurrence advances one step (no chunked scan); the state's tensors are replaced, not
        written in place, so a state can be branched from or differentiated through."""
        out = self._step(*self._project(_masked(hidden_states, mask)), state, mask)
        state.offset += 1
        return self.out_proj(out)

    def _step(self, qkv, z, b, a, state: GatedDeltaNetState, mask) -> torch.Tensor:
        """The one-token recurrence on projected inputs: qkv (b, 1, conv_dim), z (b, 1, H, d_v), b and a (b, 1, H)
        -> the gated norm's output (b, 1, H d_v)."""
        bsz = qkv.shape[0]
        past = self.d_conv - 1
        conv = state.conv if state.conv is not None else qkv.new_zeros(bsz, self.conv_dim, past)
        window = torch.cat([conv.to(qkv.dtype), qkv.mT], dim=-1)                        # (b, conv_dim, K)
        state.conv = window[..., 1:]
        qkv = F.silu(self.conv1d(window)[..., past: past + 1].mT)                        # (b, 1, conv_dim)
        q, k, v = self._split_heads(qkv)
        g, beta = self._gates(b, a, mask)
        ssm = state.ssm if state.ssm is not None else self._initial_state(bsz)
        o, state.ssm = gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], ssm, use_qk_l2norm=True)
        o = self._add_offsets(o[:, None], q)                                            # (b, 1, H, d_v)
        return self.norm(o, z).flatten(-2)


def mixer_from_config(config, device=None, dtype=None) -> GatedDeltaNetMixer:
    """A mixer for a transformers Qwen3_5TextConfig or Qwen3NextConfig (the layout follows its model_type)."""
    layout = "qwen3_next" if getattr(config, "model_type", "") == "qwen3_next" else "qwen3_5"
    return GatedDeltaNetMixer(
        config.hidden_size,
        num_key_heads=config.linear_num_key_heads,
        num_value_heads=config.linear_num_value_heads,
        key_head_dim=config.linear_key_head_dim,
        value_head_dim=config.linear_value_head_dim,
        d_conv=config.linear_conv_kernel_dim,
        norm_eps=config.rms_norm_eps,
        layout=layout,
        device=device,
        dtype=dtype,
    )
