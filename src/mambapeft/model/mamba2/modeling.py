"""The Mamba-2 language model: its mixer, and the model around it, on our own module tree.

Shapes: batch b, length L, model width d, inner width E = expand * d, H = E / P heads of P channels, G groups
(H % G == 0), state size N, conv kernel K. Parameter names are those of transformers' Mamba2ForCausalLM and
mamba_ssm's Mamba2, so checkpoints of both load as they are.

    h (b, L, d) --in_proj--> [z (E) | x (E) | B (G N) | C (G N) | dt (H)]            rows in this order
    xBC = [x | B | C] --causal depthwise conv1d over E + 2GN channels--> silu
    y = ssd_scan(x (b, L, H, P), dt, A = -exp(A_log) (H), B, C (b, L, G, N), D (H), dt_bias (H), softplus)
    y = norm.weight * rms_norm_per_group(y * silu(z))       gated RMSNorm, G groups of E/G channels
    out = out_proj(y)                                        (b, L, d)

What Mamba-2 changes against Mamba-1 (mixer.py): A is one scalar per head (not an (E, N) matrix), B, C and dt come
straight out of in_proj (no x_proj, no dt_proj: dt_bias is a parameter of its own), B and C pass through the conv
with x, and the gate is folded into a grouped RMSNorm before out_proj. Head h reads B and C of group h // (H/G).

Extension points, the same as those of the Mamba-1 mixer, so that PEFT methods plug in the same way:

* in_proj, conv1d, norm and out_proj are *called as modules*; their weights are never read here, so a wrapper
  (LoRA on in_proj or on a row block of it: z, x, B, C or dt) cannot be bypassed. No fused kernel that takes raw
  weights is used (mamba_ssm's `mamba_split_conv1d_scan_combined` would skip the wrappers).
* A_log, D, dt_bias, conv1d.weight and norm.weight are read as attributes at every call, so
  `torch.nn.utils.parametrize` can add a delta to any of them (partial tuning).
* `hooks` hold `PeftHook`s inserting soft tokens "before_in_proj" (width d) or "after_in_proj" (width of the
  in_proj output, 2E + 2GN + H), dropped again before out_proj (affix tuning); adding state dimensions to every
  group (`extra_channels`: more B and C channels of their own, computed from in_proj's input, with a conv and a
  conv state of their own; additional scan); giving the scan an initial state (H, P, N) and adding state offsets
  before the gated norm: h' (H, P, N) read through the group's C_t, or y' (H, P) (state-based tuning).

The model around the mixers is MambaLM's (lm.py): pre-norm residual blocks in float32, final norm, tied head.
Generation keeps one `Mamba2MixerState` per layer; a length-1 forward with a state takes the single-step path
(one conv window, one recurrence step, as mamba_ssm's `Mamba2.step`), anything longer the chunked scan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...scan.ssd import NO_LIMIT, ssd_scan
from ..hooks import drop_inserted, insert_from_hooks, masked
from ..interface import PeftMixerInterface, Projection, TensorSlot, unwrap
from ..mamba import MambaLM, MambaState


@dataclass
class Mamba2MixerState:
    """What a new token needs from the past of one Mamba-2 mixer (generation)."""

    conv: torch.Tensor | None = None   # (b, E + 2GN, K-1): the last K-1 inputs of the causal conv (x, B and C)
    ssm: torch.Tensor | None = None    # (b, H, P, N): the scan state of every head (N plus any added states)
    offset: int = 0                    # real tokens consumed so far (inserted soft tokens not counted)
    extra: dict = field(default_factory=dict)   # hooks' own conv inputs (added B and C channels), by hook


class GatedRMSNorm(nn.Module):
    """mamba_ssm's RMSNormGated with norm_before_gate=False: weight * rms_norm(y * silu(z)), per group of channels.

    With G groups the normalisation runs over each group of E/G channels separately (as mamba_ssm's kernel
    and transformers' MambaRMSNormGated with group_size do); G = 1 is a plain RMSNorm over all E channels.
    """

    def __init__(self, d: int, group_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        if d % group_size:
            raise ValueError(f"the gated norm's width {d} is not a multiple of its group size {group_size}")
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gated = y.float() * F.silu(z.float())                                           # (..., E)
        groups = gated.unflatten(-1, (-1, self.group_size))                             # (..., G, E/G)
        normed = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.flatten(-2).to(y.dtype)


class Mamba2Mixer(nn.Module, PeftMixerInterface):
    display_name = "the Mamba-2 mixer"
    peft_stages = frozenset({"before_in_proj", "after_in_proj", "extend_state", "initial_state", "state_offset"})
    num_directions = 1

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        head_dim: int = 64,
        n_groups: int = 1,
        conv_bias: bool = True,
        bias: bool = False,
        norm_eps: float = 1e-5,
        chunk_size: int = 256,
        dt_limit: tuple[float, float] = NO_LIMIT,
        d_inner: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.d_model = d_model
        # d_inner: the inner width where it is not expand x d_model (Nemotron-H: mamba_num_heads x mamba_head_dim)
        self.d_inner = E = d_inner if d_inner is not None else expand * d_model
        if E % head_dim:
            raise ValueError(f"the inner width {E} (expand {expand} x d_model {d_model}) is not a multiple of "
                             f"head_dim {head_dim}")
        self.head_dim = P = head_dim
        self.num_heads = H = E // P
        if H % n_groups:
            raise ValueError(f"{H} heads cannot be split into {n_groups} groups of B and C")
        self.n_groups = G = n_groups
        self.d_state = N = d_state
        self.d_conv = d_conv
        self.conv_dim = E + 2 * G * N
        self.chunk_size = chunk_size          # for the CUDA kernel only
        self.dt_limit = tuple(dt_limit)
        factory = {"device": device, "dtype": dtype}

        self.in_proj = nn.Linear(d_model, 2 * E + 2 * G * N + H, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        self.dt_bias = nn.Parameter(torch.empty(H, **factory))
        self.A_log = nn.Parameter(torch.empty(H, **factory))
        self.D = nn.Parameter(torch.empty(H, **factory))
        self.norm = GatedRMSNorm(E, E // G, norm_eps, **factory)
        self.out_proj = nn.Linear(E, d_model, bias=bias, **factory)
        self.hooks = nn.ModuleList()
        if self.A_log.device.type != "meta":
            self.reset_ssm_parameters()

    # ------------------------------------------------------------------ the PEFT interface (model/interface.py)

    def projections(self, role: str) -> list[Projection]:
        E, G, N, H = self.d_inner, self.n_groups, self.d_state, self.num_heads
        rows = {"Z": (0, E), "X": (E, 2 * E), "B": (2 * E, 2 * E + G * N), "C": (2 * E + G * N, 2 * E + 2 * G * N),
                "dt": (2 * E + 2 * G * N, 2 * E + 2 * G * N + H), "in_proj": (0, 2 * E + 2 * G * N + H)}
        if role in rows:
            return [Projection(self, "in_proj", rows[role])]
        if role == "out_proj":
            return [Projection(self, "out_proj", (0, self.d_model))]
        if role in ("x_proj", "dt_proj"):
            raise self.not_applicable(role, "B, C and dt come straight out of in_proj's rows (lora_p_b, lora_p_c and "
                                            "lora_p_dt adapt those)")
        raise self.not_applicable(f"projection {role!r}")

    def tensors(self, role: str) -> list[TensorSlot]:
        where = {"A_log": (self, "A_log"), "D": (self, "D"), "dt_bias": (self, "dt_bias"),
                 "conv": (unwrap(self.conv1d), "weight"), "norm": (unwrap(self.norm), "weight")}
        if role not in where:
            raise self.not_applicable(f"tensor {role!r}")
        return [TensorSlot(*where[role])]

    def soft_token_width(self, stage: str) -> int:
        widths = {"before_in_proj": self.d_model, "after_in_proj": self.in_proj_width}
        if stage not in widths:
            return super().soft_token_width(stage)
        return widths[stage]

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.num_heads, self.head_dim, self.d_state)

    @property
    def channel_shape(self) -> tuple[int, ...]:
        return (self.num_heads, self.head_dim)

    @property
    def in_proj_width(self) -> int:
        return 2 * self.d_inner + 2 * self.n_groups * self.d_state + self.num_heads

    @torch.no_grad()
    def reset_parameters(self):
        for module in (self.in_proj, self.out_proj, self.conv1d):
            module.reset_parameters()
        self.reset_ssm_parameters()
        self.norm.weight.fill_(1.0)

    @torch.no_grad()
    def reset_ssm_parameters(self, A_range=(1.0, 16.0), dt_min: float = 1e-3, dt_max: float = 0.1,
                             dt_floor: float = 1e-4):
        """mamba_ssm's initialisation: A uniform in A_range per head, D = 1, dt log-uniform via dt_bias."""
        H = self.num_heads
        self.A_log.copy_(torch.empty(H).uniform_(*A_range).log())
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))     # inverse of softplus

    # ------------------------------------------------------------------ forward

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None,
                state: Mamba2MixerState | None = None) -> torch.Tensor:
        """hidden_states (b, L, d) -> (b, L, d).

        mask (b, L): 1 for real tokens, 0 for padding (zeroed before in_proj and after the conv, as transformers
        does). state: continue from it and update it (generation); a single token then takes the step path.
        """
        offset = state.offset if state is not None else 0
        length = hidden_states.shape[1]
        E, H, G, N = self.d_inner, self.num_heads, self.n_groups, self.d_state

        h = masked(hidden_states, mask)
        h, mask, kept = insert_from_hooks(self.hooks, "before_in_proj", 0, h, mask, offset)       # (b, L1, d)
        zxbcdt = self.scale_in_proj(self.in_proj(h))                                               # (b, L1, 2E+2GN+H)
        extra = [(hook, x) for hook in self.hooks if (x := hook.extra_channels(h)) is not None]   # (b, L1, 2Gn') each
        zxbcdt, mask, kept_after = insert_from_hooks(self.hooks, "after_in_proj", 0, zxbcdt, mask, offset)
        extra = [(hook, spread_like(x, kept_after)) for hook, x in extra]     # inserted tokens add nothing to them
        z, xBC, dt = zxbcdt.split([E, self.conv_dim, H], dim=-1)                                   # (b, L2, ...)
        b, L2 = xBC.shape[:2]

        if state is not None and L2 == 1:
            y = self._step(xBC, dt, mask, state, extra)                                            # (b, 1, H, P)
        else:
            xBC = masked(F.silu(self._causal_conv(xBC, state)), mask)                            # (b, L2, E+2GN)
            x, B, C = xBC.split([E, G * N, G * N], dim=-1)
            B, C = B.view(b, L2, G, N), C.view(b, L2, G, N)
            C_pretrained = C                                                                       # offsets read these
            for hook, channels in extra:                                                           # N -> n states
                more = masked(F.silu(hook.extra_conv(channels, state)), mask)                    # (b, L2, 2Gn')
                B, C = hook.join_states(B, C, more)
            fresh = state is None or state.ssm is None
            h0 = self._initial_state(b) if fresh else state.ssm                                    # (b, H, P, n)
            if fresh and h0 is not None and mask is not None:
                # a learned initial state meets the first real token: padding before it decays nothing (dt 0)
                dt = dt.masked_fill(mask[:, :, None] == 0, -1e4)
            out = ssd_scan(
                x.view(b, L2, H, self.head_dim), dt, -torch.exp(self.A_log.float()), B, C, D=self.D,
                dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit, initial_states=h0,
                return_final_states=state is not None, chunk_size=self.chunk_size,
            )
            if state is not None:
                out, state.ssm = out                                                               # (b, H, P, n)
            y = self._add_offsets(out, C_pretrained).to(x.dtype)                                   # (b, L2, H, P)
        y = drop_inserted(self.norm(y.reshape(b, L2, E), z), kept + kept_after)                   # (b, L, E)
        if state is not None:
            state.offset += length
        return self.out_proj(y)                                                                    # (b, L, d)

    def scale_in_proj(self, zxbcdt: torch.Tensor) -> torch.Tensor:
        """in_proj's output as the scan reads it: unchanged here; Falcon-H1's mixer multiplies its rows by the µP
        vector (model/falcon_h1), after in_proj and so after any adapter on in_proj, as transformers does."""
        return zxbcdt

    def in_proj_block_scale(self, role: str) -> float:
        """The factor `scale_in_proj` puts on in_proj's rows of block `role` (Z, X, B, C, dt): 1 here. A merge that
        writes new rows into in_proj divides them by it, so that they come out of the scaling as they went in."""
        return 1.0

    def _causal_conv(self, xBC: torch.Tensor, state: Mamba2MixerState | None) -> torch.Tensor:
        """Depthwise conv over time that sees only the past; with a state, continues from its last inputs."""
        length = xBC.shape[1]
        xt = xBC.mT                                                                   # (b, E+2GN, L)
        if state is None:
            return self.conv1d(xt)[..., :length].mT                                   # padding K-1, cut the tail
        past = self.d_conv - 1
        if state.conv is None:
            state.conv = xt.new_zeros(xt.shape[0], self.conv_dim, past)
        full = torch.cat([state.conv.to(xt.dtype), xt], dim=-1)                       # (b, E+2GN, K-1+L)
        state.conv = full[..., full.shape[-1] - past:]
        return self.conv1d(full)[..., past: past + length].mT

    def _initial_state(self, batch: int) -> torch.Tensor | None:
        """The hooks' initial state (b, H, P, n), the added states' part zero, or None (zeros)."""
        starts = [h0 for hook in self.hooks if (h0 := hook.initial_state(0)) is not None]
        if not starts:
            return None
        h0 = sum(starts)                                                              # (H, P, N)
        for hook in self.hooks:
            h0 = hook.extend_initial(0, h0)                                           # (H, P, n)
        return h0.float().expand(batch, *h0.shape)

    def _add_offsets(self, y: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        """y (b, L, H, P) plus the hooks' state offsets, before the gated norm: h' (H, P, N) through the head's
        group's C_t (b, L, G, N) of the pretrained states, or y' (H, P)."""
        H, G = self.num_heads, self.n_groups
        for hook in self.hooks:
            found = hook.state_offset(0)
            if found is None:
                continue
            kind, value = found
            if kind == "h":
                C_heads = C.float().repeat_interleave(H // G, dim=2)                # (b, L, H, N)
                y = y + torch.einsum("blhn,hpn->blhp", C_heads, value.float())
            else:
                y = y + value.float()
        return y

    def _step(self, xBC: torch.Tensor, dt: torch.Tensor, mask, state: Mamba2MixerState, extra=()) -> torch.Tensor:
        """One token from the recurrent state: one conv window and one recurrence step, no chunked scan.

        xBC (b, 1, E+2GN), dt (b, 1, H) -> y (b, 1, H, P) before the gated norm. The state's tensors are replaced,
        not written in place, so that a state can be differentiated through or branched from.
        """
        b = xBC.shape[0]
        E, H, G, N, P = self.d_inner, self.num_heads, self.n_groups, self.d_state, self.head_dim
        past = self.d_conv - 1
        if state.conv is None:
            state.conv = xBC.new_zeros(b, self.conv_dim, past)
        window = torch.cat([state.conv.to(xBC.dtype), xBC.mT], dim=-1)                # (b, E+2GN, K)
        state.conv = window[..., 1:]
        xBC = self.conv1d(window)[..., past: past + 1].mT                             # the output seeing the window
        xBC = masked(F.silu(xBC), mask)                                               # (b, 1, E+2GN)
        x, B, C = xBC[:, 0].float().split([E, G * N, G * N], dim=-1)
        x = x.view(b, H, P)
        B, C = B.view(b, 1, G, N), C.view(b, 1, G, N)
        C_pretrained = C
        for hook, channels in extra:                                                   # N -> n states
            more = masked(F.silu(hook.extra_conv(channels, state)), mask).float()
            B, C = hook.join_states(B, C, more)
        n = B.shape[-1]
        B = B.view(b, G, 1, n).expand(b, G, H // G, n).reshape(b, H, 1, n)           # head h reads group h // (H/G)
        C = C.view(b, G, 1, n).expand(b, G, H // G, n).reshape(b, H, n, 1)

        dt = F.softplus(dt[:, 0].float() + self.dt_bias.float())                      # (b, H)
        if self.dt_limit != NO_LIMIT:
            dt = dt.clamp(min=self.dt_limit[0], max=self.dt_limit[1])
        decay = torch.exp(dt * -torch.exp(self.A_log.float()))                        # (b, H)
        ssm = state.ssm if state.ssm is not None else self._initial_state(b)
        ssm = ssm if ssm is not None else x.new_zeros(b, H, P, n)
        ssm = decay[..., None, None] * ssm + (dt[..., None] * x)[..., None] * B      # (b, H, P, n)
        state.ssm = ssm
        y = (ssm @ C).squeeze(-1) + self.D.float()[:, None] * x                        # (b, H, P)
        return self._add_offsets(y[:, None], C_pretrained).to(xBC.dtype)             # (b, 1, H, P)


def spread_like(t: torch.Tensor, kept_list: list[torch.Tensor]) -> torch.Tensor:
    """t (b, L, w) laid out in a sequence lengthened by inserted soft tokens (`kept`: where the original positions
    went), zeros at the inserted positions."""
    for kept in kept_list:
        longer = t.new_zeros(t.shape[0], int(kept.max()) + 1 if kept.numel() else 0, t.shape[2])
        t = longer.index_copy(1, kept, t)
    return t


def mixer_from_config(config, device=None, dtype=None) -> Mamba2Mixer:
    """A mixer for a transformers Mamba2Config (Mamba-1's `mixer_from_config` reads the same field names for the
    sizes the two configs share; each maps its own config class, so neither reaches into the other)."""
    return Mamba2Mixer(
        config.hidden_size,
        d_state=config.state_size,
        d_conv=config.conv_kernel,
        expand=config.expand,
        head_dim=config.head_dim,
        n_groups=config.n_groups,
        conv_bias=config.use_conv_bias,
        bias=config.use_bias,
        norm_eps=config.layer_norm_epsilon,
        chunk_size=config.chunk_size,
        dt_limit=tuple(config.time_step_limit),
        device=device,
        dtype=dtype,
    )


class Mamba2LM(MambaLM):
    """Mamba-2 causal language model (`config`: a transformers Mamba2Config): MambaLM's model around Mamba-2 mixers."""

    family = "mamba2"
    fingerprint_keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "state_size", "conv_kernel",
                        "expand", "num_heads", "head_dim", "n_groups", "use_bias", "use_conv_bias")

    @staticmethod
    def mixer_factory(config, device=None, dtype=None):
        return mixer_from_config(config, device=device, dtype=dtype)

    def __init__(self, config, device=None, dtype=None):
        if config.num_heads * config.head_dim != config.expand * config.hidden_size:
            raise ValueError(f"num_heads {config.num_heads} x head_dim {config.head_dim} must equal expand "
                             f"{config.expand} x hidden_size {config.hidden_size}")
        super().__init__(config, device=device, dtype=dtype)

    def new_state(self) -> MambaState:
        return MambaState([Mamba2MixerState() for _ in self.backbone.layers])
