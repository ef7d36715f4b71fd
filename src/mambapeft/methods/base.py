"""What every PEFT method is made of, and the registry that lists them.

A method is a small class beside its config dataclass, and it owns every fact about itself:

    @register
    class MyMethod(Method):
        name = "my_method"                     # the id users type
        category = "LoRA"                      # groups `mambapeft methods`
        description = "one line for `mambapeft methods`"
        Config = MyConfig                      # a MethodConfig dataclass; every field has a help text (options.py)
        examples = (Example("my_method:r=4"),) # the conformance test's cases (tests/test_conformance.py)
        presets = {"my_method": ["my_method:r=32"]}          # `paper/my_method`
        search_step1 = {"r": 4}                # in the default HybridPEFT space at this smallest setting ...
        search_step2 = {"r": {"int": [4, 16]}, "lr": TABLE9_LR}   # ... and these step-2 ranges
        scaled_update = True                   # the update is scaled by a small s from a zero start (LR column)

        def check(self, model): ...            # NotApplicable / ConfigError before anything is attached
        def attach(self, model): ...           # add parts to the model, return the tensors it trains
        def merge(self, model): ...            # fold into the weights (mergeable methods only)

Adding a method is one new file in this folder and its module name on the import line of `methods/__init__.py`.
Methods reach the model only through the model interface (model/interface.py): mixers' `projections(role)` and
`tensors(role)`, their hook stages, and the model's embedding, head, hooks and `model_tensor`, so one class serves
every model family, and a family without what a method needs raises NotApplicable with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..model.interface import LAYER_PROJECTION_ROLES, Projection, TensorSlot, part_of, unwrap, with_part
from ..options import check_options, option

REGISTRY: dict[str, type[Method]] = {}

# Table 9's step-2 ranges shared by most methods: the learning rate and the weight decay of the method's parameters
TABLE9_LR = {"log": [1e-4, 5e-3]}
TABLE9_DECAY = {"log": [1e-6, 1e-3]}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in REGISTRY:
        raise RuntimeError(f"two methods are named {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class MethodConfig:
    """Base of every method's hyperparameters; per-method optimiser settings live here too."""

    lr: float | None = option(None, "learning rate of this method's parameters (default: the run's)",
                              exclusive_minimum=0)
    weight_decay: float | None = option(None, "weight decay of this method's parameters (default: the run's)",
                                        minimum=0)

    def validate(self, method: str) -> None:
        """Checks every field against its limits; the message names the method and the option."""
        check_options(self, method)


@dataclass(frozen=True)
class Example:
    """A case of the conformance test: a spec, and whether the method starts as the identity (zero-initialised
    updates do; soft tokens and extra states change the output from the start)."""

    spec: str
    identity: bool = True
    non_causal_only: bool = False     # positions a causal model refuses (suffix, infix soft tokens)


class Method:
    """One attached PEFT method. Subclasses set the class attributes and implement `attach`."""

    name: ClassVar[str]
    category: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    mergeable: ClassVar[bool] = True
    why_not_mergeable: ClassVar[str] = ""
    merge_order: ClassVar[int] = 0            # merged in ascending order (methods that reshape layers go last)
    # which parts of the model the method changes: (layer, row block) pairs; used to find clashes
    targets: ClassVar[frozenset] = frozenset()
    exclusive: ClassVar[bool] = False         # True: nothing else may touch its targets (DoRA's normalisation)
    # facts the rest of the library reads from the registry
    examples: ClassVar[tuple[Example, ...]] = ()
    presets: ClassVar[dict[str, list[str]]] = {}
    search_step1: ClassVar[dict | None] = None       # None: not in the default search space
    search_step2: ClassVar[dict] = {}
    search_vision_only: ClassVar[bool] = False
    scaled_update: ClassVar[bool] = False     # update = s * (something that starts at zero): a 10x rate on small models
    lr_by_size: ClassVar[dict[str, float]] = {}   # per model size (paper Table 7): arch name -> learning rate

    def __init__(self, config: MethodConfig):
        self.config = config

    @classmethod
    def size_lr(cls, config: MethodConfig, arch: str | None) -> float | None:
        """This method's learning rate on a named model size (a method whose rate depends on its options overrides
        this; config/presets.py adds the built-in model's column)."""
        return cls.lr_by_size.get(arch)

    def check(self, model) -> None:
        """Raises NotApplicable (no meaning on this family) or ConfigError before anything is attached."""

    def attach(self, model) -> list[torch.Tensor]:
        """Adds this method's parts to `model` in place; returns the tensors it trains (new or existing)."""
        raise NotImplementedError

    def collapse(self, model, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """For methods that stay after merging: simplify for inference (a projection into plain tokens).

        Returns the tensors the method holds afterwards; may update `self.config` to match.
        """
        return tensors

    def merge(self, model) -> None:
        """Folds the method into the base weights and removes its parts; only called if `mergeable`."""
        raise NotImplementedError(f"{self.name} cannot be merged")

    # Methods with training phases (SDT) override these; the defaults do nothing.
    def check_training(self, total_steps: int) -> None:
        """Raises ConfigError if the method cannot work in a run of `total_steps` optimiser steps."""

    def on_step_end(self, model, step: int) -> str | None:
        """Called after optimiser step `step` (1-based); "restart" asks the trainer to restart the other methods, the
        optimiser and the learning-rate schedule (SDT's warm-up as a run of its own)."""
        return None

    def extra_steps(self) -> int:
        """Optimiser steps this method adds to the run's length (a warm-up that is a run of its own)."""
        return 0

    def phase_name(self) -> str:
        return ""

    def after_load(self) -> None:
        """Called after the adapter's tensors were loaded."""

    def explain_count(self) -> str | None:
        """How the trainable count comes about, when it is not plain (`mambapeft params` prints it)."""
        return None

    def param_groups(self, params: dict[str, torch.Tensor], lr: float, weight_decay: float,
                     flat_decay: bool = True) -> list[dict]:
        """Optimiser groups for this method's tensors; the config's lr and weight_decay override the run's.

        flat_decay=False is the official vision recipe's rule (mmengine's bias_decay_mult = flat_decay_mult = 0):
        where the run's decay applies, biases and 1-D tensors get none; a decay the method sets itself still applies.
        """
        lr = self.config.lr if self.config.lr is not None else lr
        if self.config.weight_decay is not None or flat_decay:
            wd = self.config.weight_decay if self.config.weight_decay is not None else weight_decay
            return [{"params": list(params.values()), "lr": lr, "weight_decay": wd, "method": self.name}]
        flat = [t for name, t in params.items() if t.dim() <= 1 or name.endswith(".bias")]
        rest = [t for name, t in params.items() if not (t.dim() <= 1 or name.endswith(".bias"))]
        return [{"params": rest, "lr": lr, "weight_decay": weight_decay, "method": self.name},
                {"params": flat, "lr": lr, "weight_decay": 0.0, "method": self.name}]

    def clash(self, other: Method) -> str | None:
        """Why this method cannot be combined with `other`, or None."""
        overlap = _overlap(self.targets, other.targets)
        if overlap and (self.exclusive or other.exclusive):
            alone = self.name if self.exclusive else other.name
            return f"{self.name} and {other.name} both change {overlap}, and {alone} must be alone there"
        return None


def _overlap(a: frozenset, b: frozenset) -> str | None:
    for layer, block in a:
        for other_layer, other_block in b:
            if layer == other_layer and (block is None or other_block is None or block == other_block):
                return layer if block is None or other_block is None else f"the {block} rows of {layer}"
    return None


# ---------------------------------------------------------------- helpers shared by the methods


def projections(model, role: str) -> list[Projection]:
    """The `role` projection of every mixer (and direction), or of every layer beside the mixers that has one (a
    hybrid's attention and MLP roles, model/interface.py LAYER_PROJECTION_ROLES); NotApplicable when there is none."""
    if role in LAYER_PROJECTION_ROLES:
        return model.layer_projections(role)
    return [p for mixer in model.peft_mixers() for p in mixer.projections(role)]


def is_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


@torch.no_grad()
def kaiming_(weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default initialisation; skipped on the meta device (shapes only)."""
    if not is_meta(weight):
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def owner_and_attr(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module holding `path`'s last component, and that component's name."""
    parent, _, name = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), name


class AdaptedLayer(nn.Module):
    """A frozen layer plus the deltas methods hang on it: out = base(x), then each delta updates out.

    The shared wrapping logic of the weight methods (the LoRAs, DoRA, parallel adapter). A delta is a
    module with forward(x, out) -> out; mergeable ones also have merge_into(base).
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.deltas = nn.ModuleDict()

    def forward(self, x):
        out = self.base(x)
        for delta in self.deltas.values():
            out = delta(x, out)
        return out


def add_delta(owner: nn.Module, attr: str, key: str, delta: nn.Module) -> None:
    """Hangs `delta` under `key` on owner.attr, wrapping the layer on first use."""
    layer = getattr(owner, attr)
    if not isinstance(layer, AdaptedLayer):
        layer = AdaptedLayer(layer)
        setattr(owner, attr, layer)
    if key in layer.deltas:
        raise ConfigError(f"{key} is attached to {attr} twice")
    layer.deltas[key] = delta


def remove_delta(owner: nn.Module, attr: str, key: str) -> nn.Module:
    """Takes the delta off again; unwraps the layer when no delta is left."""
    layer = getattr(owner, attr)
    delta = layer.deltas.pop(key)
    if not len(layer.deltas):
        setattr(owner, attr, layer.base)
    return delta


class PerDirection(nn.ModuleDict):
    """The deltas of one method on a stacked layer (model/interface.py StackedLinear), by direction: each is an
    ordinary delta of a linear layer, run on its direction's slice: x (b, K, L, in), out (b, K, L, out)."""

    def forward(self, x, out):
        parts = [self[str(k)](x[:, k], out[:, k]) if str(k) in self else out[:, k] for k in range(out.shape[1])]
        return torch.stack(parts, dim=1)


def attach_delta(p: Projection, key: str, delta: nn.Module) -> None:
    """Hangs `delta` on projection p's layer under `key`; on a stacked layer, in the slot of p's direction."""
    if not p.stacked:
        return add_delta(p.owner, p.attr, key, delta)
    layer = getattr(p.owner, p.attr)
    if not (isinstance(layer, AdaptedLayer) and key in layer.deltas):
        add_delta(p.owner, p.attr, key, PerDirection())
        layer = getattr(p.owner, p.attr)
    group = layer.deltas[key]
    if str(p.direction) in group:
        raise ConfigError(f"{key} is attached to direction {p.direction} of {p.attr} twice")
    group[str(p.direction)] = delta


def detach_delta(p: Projection, key: str) -> nn.Module:
    """Takes the delta of `key` off projection p's layer (its direction's, on a stacked layer) and returns it."""
    if not p.stacked:
        return remove_delta(p.owner, p.attr, key)
    group = getattr(p.owner, p.attr).deltas[key]
    delta = group.pop(str(p.direction))
    if not len(group):
        remove_delta(p.owner, p.attr, key)
    return delta


class OnPart(nn.Module):
    """A parametrization applying `inner` to one part of a tensor along its first axis (TensorSlot.index: rows, or one
    direction's entry of a stacked tensor); the rest passes through unchanged."""

    def __init__(self, inner: nn.Module, index: int | tuple[int, int]):
        super().__init__()
        self.inner = inner
        self.index = index

    def forward(self, t):
        return with_part(t, self.index, self.inner(part_of(t, self.index)))


def add_parametrization(slot: TensorSlot, module: nn.Module) -> None:
    """Parametrizes the slot's tensor with `module` (which maps the slot's value, whole or its part, to a new value
    of the same shape). Several may sit on one tensor (one per direction of a stacked tensor)."""
    parametrization = module if slot.index is None else OnPart(module, slot.index)
    parametrize.register_parametrization(slot.owner, slot.name, parametrization)


def fold_parametrizations(slots: list[TensorSlot]) -> None:
    """Folds every parametrization of the slots' tensors into them (each tensor once; the deltas methods hang there
    add to the tensor, so folding them together is exact)."""
    for slot in slots:
        if parametrize.is_parametrized(slot.owner, slot.name):
            parametrize.remove_parametrizations(slot.owner, slot.name, leave_parametrized=True)


__all__ = ["REGISTRY", "register", "MethodConfig", "Method", "Example", "AdaptedLayer", "add_delta", "remove_delta",
           "PerDirection", "attach_delta", "detach_delta", "OnPart", "add_parametrization", "fold_parametrizations",
           "projections", "unwrap", "kaiming_", "is_meta", "get_module", "owner_and_attr", "option",
           "TABLE9_LR", "TABLE9_DECAY"]
