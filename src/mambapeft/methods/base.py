"""What every PEFT method is made of, and the registry that lists them.

A method is a small class beside its config dataclass:

    @register
    class MyMethod(Method):
        name = "my_method"                     # the id users type
        family = "LoRA"                        # groups `mambapeft methods`
        description = "one line for `mambapeft methods`"
        Config = MyConfig                      # a MethodConfig dataclass; every field has a help text

        def attach(self, model): ...           # add parts to the model, return the tensors it trains
        def merge(self, model): ...            # fold into the weights (mergeable methods only)

Adding a method is one new file in this folder and one import line in `methods/__init__.py`.
Methods reach the model only through what every model offers (`peft_mixers()`, `embedding_path`,
`head_path`, `hooks`, `is_causal`, `d_model`), so the same class serves the language model and Vision Mamba;
`DIRECTION_NAMES` gives the per-direction parameters of Vim's bidirectional mixers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..model.mixer import DIRECTION_NAMES, MambaMixer

REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    if cls.name in REGISTRY:
        raise RuntimeError(f"two methods are named {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


def option(default, help: str, **limits):
    """A config field with its help text and optional limits: minimum, maximum, choices."""
    return field(default=default, metadata={"help": help, **limits})


@dataclass
class MethodConfig:
    """Base of every method's hyperparameters; per-method optimiser settings live here too."""

    lr: float | None = option(None, "learning rate of this method's parameters (default: the run's)", exclusive_minimum=0)
    weight_decay: float | None = option(None, "weight decay of this method's parameters (default: the run's)", minimum=0)

    def validate(self, method: str) -> None:
        """Checks every field against its limits; the message names the method and the option."""
        check_options(self, method)


def check_options(config, where: str) -> None:
    """Checks every field of a dataclass made with `option` against its limits (choices, minimum, maximum)."""
    for f in fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None:
            continue
        text = f"{where}: {f.name}={value!r}"
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{text} is not one of {', '.join(map(str, meta['choices']))}")
        if "minimum" in meta and value < meta["minimum"]:
            raise ConfigError(f"{text} must be >= {meta['minimum']}")
        if "exclusive_minimum" in meta and not value > meta["exclusive_minimum"]:
            raise ConfigError(f"{text} must be > {meta['exclusive_minimum']}")
        if "maximum" in meta and value > meta["maximum"]:
            raise ConfigError(f"{text} must be <= {meta['maximum']}")


class Method:
    """One attached PEFT method. Subclasses set the class attributes and implement `attach`."""

    name: ClassVar[str]
    family: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    mergeable: ClassVar[bool] = True
    merge_order: ClassVar[int] = 0            # merged in ascending order (methods that reshape layers go last)
    # which parts of the model the method changes: (layer, row block) pairs; used to find clashes
    targets: ClassVar[frozenset] = frozenset()
    exclusive: ClassVar[bool] = False         # True: nothing else may touch its targets (DoRA's normalisation)

    def __init__(self, config: MethodConfig):
        self.config = config

    def check(self, model) -> None:
        """Raises ConfigError if `model` lacks what this method needs (called before anything is attached)."""

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

    def on_step_end(self, model, step: int) -> None:
        """Called after optimiser step `step` (1-based)."""

    def phase_name(self) -> str:
        return ""

    def after_load(self) -> None:
        """Called after the adapter's tensors were loaded."""

    def param_groups(self, params: dict[str, torch.Tensor], lr: float, weight_decay: float) -> list[dict]:
        """Optimiser groups for this method's tensors; the config's lr and weight_decay override the run's."""
        lr = self.config.lr if self.config.lr is not None else lr
        wd = self.config.weight_decay if self.config.weight_decay is not None else weight_decay
        return [{"params": list(params.values()), "lr": lr, "weight_decay": wd, "method": self.name}]

    def clash(self, other: "Method") -> str | None:
        """Why this method cannot be combined with `other`, or None."""
        overlap = _overlap(self.targets, other.targets)
        if overlap and (self.exclusive or other.exclusive):
            return f"{self.name} and {other.name} both change {overlap}, and {self.name if self.exclusive else other.name} must be alone there"
        return None


def _overlap(a: frozenset, b: frozenset) -> str | None:
    for layer, block in a:
        for other_layer, other_block in b:
            if layer == other_layer and (block is None or other_block is None or block == other_block):
                return layer if block is None or other_block is None else f"the {block} rows of {layer}"
    return None


# ---------------------------------------------------------------- helpers shared by the methods


def direction_layers(model, layer: str):
    """(mixer, attribute name) of `layer` in every mixer and, for per-direction layers, every direction."""
    per_direction = layer in DIRECTION_NAMES[0]
    for mixer in model.peft_mixers():
        directions = range(mixer.num_directions) if per_direction else [0]
        for d in directions:
            yield mixer, DIRECTION_NAMES[d][layer] if per_direction else layer


def row_block(mixer: MambaMixer, layer: str, block: str | None) -> tuple[int, int]:
    """Output rows of a named block: X/Z halves of in_proj; dt/B/C rows of x_proj; None = all rows."""
    E, R, N = mixer.d_inner, mixer.dt_rank, mixer.d_state
    blocks = {
        ("in_proj", "X"): (0, E), ("in_proj", "Z"): (E, 2 * E),
        ("x_proj", "dt"): (0, R), ("x_proj", "B"): (R, R + N), ("x_proj", "C"): (R + N, R + 2 * N),
    }
    if block is None:
        base = getattr(mixer, layer)
        base = getattr(base, "base", base)
        return 0, base.weight.shape[0]
    return blocks[(layer, block)]


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


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


class AdaptedLayer(nn.Module):
    """A frozen layer plus the deltas methods hang on it: out = base(x), then each delta updates out.

    The shared wrapping logic of the weight methods (LoRA family, DoRA, parallel adapter). A delta is a
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
