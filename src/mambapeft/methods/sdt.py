"""Sparse Dimension Tuning (SDT; Galim et al., the second reference paper), as one method in one run.

    warm-up (warmup_steps optimiser steps):   A_log + dense          dense (E, N) trains
    selection, per layer and direction:       channels: the top channel_fraction of E by sum_n dense[e, n]^2
                                              states:   in each of them, the top state_fraction of N by dense^2
    then:                                     A_log[c, s] + a       a (k_c, k_s), the selected entries only
                                              x_proj B, C rows [:, c] + b    b (2N, k_c), the selected channels' columns

The warm-up change is thrown away at selection (the authors' choice) unless `keep_warmup`, and the sparse
update trains from the pretrained weights. The selected indices are buffers of the adapter, so they are
saved and loaded with it; an adapter saved during the warm-up carries its dense delta and phase and picks
up where it was. The trainer tells the method where training stands through `on_step_end`.

Two ways to run the phases. Ours (default): one schedule over the whole run, the warm-up steps counted in it, the
other methods (e.g. LoRA on out_proj) and the optimiser carried across the selection. The authors' (`restart=true`,
the `paper/sdt` presets): the warm-up is a run of its own (furiosa-ai/ssm-peft `train.py` L97-103, L229-230;
`mamba_trainer.py` L62-63, L104-107), so at the selection the other methods' tensors go back to their initial values,
the optimiser state is dropped and the learning-rate schedule starts again, for the run's full length on top of the
warm-up, all in the same command (and resumable as any run). Counts round as the authors do:
`dim - round((1 - fraction) * dim)` (31 channels on mamba-790m, 41 on mamba-1.4b).

On S4D models (model/s4d/) `sdt` runs the S4 experiments' version instead (methods/sdt_s4d.py, docs/s4d.md): the
strategy is chosen in `check` / `attach` by what the mixers offer, and the Mamba path below is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import ConfigError, NotApplicable
from .base import Example, Method, MethodConfig, add_parametrization, fold_parametrizations, option, register
from .sdt_s4d import S4DSparseDimensionTuning, offers_s4d, refuse_s4d_options

WARMUP, SPARSE = 0, 1


@dataclass
class SDTConfig(MethodConfig):
    warmup_steps: int = option(200, "optimiser steps of the dense A_log warm-up before the selection", minimum=1)
    channel_fraction: float = option(0.01, "fraction of the E channels selected per layer and direction (0, 1]",
                                     exclusive_minimum=0, maximum=1)
    state_fraction: float = option(0.25, "fraction of the N states selected inside each selected channel (0, 1]",
                                   exclusive_minimum=0, maximum=1)
    keep_warmup: bool = option(False, "keep the warm-up change of A_log instead of discarding it at selection")
    restart: bool = option(False, "run the warm-up as a run of its own (the authors'): at the selection the other "
                           "methods restart from their initial values, with a fresh optimiser and schedule, for the "
                           "run's full length on top of the warm-up")
    # S4D only (methods/sdt_s4d.py); on other families these must stay at their defaults
    usable_channel_fraction: float = option(1.0, "S4D: fraction of the H channels kept usable per layer, by "
                                            "|C~ exp(dtA L/2)|; C is zeroed in the others (0, 1]",
                                            exclusive_minimum=0, maximum=1)
    usable_state_fraction: float = option(1.0, "S4D: fraction of the N states kept usable in each usable channel; "
                                          "C is zeroed in the others (0, 1]", exclusive_minimum=0, maximum=1)
    out_proj: bool = option(False, "S4D: also tune the output linear's columns of the updatable channels (the "
                            "paper's SDT row; with lora_out_proj instead, SDT + LoRA)")
    horizon: int | None = option(None, "S4D: the sequence length L of the usable score (default: the model's l_max)",
                                 minimum=1)


def selected_sizes(E: int, N: int, config: SDTConfig) -> tuple[int, int]:
    """(channels, states per channel) kept, rounded as the authors' code does: dim - round((1 - fraction) * dim),
    at least one of each (Python's round: halves to even, as theirs)."""
    def kept(fraction: float, dim: int) -> int:
        return max(1, dim - round((1 - fraction) * dim))

    return kept(config.channel_fraction, E), kept(config.state_fraction, N)


def select(dense: torch.Tensor, k_channels: int, k_states: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top channels by summed squared change, then top states inside each; ties go to the lower index."""
    score = dense.detach().double().pow(2)                                            # (E, N)
    channels = torch.sort(score.sum(1), descending=True, stable=True).indices[:k_channels]
    states = torch.sort(score[channels], dim=1, descending=True, stable=True).indices[:, :k_states]
    return channels, states                                                           # (k_c,), (k_c, k_s)


class SparseA(nn.Module):
    """Parametrization of A_log: a dense delta in the warm-up, the selected entries afterwards."""

    def __init__(self, A_log: torch.Tensor, k_channels: int, k_states: int, keep_warmup: bool):
        super().__init__()
        factory = {"device": A_log.device, "dtype": A_log.dtype}
        self.keep_warmup = keep_warmup
        self.dense = nn.Parameter(torch.zeros_like(A_log))                                # (E, N)
        self.values = nn.Parameter(torch.zeros(k_channels, k_states, **factory))          # (k_c, k_s)
        self.register_buffer("phase", torch.tensor(WARMUP, device=A_log.device))   # saved with the adapter
        self.current = WARMUP                      # what forward reads (a buffer would sync a GPU every call)
        self.register_buffer("channels", torch.zeros(k_channels, dtype=torch.long, device=A_log.device))
        self.register_buffer("states", torch.zeros(k_channels, k_states, dtype=torch.long, device=A_log.device))

    def forward(self, A_log):
        if self.current == WARMUP:
            return A_log + self.dense
        out = A_log + self.dense if self.keep_warmup else A_log
        rows = self.channels[:, None].expand_as(self.states)
        return out.index_put((rows, self.states), self.values, accumulate=True)


class SparseBC(nn.Module):
    """Parametrization of x_proj's weight: after selection, the B and C rows' columns of the chosen channels."""

    def __init__(self, weight: torch.Tensor, sparse_a: SparseA, B_rows: tuple[int, int], C_rows: tuple[int, int]):
        super().__init__()
        rows = list(range(*B_rows)) + list(range(*C_rows))
        self.rows = torch.tensor(rows, dtype=torch.long)          # not a buffer: not part of the adapter
        self.values = nn.Parameter(torch.zeros(len(rows), sparse_a.channels.numel(),
                                               device=weight.device, dtype=weight.dtype))  # (2N, k_c)
        self._a = [sparse_a]                       # the channels live in A's part; a list: not a submodule

    def forward(self, weight):
        sparse_a = self._a[0]
        if sparse_a.current == WARMUP:
            return weight
        if self.rows.device != weight.device:
            self.rows = self.rows.to(weight.device)
        rows = self.rows[:, None]
        return weight.index_put((rows.expand_as(self.values), sparse_a.channels[None].expand_as(self.values)),
                                self.values, accumulate=True)


def _parts(model):
    """(A_log slot, B rows, C rows, mixer) per mixer and direction."""
    for mixer in model.peft_mixers():
        for slot, B, C in zip(mixer.tensors("A_log"), mixer.projections("B"), mixer.projections("C")):
            yield slot, B, C, mixer


@register
class SparseDimensionTuning(Method):
    name = "sdt"
    category = "sparse dimension tuning"
    description = ("SDT: dense A_log warm-up, then only the selected channels x states of A_log and those "
                   "channels' B, C columns of x_proj train (S4D: of C, log_A_real, A_imag; docs/s4d.md)")
    Config = SDTConfig
    targets = frozenset({("A_log", None)} | {(role, None) for role in ("C", "log_A_real", "A_imag")})
    exclusive = True                           # A_log can carry one delta: not with partial_a (S4D: not with lora_ssm)
    merge_order = -1                           # its x_proj delta is a parametrization: fold it before LoRA merges
    examples = (Example("sdt:warmup_steps=1,channel_fraction=0.2,state_fraction=0.4"),
                # S4D only: C masked outside the usable pairs (the output changes at the start), output columns
                Example("sdt:warmup_steps=1,channel_fraction=0.2,state_fraction=0.4,usable_channel_fraction=0.5,"
                        "usable_state_fraction=0.6,out_proj=true,horizon=6", identity=False))
    # the authors' released configs warm up about 500 steps at batch 4 (cfg/peft/sd_lora/{250it,500it}), as a run
    # of its own
    presets = {"sdt": ["sdt:warmup_steps=500,restart=true"],
               # the S4 synthetic experiment's (run_s4.py defaults, H 64 and N 16): 16 of 64 channels and 8 of 16
               # states usable and updatable, output columns tuned, a 20-step warm-up as a run of its own
               "sdt_s4d": ["sdt:warmup_steps=20,restart=true,channel_fraction=0.25,state_fraction=0.5,"
                           "usable_channel_fraction=0.25,usable_state_fraction=0.5,out_proj=true"]}
    # beyond Table 9 (the second reference paper): a warm-up short enough for short trials
    search_step1 = {"warmup_steps": 10}
    search_step2 = {"channel_fraction": {"log": [0.005, 0.1]}, "state_fraction": {"float": [0.1, 0.5]},
                    "lr": {"log": [1e-4, 5e-3]}}

    s4d: S4DSparseDimensionTuning | None = None     # the S4D strategy, when the mixers offer S4D's tensor roles

    def check(self, model):
        if offers_s4d(model):
            return S4DSparseDimensionTuning(self.config).check(model)
        refuse_s4d_options(self.config, model)
        for mixer in model.peft_mixers():
            if len(mixer.state_shape) != 2:
                raise NotApplicable(
                    "SDT selects channels and states of an (E, N) A and the matching columns of x_proj's B and C rows; "
                    f"{mixer.display_name} has one scalar A per head and takes B and C from in_proj, whose inputs are "
                    "the residual width, not the channels, so neither selection has a counterpart (the SDT authors' "
                    "Mamba-2 code was never released: furiosa-ai/ssm-peft#2)")
            mixer.tensors("A_log")
            B, C = mixer.projections("B"), mixer.projections("C")
            if any(b.weight_slot != c.weight_slot for b, c in zip(B, C)):
                raise ConfigError("sdt: this family keeps B and C in different layers, which SDT does not support")

    def attach(self, model):
        if offers_s4d(model):
            self.s4d = S4DSparseDimensionTuning(self.config)
            return self.s4d.attach(model)
        self.parts = []
        params = []
        for slot, B, C, mixer in _parts(model):
            k_c, k_s = selected_sizes(mixer.d_inner, mixer.d_state, self.config)
            sparse_a = SparseA(slot.value, k_c, k_s, self.config.keep_warmup)
            add_parametrization(slot, sparse_a)
            sparse_bc = SparseBC(B.layer.weight, sparse_a, B.rows, C.rows)
            add_parametrization(B.weight_slot, sparse_bc)           # x_proj's weight (VMamba: its direction's)
            self.parts.append((sparse_a, sparse_bc))
            params += [sparse_a.dense, sparse_a.values, sparse_bc.values]
        return params

    # ----------------------------------------------------------- phases

    @property
    def phase(self) -> int:
        if self.s4d is not None:
            return self.s4d.phase
        return self.parts[0][0].current if self.parts else SPARSE

    def phase_name(self) -> str:
        return "sdt warm-up" if self.phase == WARMUP else "sdt sparse"

    def on_step_end(self, model, step: int) -> str | None:
        """Called by the trainer after optimiser step `step` (1-based): selects when the warm-up is over, and then
        asks for the restart of the other methods, the optimiser and the schedule when `restart`."""
        if self.phase == WARMUP and step >= self.config.warmup_steps:
            self.select_now()
            return "restart" if self.config.restart else None
        return None

    def extra_steps(self) -> int:
        """Optimiser steps the run takes beyond its own length: the warm-up, when it is a run of its own."""
        return self.config.warmup_steps if self.config.restart else 0

    @torch.no_grad()
    def select_now(self) -> None:
        if self.s4d is not None:
            return self.s4d.select_now()
        for sparse_a, _ in self.parts:
            channels, states = select(sparse_a.dense, *sparse_a.values.shape)
            sparse_a.channels.copy_(channels)
            sparse_a.states.copy_(states)
            if not self.config.keep_warmup:
                sparse_a.dense.zero_()
            sparse_a.dense.requires_grad_(False)          # no gradient: the optimiser leaves it alone from here
            sparse_a.dense.grad = None
            sparse_a.phase.fill_(SPARSE)
            sparse_a.current = SPARSE

    def after_load(self) -> None:
        """Takes the phase from the loaded buffers; past its warm-up an adapter trains only the sparse parts."""
        if self.s4d is not None:
            return self.s4d.after_load()
        for sparse_a, _ in self.parts:
            sparse_a.current = int(sparse_a.phase)
            if sparse_a.current == SPARSE:
                sparse_a.dense.requires_grad_(False)

    def check_training(self, total_steps: int) -> None:
        in_warmup = not (getattr(self, "parts", None) or self.s4d) or self.phase == WARMUP
        if in_warmup and not self.config.restart and self.config.warmup_steps >= total_steps:
            raise ConfigError(f"sdt: warmup_steps={self.config.warmup_steps} is not shorter than the run "
                              f"({total_steps} optimiser steps); nothing would be left for the sparse phase")

    # ----------------------------------------------------------- counting

    def trainable_after_setup(self) -> int:
        if self.s4d is not None:
            return self.s4d.trainable_after_setup()
        return sum(a.values.numel() + bc.values.numel() for a, bc in self.parts)

    def explain_count(self) -> str:
        if self.s4d is not None:
            return self.s4d.explain_count()
        mixer_counts = {}
        for a, bc in self.parts:
            k_c, k_s = a.values.shape
            mixer_counts[(k_c, k_s, bc.values.shape[0])] = mixer_counts.get((k_c, k_s, bc.values.shape[0]), 0) + 1
        parts = [f"{n} x ({k_c} channels x {k_s} states of A_log + {two_n} B/C rows x {k_c} channels = "
                 f"{k_c * k_s + two_n * k_c})" for (k_c, k_s, two_n), n in mixer_counts.items()]
        dense = sum(a.dense.numel() for a, _ in self.parts)
        return (f"after the {self.config.warmup_steps}-step warm-up (a dense A_log delta, not counted): "
                + " + ".join(parts) + f" = {self.trainable_after_setup():,}; the authors' parameter tool also counts "
                f"the warm-up delta (+{dense:,}), which stops training at the selection")

    def merge(self, model):
        if self.s4d is not None:
            return self.s4d.merge(model)
        for slot, B, _, _ in _parts(model):
            fold_parametrizations([slot, B.weight_slot])
