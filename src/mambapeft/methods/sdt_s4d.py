"""SDT on S4D: the strategy `sdt` (methods/sdt.py) runs when the mixers offer S4D's tensor roles.

As the SDT paper's S4 experiments define it (furiosa-ai/ssm-peft, S4/run_s4.py L379-435, L478-570), per layer:

    warm-up (warmup_steps optimiser steps):  C + dC, log_A_real + da, A_imag + db     dense deltas, all (H, N)
    selection, from the warmed-up layer (dt = exp(log_dt), A = -exp(log_A_real) + i A_imag):
        score[h, n]  = | C~[h, n] exp(dt A[h, n] * (L // 2)) |      C~ = C (exp(dt A) - 1) / A   (L: `horizon`)
        usable       channels: the top usable_channel_fraction of H by ||score[h, :]||
                     states:   in each usable channel, the top usable_state_fraction of N by score[h, n]
        dA[h, n]     = | A_warm[h, n] - A_frozen[h, n] |            (complex)
        updatable    channels: among the usable ones, the top channel_fraction of H by ||dA[h, :]||
                     states:   among each updatable channel's usable states, the top state_fraction of N by dA[h, n]
    then:   C[h, n] = 0 wherever (h, n) is not usable                     (a mask, saved with the adapter)
            C, log_A_real, A_imag + zero-initialised deltas on the updatable (channel, state) pairs only
            with out_proj=true: + a dense delta on the output linear's columns of the updatable channels

The warm-up change is thrown away at the selection unless `keep_warmup` (the authors reset the model to the frozen
one). Sizes round as SDT's on Mamba: dim - round((1 - fraction) * dim), at least 1. Ties go to the lower index.
The indices and the mask are buffers of the adapter, so a saved adapter reloads exactly.

Where ours differs from the official code, and why:
  * The warm-up trains the three tensors the selection reads (C, log_A_real, A_imag), with whatever other methods
    the config holds. The official default warms up every weight (its README's SDLoRA recipe: the SSM and D); the
    other weights' warm-up change is thrown away in both, and SDT stays the only method on the tensors it owns.
  * The usable score uses the complex A. The official `select_dims_hard` adds the real and imaginary parts as real
    numbers (`A = A_real + A_imag`), so its C~ and powers are those of a real A.
  * dA compares A with A: the official code subtracts exp(log_A_real) of the frozen model from -exp(log_A_real) of
    the warmed-up one, so its "update" score is about 2 exp(log_A_real), the decay rate, not the change.
  * C is masked outside the usable states of every usable channel; the official code masks the unusable states of
    the updatable channels only (the same thing when every usable channel is updatable, the synthetic defaults).
  * log_dt, D and the output bias, which the official runs train beside SDT, are separate methods here
    (partial_log_dt, partial_d, partial_out_bias).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..errors import ConfigError, NotApplicable
from ..model.s4d.modeling import discretise
from .base import add_delta, remove_delta

WARMUP, SPARSE = 0, 1               # the phases, as SDT's on Mamba
ROLES = ("C", "log_A_real", "A_imag")
S4D_OPTIONS = {"usable_channel_fraction": 1.0, "usable_state_fraction": 1.0, "out_proj": False, "horizon": None}


def offers_s4d(model) -> bool:
    """Whether every mixer offers S4D's tensor roles (C, log_A_real, A_imag): then SDT runs this strategy."""
    mixers = model.peft_mixers()
    try:
        for mixer in mixers:
            for role in ROLES:
                mixer.tensors(role)
    except NotApplicable:
        return False
    return bool(mixers)


def refuse_s4d_options(config, model) -> None:
    """On another family, the S4D-only options have no meaning: NotApplicable names them."""
    set_here = [name for name, default in S4D_OPTIONS.items() if getattr(config, name) != default]
    if set_here:
        owner = model.peft_mixers()[0].display_name if model.peft_mixers() else type(model).__name__
        raise NotApplicable(f"sdt: {', '.join(set_here)} {'is an option' if len(set_here) == 1 else 'are options'} "
                            f"of SDT on S4D; {owner} has no S4D layers (its SDT selects from the warm-up change "
                            f"of A_log, with no usable / unusable split)")


def kept(fraction: float, dim: int) -> int:
    """The authors' rounding, as sdt.selected_sizes: dim - round((1 - fraction) * dim), at least 1."""
    return max(1, dim - round((1 - fraction) * dim))


def sizes(H: int, N: int, config) -> dict[str, int]:
    return {"usable_channels": kept(config.usable_channel_fraction, H),
            "usable_states": kept(config.usable_state_fraction, N),
            "channels": kept(config.channel_fraction, H), "states": kept(config.state_fraction, N)}


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last axis; ties to the lower index."""
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k]


@torch.no_grad()
def select(C, log_dt, log_A_real, A_imag, frozen_log_A_real, frozen_A_imag, *, horizon: int, usable_channels: int,
           usable_states: int, channels: int, states: int):
    """The selection of one layer (see the module docstring), from its warmed-up and frozen tensors.

    Returns channels (k_c,), states (k_c, k_s) (the updatable pairs) and the usable mask (H, N) bool."""
    C, log_dt, log_A_real, A_imag = (t.detach().double() for t in (C, log_dt, log_A_real, A_imag))
    frozen_log_A_real, frozen_A_imag = frozen_log_A_real.detach().double(), frozen_A_imag.detach().double()
    dtA, C_tilde = discretise(C, log_dt, log_A_real, A_imag)
    score = (C_tilde * torch.exp(dtA * (horizon // 2))).abs()                           # (H, N)
    usable_c = _top(score.norm(dim=1), usable_channels).sort().values                    # (u_c,) ascending
    usable_s = _top(score[usable_c], usable_states).sort(dim=1).values                   # (u_c, u_s) ascending
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    mask[usable_c[:, None].expand_as(usable_s), usable_s] = True

    dA = torch.complex(torch.exp(frozen_log_A_real) - torch.exp(log_A_real), A_imag - frozen_A_imag).abs()   # (H, N)
    pick = _top(dA[usable_c].norm(dim=1), channels)                                      # (k_c,) into usable_c
    chosen = usable_c[pick]                                                              # (k_c,)
    candidates = usable_s[pick]                                                          # (k_c, u_s)
    chosen_states = candidates.gather(1, _top(dA[chosen[:, None], candidates], states))  # (k_c, k_s)
    return chosen, chosen_states, mask


class Selection(nn.Module):
    """One layer's selection, kept as buffers so it is saved and loaded with the adapter."""

    def __init__(self, H: int, N: int, k_c: int, k_s: int, device):
        super().__init__()
        self.register_buffer("phase", torch.tensor(WARMUP, device=device))
        self.register_buffer("channels", torch.zeros(k_c, dtype=torch.long, device=device))
        self.register_buffer("states", torch.zeros(k_c, k_s, dtype=torch.long, device=device))
        self.register_buffer("usable", torch.ones(H, N, dtype=torch.bool, device=device))
        self.current = WARMUP               # what forward reads (a buffer would sync a GPU every call)


class SparseSSMDelta(nn.Module):
    """Parametrization of C (H, N, 2), log_A_real or A_imag (H, N): a dense delta in the warm-up; afterwards
    the tensor (C: masked outside the usable pairs) plus the selected pairs' values."""

    def __init__(self, value: torch.Tensor, selection: Selection, keep_warmup: bool, masked: bool):
        super().__init__()
        k_c, k_s = selection.states.shape
        self.keep_warmup, self.masked = keep_warmup, masked
        self.dense = nn.Parameter(torch.zeros_like(value))                                      # (H, N[, 2])
        self.values = nn.Parameter(torch.zeros(k_c, k_s, *value.shape[2:], device=value.device, dtype=value.dtype))
        if masked:
            self.selection = selection      # registered once (under C's parametrization): saved once
        self._selection = [selection]       # a list: not a submodule

    def forward(self, value):
        selection = self._selection[0]
        if selection.current == WARMUP:
            return value + self.dense
        out = value + self.dense if self.keep_warmup else value
        if self.masked:
            out = out * selection.usable.reshape(selection.usable.shape + (1,) * (out.dim() - 2)).to(out.dtype)
        rows = selection.channels[:, None].expand_as(selection.states)
        return out.index_put((rows, selection.states), self.values, accumulate=True)


class ColumnDelta(nn.Module):
    """out_proj=true: out += x[..., channels] @ values^T, a dense delta on the updatable channels' input columns of
    the output linear (an AdaptedLayer delta); nothing before the selection."""

    def __init__(self, linear: nn.Linear, selection: Selection):
        super().__init__()
        k_c = selection.channels.numel()
        self.values = nn.Parameter(torch.zeros(linear.out_features, k_c, device=linear.weight.device,
                                               dtype=linear.weight.dtype))                     # (H_out, k_c)
        self._selection = [selection]

    def forward(self, x, out):
        selection = self._selection[0]
        if selection.current == WARMUP:
            return out
        return out + F.linear(x.index_select(-1, selection.channels), self.values)

    @torch.no_grad()
    def merge_into(self, base: nn.Linear) -> None:
        channels = self._selection[0].channels
        rows = torch.arange(base.out_features, device=channels.device)[:, None]
        base.weight.index_put_((rows.expand_as(self.values), channels[None].expand_as(self.values)),
                               self.values.to(base.weight.dtype), accumulate=True)


class S4DSparseDimensionTuning:
    """SDT's S4D strategy: `sdt` (SparseDimensionTuning) delegates its model-facing work here on S4D models."""

    def __init__(self, config):
        self.config = config
        self.layers: list[tuple[object, Selection, dict, ColumnDelta | None]] = []

    def check(self, model) -> None:
        c = self.config
        for mixer in model.peft_mixers():
            n = sizes(mixer.d_inner, mixer.d_state, c)
            for what in ("channels", "states"):
                if n[what] > n[f"usable_{what}"]:
                    raise ConfigError(f"sdt: {n[what]} updatable {what} per layer (the {what[:-1]}_fraction) exceed "
                                      f"the {n[f'usable_{what}']} usable ones (usable_{what[:-1]}_fraction): updatable "
                                      f"{what} are chosen among the usable ones")
            if c.out_proj:
                mixer.projections("out_proj")
        if self.horizon(model) < 1:
            raise ConfigError("sdt: horizon must be at least 1")

    def horizon(self, model) -> int:
        return self.config.horizon if self.config.horizon is not None else model.config.l_max

    def attach(self, model) -> list[torch.Tensor]:
        c = self.config
        self._horizon = self.horizon(model)
        params = []
        for mixer in model.peft_mixers():
            n = sizes(mixer.d_inner, mixer.d_state, c)
            slots = {role: mixer.tensors(role)[0] for role in ROLES}
            selection = Selection(mixer.d_inner, mixer.d_state, n["channels"], n["states"], slots["C"].value.device)
            deltas = {}
            for role, slot in slots.items():
                deltas[role] = SparseSSMDelta(slot.value, selection, c.keep_warmup, masked=role == "C")
                parametrize.register_parametrization(slot.owner, slot.name, deltas[role])
                params += [deltas[role].dense, deltas[role].values]
            columns = None
            if c.out_proj:
                p = mixer.projections("out_proj")[0]
                columns = ColumnDelta(p.layer, selection)
                add_delta(p.owner, p.attr, "sdt", columns)
                params.append(columns.values)
            self.layers.append((mixer, selection, deltas, columns))
        return params

    @property
    def phase(self) -> int:
        return self.layers[0][1].current if self.layers else SPARSE

    @torch.no_grad()
    def select_now(self) -> None:
        for mixer, selection, deltas, _ in self.layers:
            n = sizes(mixer.d_inner, mixer.d_state, self.config)
            now = {role: mixer.tensors(role)[0] for role in (*ROLES, "log_dt")}
            frozen = {role: getattr(now[role].owner.parametrizations, now[role].name).original
                      for role in ("log_A_real", "A_imag")}                # under SDT's delta: the frozen tensors
            channels, states, usable = select(
                *(now[role].value for role in ("C", "log_dt", "log_A_real", "A_imag")),
                frozen["log_A_real"], frozen["A_imag"], horizon=self._horizon, **n)
            selection.channels.copy_(channels)
            selection.states.copy_(states)
            selection.usable.copy_(usable)
            for delta in deltas.values():
                if not self.config.keep_warmup:
                    delta.dense.zero_()
                delta.dense.requires_grad_(False)        # no gradient: the optimiser leaves it alone from here
                delta.dense.grad = None
            selection.phase.fill_(SPARSE)
            selection.current = SPARSE

    def after_load(self) -> None:
        for _, selection, deltas, _ in self.layers:
            selection.current = int(selection.phase)
            if selection.current == SPARSE:
                for delta in deltas.values():
                    delta.dense.requires_grad_(False)

    def trainable_after_setup(self) -> int:
        return sum(sum(d.values.numel() for d in deltas.values()) + (cols.values.numel() if cols is not None else 0)
                   for _, _, deltas, cols in self.layers)

    def explain_count(self) -> str:
        counts = {}
        for mixer, selection, _, cols in self.layers:
            k_c, k_s = selection.states.shape
            n = sizes(mixer.d_inner, mixer.d_state, self.config)
            key = (k_c, k_s, n["usable_channels"], n["usable_states"], cols.values.shape[0] if cols is not None else 0)
            counts[key] = counts.get(key, 0) + 1
        parts = []
        for (k_c, k_s, u_c, u_s, out), layers in counts.items():
            text = f"{k_c} channels x {k_s} states x (C 2 + log_A_real 1 + A_imag 1) = {4 * k_c * k_s}"
            if out:
                text += f" + output-linear columns {out} x {k_c} = {out * k_c}"
            parts.append(f"{layers} x ({text}); C zeroed outside {u_c} usable channels x {u_s} usable states")
        dense = sum(d.dense.numel() for _, _, deltas, _ in self.layers for d in deltas.values())
        return (f"after the {self.config.warmup_steps}-step warm-up (dense deltas on C, log_A_real and A_imag, "
                f"{dense:,}, not counted): " + "; ".join(parts) + f"; in all {self.trainable_after_setup():,}")

    def merge(self, model) -> None:
        for mixer, _, _, cols in self.layers:
            for role in ROLES:
                slot = mixer.tensors(role)[0]
                parametrize.remove_parametrizations(slot.owner, slot.name, leave_parametrized=True)
            if cols is not None:
                p = mixer.projections("out_proj")[0]
                remove_delta(p.owner, p.attr, "sdt").merge_into(p.layer)
