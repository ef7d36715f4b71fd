"""The Mamba-1 mixer: the one place where the block's math lives.

Shapes: batch b, length L, model width d, inner width E = expand * d, state size N, dt rank R, conv kernel K.
Names are those of transformers' MambaMixer, mamba_ssm's Mamba and Vim, so checkpoints load as they are.

    h (b, L, d) --in_proj--> [X | Z] (b, L, 2E)          X: first E outputs, Z: last E
    X --causal depthwise conv1d--> silu --> x (b, L, E)
    x --x_proj--> [dt_low (R) | B (N) | C (N)]           rows in this order
    [Jamba: dt_low, B, C through RMS norms with weights of their own: dt_layernorm, b_layernorm, c_layernorm]
    dt = dt_proj(dt_low)   (softplus inside the scan)    A = -exp(A_log) (E, N)    D (E)
    y = scan(x, dt, A, B, C, D) * silu(Z)                (b, L, E)
    out = out_proj(y)                                    (b, L, d)

Extension points, so that PEFT methods plug in without editing this file:

* Every projection (in_proj, conv1d, x_proj, dt_proj, out_proj) is *called as a module* and its weights are
  never read here. A method may replace one with a wrapper (LoRA on the whole layer or on a row block of
  it, a parallel branch beside out_proj) and no code path can bypass the wrapper.
* A_log, D, conv1d.weight and dt_proj.bias are read as attributes at every call, so
  `torch.nn.utils.parametrize` can add a zero-initialised delta to any of them (partial tuning).
* `hooks` hold `PeftHook`s (model/hooks.py): soft tokens inserted before or after in_proj and dropped again before
  out_proj (affix tuning), and extra state dimensions (extra columns of A, extra B and C rows: additional scan).
* a hook's `gate` transforms the gate's input Z before silu (Memba's membrane neurons), once per forward and before
  the directions, so Vim's two directions share one gate as they share silu(z).
* `step` is the one-token path of generation (mamba_ssm's forward/step split): the same modules and tensors,
  called on the last K conv inputs and one step of the recurrence instead of the chunked scan. `forward`
  takes it by itself for a length-1 input that continues a state.
* `bidirectional=True` builds Vim's "v2" block: the backward direction has its own conv1d_b, x_proj_b,
  dt_proj_b, A_b_log and D_b and scans the flipped sequence; in_proj, the gate and out_proj are shared and the
  two directions' outputs are averaged. `DIRECTION_NAMES` maps each direction to its attribute names, so a
  method that targets "A_log" handles both directions with the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...scan import selective_scan
from ..hooks import PeftHook, drop_inserted, insert_from_hooks, masked
from ..interface import PeftMixerInterface, Projection, TensorSlot, unwrap

# Per-direction parameter names: index 0 is the (only) forward direction, index 1 Vim's backward one.
DIRECTION_NAMES = (
    {"conv1d": "conv1d", "x_proj": "x_proj", "dt_proj": "dt_proj", "A_log": "A_log", "D": "D"},
    {"conv1d": "conv1d_b", "x_proj": "x_proj_b", "dt_proj": "dt_proj_b", "A_log": "A_b_log", "D": "D_b"},
)
@dataclass
class MixerState:
    """What a new token needs from the past of one mixer (generation): the recurrent state.

    The first pass over a sequence allocates both buffers; every `step` after it overwrites them in place, so
    copy a state (`MambaState.select`) to keep it.
    """

    conv: torch.Tensor | None = None   # (b, E, K-1): the last K-1 inputs of the causal conv
    ssm: torch.Tensor | None = None    # (b, E, n) float32 (float64 models: float64): the scan state; n = N + extra
    offset: int = 0                    # real tokens consumed so far (inserted soft tokens not counted)
    extra: dict = field(default_factory=dict)   # hooks' own recurrent values (Memba's membrane potential), by hook


def _rms(t: torch.Tensor, eps: float) -> torch.Tensor:
    """Weight-free RMS norm over the last axis (FalconMamba's norms on dt, B and C)."""
    t32 = t.float()
    return (t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + eps)).to(t.dtype)


class WeightedRMSNorm(nn.Module):
    """weight * rms_norm(t) over the last axis, computed in float32 (transformers' JambaRMSNorm's math)."""

    def __init__(self, d: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.weight * _rms(t, self.eps)


class MambaMixer(nn.Module, PeftMixerInterface):
    peft_stages = frozenset({"before_in_proj", "after_in_proj", "extend_state", "initial_state", "state_offset",
                             "gate"})

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        conv_bias: bool = True,
        bias: bool = False,
        bidirectional: bool = False,
        bcdt_rms_eps: float | None = None,
        bcdt_norm_eps: float | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_inner = E = expand * d_model
        self.d_state = N = d_state
        self.d_conv = d_conv
        self.dt_rank = R = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.bidirectional = bidirectional
        self.bcdt_rms_eps = bcdt_rms_eps     # FalconMamba only
        factory = {"device": device, "dtype": dtype}

        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias, **factory)
        for names in DIRECTION_NAMES[: self.num_directions]:
            conv = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1, bias=conv_bias, **factory)
            setattr(self, names["conv1d"], conv)
            setattr(self, names["x_proj"], nn.Linear(E, R + 2 * N, bias=False, **factory))
            setattr(self, names["dt_proj"], nn.Linear(R, E, bias=True, **factory))
            setattr(self, names["A_log"], nn.Parameter(torch.empty(E, N, **factory)))
            setattr(self, names["D"], nn.Parameter(torch.empty(E, **factory)))
        self.out_proj = nn.Linear(E, d_model, bias=bias, **factory)
        # Jamba's RMS norms on dt_low, B and C, each with a weight (transformers' JambaMambaMixer names): they sit
        # between x_proj and the scan, so LoRA on x_proj (or its dt/B/C rows) feeds them as it feeds Jamba's own.
        # None (the default) everywhere else, which leaves the Mamba-1 math as it was.
        self.bcdt_norm_eps = bcdt_norm_eps
        if bcdt_norm_eps is not None:
            if bidirectional:
                raise ValueError("dt/B/C norms (Jamba) are for a unidirectional mixer")
            self.dt_layernorm = WeightedRMSNorm(R, bcdt_norm_eps, **factory)
            self.b_layernorm = WeightedRMSNorm(N, bcdt_norm_eps, **factory)
            self.c_layernorm = WeightedRMSNorm(N, bcdt_norm_eps, **factory)
        self.hooks = nn.ModuleList()
        if self.A_log.device.type != "meta":
            self.reset_ssm_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def display_name(self) -> str:
        return "Vision Mamba's mixer" if self.bidirectional else "the Mamba-1 mixer"

    # ------------------------------------------------------------------ the PEFT interface (model/interface.py)

    def projections(self, role: str) -> list[Projection]:
        E, R, N = self.d_inner, self.dt_rank, self.d_state
        blocks = {"X": ("in_proj", (0, E)), "Z": ("in_proj", (E, 2 * E)),
                  "dt": ("x_proj", (0, R)), "B": ("x_proj", (R, R + N)), "C": ("x_proj", (R + N, R + 2 * N))}
        layer, rows = blocks.get(role, (role, None))
        if layer not in ("in_proj", "x_proj", "dt_proj", "out_proj"):
            raise self.not_applicable(f"projection {role!r}")
        directions = range(self.num_directions) if layer in DIRECTION_NAMES[0] else [0]
        found = []
        for d in directions:
            attr = DIRECTION_NAMES[d][layer] if layer in DIRECTION_NAMES[0] else layer
            out_rows = rows or (0, unwrap(getattr(self, attr)).weight.shape[0])
            found.append(Projection(self, attr, out_rows, d))
        return found

    def tensors(self, role: str) -> list[TensorSlot]:
        where = {"A_log": ("A_log", None), "D": ("D", None), "conv": ("conv1d", "weight"),
                 "dt_bias": ("dt_proj", "bias")}
        if role == "norm":
            raise self.not_applicable("gated norm", "Mamba-1 gates with silu(z) alone; Mamba-2 has the norm")
        if role not in where:
            raise self.not_applicable(f"tensor {role!r}")
        name, inside = where[role]
        slots = []
        for d in range(self.num_directions):
            attr = DIRECTION_NAMES[d][name]
            slots.append(TensorSlot(unwrap(getattr(self, attr)), inside, d) if inside else TensorSlot(self, attr, d))
        return slots

    def soft_token_width(self, stage: str) -> int:
        widths = {"before_in_proj": self.d_model, "after_in_proj": 2 * self.d_inner}
        if stage not in widths:
            return super().soft_token_width(stage)
        return widths[stage]

    def direction_parts(self, direction: int):
        """(conv1d, x_proj, dt_proj, A_log, D) of one direction, read now so wrappers and deltas apply."""
        names = DIRECTION_NAMES[direction]
        return tuple(getattr(self, names[k]) for k in ("conv1d", "x_proj", "dt_proj", "A_log", "D"))

    @torch.no_grad()
    def reset_parameters(self):
        """Every weight as mamba_ssm initialises it (nn.Linear / nn.Conv1d defaults, then the SSM parameters)."""
        directions = [DIRECTION_NAMES[d] for d in range(self.num_directions)]
        for layer in [self.in_proj] + [getattr(self, n["x_proj"]) for n in directions] + [self.out_proj]:
            layer.reset_parameters()
        for names in directions:
            getattr(self, names["conv1d"]).reset_parameters()
        if self.bcdt_norm_eps is not None:
            for norm in (self.dt_layernorm, self.b_layernorm, self.c_layernorm):
                norm.weight.fill_(1.0)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4):
        """mamba_ssm's initialisation: S4D-real A, D = 1, dt log-uniform in [dt_min, dt_max] via the bias."""
        for direction in range(self.num_directions):
            _, _, dt_proj, A_log, D = self.direction_parts(direction)
            A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.d_inner, -1))
            D.fill_(1.0)
            nn.init.uniform_(dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))    # inverse of softplus

    # ------------------------------------------------------------------ forward

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None, state: MixerState | None = None):
        """hidden_states (b, L, d) -> (b, L, d).

        mask (b, L): 1 for real tokens, 0 for padding. state: continue from it and update it in place
        (generation; unidirectional mixers only).
        """
        if state is not None and self.bidirectional:
            raise ValueError("a bidirectional (Vim) mixer has no recurrent state: pass state=None")
        if state is not None and hidden_states.shape[1] == 1 and self._can_step(state):
            return self.step(hidden_states, state, mask)
        offset = state.offset if state is not None else 0
        length = hidden_states.shape[1]

        h = masked(hidden_states, mask)
        h, mask, kept = insert_from_hooks(self.hooks, "before_in_proj", 0, h, mask, offset)           # (b, L1, d)
        xz = self._gate(self.in_proj(h), mask, state)                               # (b, L1, 2E)
        y = self._scan_direction(0, xz, mask, state, offset)                        # (b, L1, E)
        if self.bidirectional:
            flipped_mask = mask.flip(1) if mask is not None else None
            y_b = self._scan_direction(1, xz.flip(1), flipped_mask, None, offset)
            y = (y + y_b.flip(1)) / 2
        y = drop_inserted(y, kept)                                                  # (b, L, E)
        if state is not None:
            state.offset += length
        return self.out_proj(y)                                                     # (b, L, d)

    def _scan_direction(self, direction: int, xz: torch.Tensor, mask, state: MixerState | None, offset: int):
        """One direction: conv, x_proj, dt, scan and gate. xz (b, L, 2E) -> y (b, L, E)."""
        conv1d, x_proj, dt_proj, A_log, D = self.direction_parts(direction)
        # soft tokens enter here
        xz, mask, kept = insert_from_hooks(self.hooks, "after_in_proj", direction, xz, mask, offset)
        x, z = xz.chunk(2, dim=-1)                                                  # (b, L2, E) each
        x = masked(F.silu(self._causal_conv(conv1d, x, state)), mask)             # (b, L2, E)

        dt_low, B, C = x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)   # (b, L2, R | N | N)
        dt_low, B, C = self._bcdt_norms(dt_low, B, C)
        C_pretrained = C                                                            # state offsets read these
        for hook in self.hooks:
            A_log, B, C = hook.extend_state(direction, x, A_log, B, C)             # N -> n states
        dt = dt_proj(dt_low)                                                        # (b, L2, E)
        A = -torch.exp(A_log.float())                                               # (E, n)

        fresh = state is None or state.ssm is None
        h0 = self._initial_state(direction, x) if fresh else state.ssm             # (b, E, n) or None (zeros)
        if fresh and h0 is not None and mask is not None:
            # a learned initial state enters where the real tokens start: padding before them leaves it as it is
            dt = dt.masked_fill(mask[:, :, None] == 0, -1e4)                        # softplus(-1e4) = 0: no decay
        out = selective_scan(
            x.mT, dt.mT, A, B.mT, C.mT, D=D.float(), z=z.mT, delta_softplus=True,
            initial_state=h0, return_last_state=state is not None,
        )
        if state is not None:
            out, state.ssm = out                                                    # (b, E, n)
        y = out.mT.to(x.dtype)                                                      # (b, L2, E)
        offset = self._offset(direction, C_pretrained)                              # (b, L2, E) or None
        if offset is not None:
            y = y + (offset * F.silu(z)).to(y.dtype)                                # gated like the scan's output
        return drop_inserted(y, kept)                                               # soft tokens leave here

    def _gate(self, xz: torch.Tensor, mask, state: MixerState | None) -> torch.Tensor:
        """The hooks' transforms of Z, the gate's input (silu follows in the scan): xz (b, L, 2E) -> (b, L, 2E)."""
        gates = [hook for hook in self.hooks if type(hook).gate is not PeftHook.gate]
        if not gates:
            return xz
        x, z = xz.chunk(2, dim=-1)                                                  # (b, L, E) each
        for hook in gates:
            z = hook.gate(z, mask, state)
        return torch.cat([x, z], dim=-1)

    def _bcdt_norms(self, dt_low, B, C):
        """FalconMamba's weight-free norms or Jamba's weighted ones on x_proj's outputs, where the model has them."""
        if self.bcdt_rms_eps is not None:
            return tuple(_rms(t, self.bcdt_rms_eps) for t in (dt_low, B, C))
        if self.bcdt_norm_eps is not None:
            return self.dt_layernorm(dt_low), self.b_layernorm(B), self.c_layernorm(C)
        return dt_low, B, C

    def _offset(self, direction: int, C: torch.Tensor) -> torch.Tensor | None:
        """The hooks' state offsets before the gate: C_t h' (C (b, L, N) of the pretrained states, h' (E, N)) or y'."""
        total = None
        for hook in self.hooks:
            found = hook.state_offset(direction)
            if found is not None:
                kind, value = found
                term = C @ value.mT.to(C.dtype) if kind == "h" else value.to(C.dtype)
                total = term if total is None else total + term
        return total

    def _initial_state(self, direction: int, x: torch.Tensor) -> torch.Tensor | None:
        """The hooks' initial state for a fresh sequence, (b, E, n) with the added states' part zero, or None."""
        starts = [h0 for hook in self.hooks if (h0 := hook.initial_state(direction)) is not None]
        if not starts:
            return None
        h0 = sum(starts)                                                            # (E, N)
        for hook in self.hooks:
            h0 = hook.extend_initial(direction, h0)                                 # (E, n)
        return h0.to(torch.promote_types(x.dtype, torch.float32)).expand(x.shape[0], -1, -1)

    def _causal_conv(self, conv1d: nn.Module, x: torch.Tensor, state: MixerState | None) -> torch.Tensor:
        """Depthwise conv over time that sees only the past; with a state, continues from its last inputs."""
        length = x.shape[1]
        xt = x.mT                                                                   # (b, E, L)
        if state is None:
            return conv1d(xt)[..., :length].mT                                      # padding K-1, cut the tail
        past = self.d_conv - 1
        if state.conv is None:
            state.conv = xt.new_zeros(xt.shape[0], self.d_inner, past)
        full = torch.cat([state.conv.to(xt.dtype), xt], dim=-1)                     # (b, E, K-1+L)
        state.conv = full[..., full.shape[-1] - past:].clone()                      # its own buffer, for `step`
        return conv1d(full)[..., past: past + length].mT

    # ------------------------------------------------------------------ one token

    def _can_step(self, state: MixerState) -> bool:
        """Whether a length-1 input may take `step`: the state holds a past, no autograd graph is recorded
        (step overwrites the state), and no hook inserts tokens here (a prefix is in the state already)."""
        if state.ssm is None or state.conv is None or torch.is_grad_enabled():
            return False
        return all(hook.tokens(stage, 0, 1, state.offset) is None
                   for hook in self.hooks for stage in ("before_in_proj", "after_in_proj"))

    def step(self, hidden_states: torch.Tensor, state: MixerState, mask: torch.Tensor | None = None) -> torch.Tensor:
        """One token continuing `state`: hidden_states (b, 1, d) -> (b, 1, d); the state is updated in place.

        The math of `forward` for a length-1 input (tested equal), without the scan call and its chunking: the
        conv runs on the window of the last K inputs, the recurrence advances one step. The modules and tensors
        are the same ones, read the same way, so every adapter applies. For inference (no autograd graph).
        """
        conv1d, x_proj, dt_proj, A_log, D = self.direction_parts(0)
        xz = self._gate(self.in_proj(masked(hidden_states, mask)), mask, state)    # (b, 1, 2E)
        x, z = xz.chunk(2, dim=-1)                                                  # (b, 1, E) each
        window = torch.cat([state.conv, x.mT], dim=-1)                              # (b, E, K)
        state.conv.copy_(window[..., 1:])
        x = conv1d(window)[..., self.d_conv - 1: self.d_conv].mT                    # (b, 1, E) the window's output
        x = masked(F.silu(x), mask)

        dt_low, B, C = x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)   # (b, 1, R | N | N)
        dt_low, B, C = self._bcdt_norms(dt_low, B, C)
        C_pretrained = C                                                            # state offsets read these
        for hook in self.hooks:
            A_log, B, C = hook.extend_state(0, x, A_log, B, C)                     # N -> n states
        compute = state.ssm.dtype                                                   # float32 (float64 models: float64)
        A = -torch.exp(A_log.float()).to(compute)                                   # (E, n)
        dt = F.softplus(dt_proj(dt_low)[:, 0].to(compute))                          # (b, E)
        u = x[:, 0].to(compute)                                                     # (b, E)

        # s = exp(dt A) s + dt B u;  y = <s, C> + D u, gated by silu(z)
        drive = (dt * u)[:, :, None] * B.to(compute)                                # (b, E, n)
        state.ssm.copy_(drive.addcmul_(torch.exp(dt[:, :, None] * A), state.ssm))
        y = (state.ssm @ C.to(compute).mT).squeeze(-1) + u * D.to(compute)          # (b, E)
        offset = self._offset(0, C_pretrained)                                      # (b, 1, E), (E,) or None
        if offset is not None:
            y = y + (offset[:, 0] if offset.dim() == 3 else offset).to(compute)
        y = y * F.silu(z[:, 0].to(compute))
        state.offset += 1
        return self.out_proj(y.to(x.dtype)[:, None])                                # (b, 1, d)
