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
                  S4D (model/s4d.py): "C" (H, N, 2: complex as real pairs), "log_A_real", "A_imag" (H, N),
                  "log_dt" (H), "out_bias" (the output linear's bias), and "D"
    stages        where `PeftHook`s are called: "embeddings" (the model), "before_in_proj", "after_in_proj"
                  (soft tokens), "extend_state" (extra state dimensions), "initial_state" and "state_offset"

Adding a family = implementing these members (and one line in tests/test_conformance.py's table of families).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..errors import NotApplicable

PROJECTION_ROLES = ("in_proj", "x_proj", "dt_proj", "out_proj", "X", "Z", "dt", "B", "C")
TENSOR_ROLES = ("A_log", "D", "conv", "dt_bias")
TENSOR_ROLES += ("C", "log_A_real", "A_imag", "log_dt", "out_bias")      # S4D's time-invariant SSM (model/s4d.py)


def unwrap(layer: nn.Module) -> nn.Module:
    """The layer under a method's wrapper (methods.base.AdaptedLayer keeps it as `.base`)."""
    return getattr(layer, "base", layer)


@dataclass(frozen=True)
class Projection:
    """A linear layer a method may wrap (`owner.attr`), and the output rows [start, stop) its role covers."""

    owner: nn.Module
    attr: str
    rows: tuple[int, int]
    direction: int = 0

    @property
    def layer(self) -> nn.Module:
        """The plain layer, under any wrapper a method has put on it."""
        return unwrap(getattr(self.owner, self.attr))


@dataclass(frozen=True)
class TensorSlot:
    """A small tensor a method may add a delta to: `owner.name` (a parameter read at every call)."""

    owner: nn.Module
    name: str
    direction: int = 0

    @property
    def value(self) -> torch.Tensor:
        return getattr(self.owner, self.name)


class PeftMixerInterface(ABC):
    """What a mixer offers methods. Besides the members below it holds `hooks` (an nn.ModuleList of PeftHooks)
    and calls them at the stages it lists in `peft_stages`; its projections are called as modules and its small
    tensors read as attributes at every call, so that wrappers and parametrizations always apply."""

    family_name: ClassVar[str] = "this model"      # in messages: "Mamba-2 has no x_proj ..."
    peft_stages: ClassVar[frozenset[str]] = frozenset()

    d_model: int            # width of the residual stream
    d_inner: int            # channels of the scan (E)
    d_state: int            # states per channel (N)
    num_directions: int     # scan directions (Vim 2, VMamba 4)
    state_shape: tuple      # one direction's scan state without the batch: (E, N) for Mamba-1, (H, P, N) Mamba-2
    channel_shape: tuple    # one direction's output channels: (E,) for Mamba-1, (H, P) for Mamba-2

    @abstractmethod
    def projections(self, role: str) -> list[Projection]:
        """The layer(s) behind a projection role, one per direction where each direction has its own;
        NotApplicable (with the reason) when this family has none."""

    @abstractmethod
    def tensors(self, role: str) -> list[TensorSlot]:
        """The tensor(s) behind a tensor role, one per direction; NotApplicable when this family has none."""

    def soft_token_width(self, stage: str) -> int:
        """Width of soft tokens inserted at `stage` ("before_in_proj" or "after_in_proj")."""
        raise NotApplicable(f"{self.family_name} takes no soft tokens {stage.replace('_', ' ')}")

    def require_stage(self, stage: str, method: str) -> None:
        if stage not in self.peft_stages:
            raise NotApplicable(f"{method}: {self.family_name} has no {stage.replace('_', ' ')} stage for PEFT hooks")

    def not_applicable(self, role: str, why: str = "") -> NotApplicable:
        return NotApplicable(f"{self.family_name} has no {role}" + (f": {why}" if why else ""))


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

    def untie_weights(self) -> None:
        """Gives a head tied to the embedding its own copy (before a method changes one of them). Default: none."""

    def model_tensor(self, role: str) -> TensorSlot:
        """A tensor the model itself holds (Vim: "cls_token", "pos_embed"); NotApplicable by default."""
        raise NotApplicable(f"{type(self).__name__} has no {role}")

    def peft_inputs(self, batch: int = 2, seed: int = 0) -> dict:
        """A small random batch of this model's inputs (for checks and tests): the kwargs of forward."""
        raise NotImplementedError
