"""The PEFT interface of a model family: everything a method may touch, declared in one place.

A model family is a model class deriving from `PeftModelInterface` whose blocks hold mixers deriving from
`PeftMixerInterface`. Methods (mambapeft.methods) reach a model only through these members, so one method class
serves every family, and a family that lacks what a method needs says so by raising `NotApplicable` with the
reason (the reason is what `mambapeft methods` and the conformance test show).

Roles name the parts of a mixer by what they do, not by where a family keeps them:

    projections   "in_proj", "x_proj", "dt_proj", "out_proj"     whole linear layers
                  "X", "Z", "dt", "B", "C"                       the output rows that compute them
                  (Mamba-1: X, Z are halves of in_proj and dt, B, C row blocks of x_proj; a family without
                  x_proj finds B and C elsewhere or declares them not applicable)
    tensors       "A_log", "D", "conv" (the conv kernel), "dt_bias"   small tensors, read at every call
                  "norm" (the norm before out_proj: Mamba-2's gated RMSNorm, VMamba's out_norm)
                  S4D (model/s4d/modeling.py): "C" (H, N, 2: complex as real pairs), "log_A_real", "A_imag" (H, N),
                  "log_dt" (H), "out_bias" (the output linear's bias), and "D"
    stages        where `PeftHook`s are called: "embeddings" (the model), "before_in_proj", "after_in_proj"
                  (soft tokens; VMamba: "after_cross_scan"), "extend_state" (extra state dimensions),
                  "initial_state" and "state_offset", "gate" (the gate's input Z before silu: Memba)

Hybrid models (attention, MLP and expert layers beside the SSM mixers) answer more roles at the model level, for
the layers that are not mixers (`layer_projections`, `layer_tensors`); the SSM methods still see only the mixers:

    layer projections  "q_proj", "k_proj", "v_proj", "o_proj"      each attention layer's projections
                       "mlp_in", "mlp_out"                         each MLP's input (gate and up, fused or not) and
                       "gate_proj", "up_proj", "down_proj"         output layer; its gate / up / down where it has them
    layer tensors      "router" (E, d), "experts_in" (E, out, d),  each MoE's router and stacked expert weights,
                       "experts_out" (E, d, in)                    read at every call (methods parametrize them)
    layer types        `layer_types()`: "mamba" / "attention" (Nemotron-H: "mlp", "moe") per layer; `part_types()`:
                       module path -> "mamba", "attention", "mlp" or "moe" (`mambapeft params` counts by these)

Stacked layouts (VMamba keeps each direction's x_proj, dt_proj, A, D and dt bias as one entry of a tensor stacked
over the directions, under the checkpoint's names): a `StackedLinear` is the called module over such a weight, and
a Projection on it stands for one direction, whose `layer` is a `DirectionView` that looks like a bias-free
nn.Linear (methods hang per-direction deltas on it: methods/base.py `attach_delta`); a TensorSlot with an `index`
stands for one direction's part of a stacked tensor (methods parametrize that part: `add_parametrization`).

Adding a family = implementing these members (and one line in tests/test_conformance.py's table of families).
"""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..errors import NotApplicable
from . import checkpointing

PROJECTION_ROLES = ("in_proj", "x_proj", "dt_proj", "out_proj", "X", "Z", "dt", "B", "C")
TENSOR_ROLES = ("A_log", "D", "conv", "dt_bias")
TENSOR_ROLES += ("C", "log_A_real", "A_imag", "log_dt", "out_bias")      # S4D's time-invariant SSM (model/s4d/)
# the layers beside the SSM mixers in hybrid models (PeftModelInterface.layer_projections / layer_tensors)
LAYER_PROJECTION_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp_in", "mlp_out", "gate_proj", "up_proj",
                          "down_proj")
LAYER_TENSOR_ROLES = ("router", "experts_in", "experts_out")


def unwrap(layer: nn.Module) -> nn.Module:
    """The layer under a method's wrapper (methods.base.AdaptedLayer keeps it as `.base`)."""
    return getattr(layer, "base", layer)


class DirectionView:
    """One direction k of a StackedLinear, seen as a bias-free linear layer: what methods read of an nn.Linear
    (in_features, out_features, weight, bias). Not a module: `weight` is the stacked weight's entry k, read anew at
    every access (so a parametrization of the stacked tensor shows), and writing into it under no_grad writes into
    the stacked parameter (how LoRA and DoRA merge)."""

    bias = None

    def __init__(self, stacked: StackedLinear, k: int):
        self._stacked, self.k = stacked, k

    @property
    def weight(self) -> torch.Tensor:
        return self._stacked.weight[self.k]                          # (out, in)

    @property
    def in_features(self) -> int:
        return self._stacked.weight.shape[2]

    @property
    def out_features(self) -> int:
        return self._stacked.weight.shape[1]


class StackedLinear(nn.Module):
    """K bias-free linear maps, one per scan direction, whose weights are one parameter of the owner:
    owner.<name> (K, out, in), applied as x (..., K, L, in) -> (..., K, L, out).

    It holds no tensor (the owner keeps the parameter under its checkpoint name, e.g. VMamba's x_proj_weight) and
    reads the parameter at every call, so a parametrization of it applies; being a called module, a wrapper around
    it (AdaptedLayer, with a delta per direction) cannot be bypassed."""

    def __init__(self, owner: nn.Module, name: str):
        super().__init__()
        self._owner = [owner]                  # a plain list: the owner is not a submodule of its own part
        self.name = name
        self._views: list[DirectionView] = []

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self._owner[0], self.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight.mT)                       # (..., K, L, in) @ (K, in, out)

    def direction(self, k: int) -> DirectionView:
        """Direction k as a linear layer (the same object every time, so `is` compares layers)."""
        while len(self._views) <= k:
            self._views.append(DirectionView(self, len(self._views)))
        return self._views[k]

    def extra_repr(self) -> str:
        return f"reads {self.name}"


@dataclass(frozen=True)
class Projection:
    """A linear layer a method may wrap (`owner.attr`), and the output rows [start, stop) its role covers.
    On a StackedLinear it is the projection of one direction (`direction`)."""

    owner: nn.Module
    attr: str
    rows: tuple[int, int]
    direction: int = 0

    @property
    def stacked(self) -> bool:
        return isinstance(unwrap(getattr(self.owner, self.attr)), StackedLinear)

    @property
    def layer(self):
        """The plain layer, under any wrapper a method has put on it (a DirectionView on a stacked layer)."""
        layer = unwrap(getattr(self.owner, self.attr))
        return layer.direction(self.direction) if isinstance(layer, StackedLinear) else layer

    @property
    def weight_slot(self) -> TensorSlot:
        """The layer's weight as a TensorSlot (what a parametrization of it attaches to)."""
        layer = unwrap(getattr(self.owner, self.attr))
        if isinstance(layer, StackedLinear):
            return TensorSlot(layer._owner[0], layer.name, self.direction, index=self.direction)
        return TensorSlot(layer, "weight", self.direction)


@dataclass(frozen=True)
class TensorSlot:
    """A small tensor a method may add a delta to: `owner.name` (a parameter read at every call), or one part of it
    along its first axis (`index`): rows (start, stop) of it, or its entry k (an int) when it is stacked over the
    directions."""

    owner: nn.Module
    name: str
    direction: int = 0
    index: int | tuple[int, int] | None = None

    @property
    def value(self) -> torch.Tensor:
        return part_of(getattr(self.owner, self.name), self.index)


def part_of(t: torch.Tensor, index: int | tuple[int, int] | None) -> torch.Tensor:
    """t, its rows index = (start, stop), or its entry index = k."""
    if index is None:
        return t
    return t[index] if isinstance(index, int) else t[index[0] : index[1]]


def with_part(t: torch.Tensor, index: int | tuple[int, int] | None, part: torch.Tensor) -> torch.Tensor:
    """t with part_of(t, index) replaced by `part` (a new tensor; differentiable in both)."""
    if index is None:
        return part
    start, stop = (index, index + 1) if isinstance(index, int) else index
    middle = part[None] if isinstance(index, int) else part
    return torch.cat([t[:start], middle, t[stop:]])


class PeftMixerInterface(ABC):
    """What a mixer offers methods. Besides the members below it holds `hooks` (an nn.ModuleList of PeftHooks)
    and calls them at the stages it lists in `peft_stages`; its projections are called as modules and its small
    tensors read as attributes at every call, so that wrappers and parametrizations always apply."""

    display_name: ClassVar[str] = "this model"      # in messages: "Mamba-2 has no x_proj ..."
    peft_stages: ClassVar[frozenset[str]] = frozenset()

    d_model: int            # width of the residual stream
    d_inner: int            # channels of the scan (E)
    d_state: int            # states per channel (N)
    num_directions: int     # scan directions (Vim 2, VMamba 4)

    @property
    def state_shape(self) -> tuple[int, ...]:
        """One direction's scan state without the batch: (E, N) by default (Mamba-1, Vim, VMamba), (H, P, N) for
        Mamba-2."""
        return (self.d_inner, self.d_state)

    @property
    def channel_shape(self) -> tuple[int, ...]:
        """One direction's output channels: (E,) by default, (H, P) for Mamba-2."""
        return (self.d_inner,)

    @abstractmethod
    def projections(self, role: str) -> list[Projection]:
        """The layer(s) behind a projection role, one per direction where each direction has its own;
        NotApplicable (with the reason) when this family has none."""

    @abstractmethod
    def tensors(self, role: str) -> list[TensorSlot]:
        """The tensor(s) behind a tensor role, one per direction; NotApplicable when this family has none."""

    def soft_token_width(self, stage: str) -> int:
        """Width of soft tokens inserted at `stage` ("before_in_proj" or "after_in_proj")."""
        raise NotApplicable(f"{self.display_name} takes no soft tokens {stage.replace('_', ' ')}")

    def token_stage(self, where: str) -> str:
        """The stage that plays the part of `where` in this family (affix's option): itself, except where a family
        has no sequence there (VMamba: after in_proj the features are a 2-D grid; its tokens enter after the
        cross-scan)."""
        return where

    def require_stage(self, stage: str, method: str) -> None:
        if stage not in self.peft_stages:
            raise NotApplicable(f"{method}: {self.display_name} has no {stage.replace('_', ' ')} stage for PEFT hooks")

    def not_applicable(self, role: str, why: str = "") -> NotApplicable:
        return NotApplicable(f"{self.display_name} has no {role}" + (f": {why}" if why else ""))


class PeftModelInterface(ABC):
    """What a model offers methods (mixed into the model's nn.Module class).

    family:          short family id ("mamba", "vim", ...), shown by `mambapeft methods`
    is_causal:       outputs see only the past (a soft token after the last real one would change nothing)
    embedding_path:  module path of the input embedding (token table or patch conv), or None
    head_path:       module path of the output head, or None
    hooks:           model-level PeftHooks (stage "embeddings": soft prompt tokens)
    peft_stages:     the model-level stages it calls hooks at
    """

    family: ClassVar[str]
    is_causal: ClassVar[bool]
    peft_stages: ClassVar[frozenset[str]] = frozenset({"embeddings"})
    embedding_path: ClassVar[str | None] = None
    head_path: ClassVar[str | None] = None

    @property
    @abstractmethod
    def d_model(self) -> int:
        """Width of the residual stream (the width of prompt tokens)."""

    @abstractmethod
    def peft_mixers(self) -> list[PeftMixerInterface]:
        """Every mixer, in order: where per-layer methods attach."""

    @abstractmethod
    def peft_fingerprint(self) -> dict:
        """The architecture an adapter depends on; an adapter saved on one fingerprint refuses another."""

    supports_gradient_checkpointing: ClassVar[bool] = True      # what transformers' Trainer asks

    def checkpoint_blocks(self) -> list[nn.Module]:
        """The blocks gradient checkpointing recomputes one at a time (model/checkpointing.py); by default the
        elements of the innermost module lists that hold the mixers."""
        return checkpointing.default_blocks(self)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Keeps only each block's input for the backward pass and recomputes the block there (transformers' name;
        its kwargs are accepted and ignored: the blocks always run non-reentrant, with the RNG state preserved)."""
        checkpointing.enable(self)

    def gradient_checkpointing_disable(self) -> None:
        checkpointing.disable(self)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return checkpointing.is_enabled(self)

    def layer_types(self) -> list[str]:
        """The kind of each layer ("mamba", "attention", ...); a pure SSM model's layers are all its mixers'."""
        return [self.family] * len(self.peft_mixers())

    def part_types(self) -> dict[str, str]:
        """Module path -> the kind of layer part under it ("mamba", "attention", "mlp", "moe"), for hybrids' reports
        of trainable parameters per layer type; {} for models of one layer type."""
        return {}

    def layer_projections(self, role: str) -> list[Projection]:
        """The linear layers of a hybrid's non-SSM role (LAYER_PROJECTION_ROLES) in every layer that has one."""
        raise NotApplicable(f"{self.family} models have no {role} (no attention, MLP or expert layers beside the SSM "
                            f"mixers)")

    def layer_tensors(self, role: str) -> list[TensorSlot]:
        """The tensors of a hybrid's non-SSM tensor role (LAYER_TENSOR_ROLES) in every layer that has one."""
        raise NotApplicable(f"{self.family} models have no {role} (no expert layers beside the SSM mixers)")

    def untie_weights(self) -> None:
        """Gives a head tied to the embedding its own copy (before a method changes one of them). Default: none."""
        return None

    def record_state_growth(self, n: int) -> None:
        """Its mixers' states grew by n (additional_scan merged): the config says so, so a saved model reloads.
        Default: a transformers config's state size (`state_size`, or the hybrids' `mamba_d_state` /
        `ssm_state_size`) or a dataclass config's `d_state`."""
        config = getattr(self, "config", None)
        key = next((k for k in ("state_size", "mamba_d_state", "ssm_state_size") if hasattr(config, k)), None)
        if key is not None:                    # Mamba-1 / Mamba-2; the hybrids (Granite 4.0-H, Bamba; Nemotron-H)
            self.config = copy.deepcopy(config)
            setattr(self.config, key, getattr(config, key) + n)
        elif dataclasses.is_dataclass(config) and hasattr(config, "d_state"):
            self.config = dataclasses.replace(config, d_state=config.d_state + n)

    def model_tensor(self, role: str) -> TensorSlot:
        """A tensor the model itself holds (Vim: "cls_token", "pos_embed"); NotApplicable by default."""
        raise NotApplicable(f"{type(self).__name__} has no {role}")

    def peft_inputs(self, batch: int = 2, seed: int = 0) -> dict:
        """A small random batch of this model's inputs (for checks and tests): the kwargs of forward."""
        raise NotImplementedError
