"""Partial tuning (paper Section 3.3): train a zero-initialised delta on one small tensor of every mixer.

    A_log -> A_log + delta        D, conv1d.weight and dt_proj.bias (the block's only bias) likewise

The delta rides on the tensor through `torch.nn.utils.parametrize`, so the mixer reads A_log + delta
wherever it reads A_log and merging is `remove_parametrizations(leave_parametrized=True)`. Weight decay on
the delta is the paper's modified decay |W - W_pretrained|^2: it pulls the tensor back toward its
pretrained value, not toward zero. Default strengths are the official ones: 1e-3 for A, D and conv1d (x10 of
the base 1e-4) and 1e-2 for the dt bias (x100). Vim's mixers get one delta per scan direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .base import Method, MethodConfig, direction_layers, option, register


@dataclass
class PartialConfig(MethodConfig):
    weight_decay: float | None = option(1e-3, "decay of the delta = decay of |W - W_pretrained|^2", minimum=0)


@dataclass
class PartialBiasConfig(MethodConfig):
    weight_decay: float | None = option(1e-2, "decay of the delta = decay of |W - W_pretrained|^2", minimum=0)


class Delta(nn.Module):
    """Parametrization W = W0 + delta with a trainable delta that starts at zero."""

    def __init__(self, original: torch.Tensor):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros_like(original))

    def forward(self, original):
        return original + self.delta


class PartialTuning(Method):
    """A delta on `tensor` of `layer` in every mixer and direction; `tensor` None: the layer is the tensor."""

    family = "partial tuning"
    Config = PartialConfig
    layer: str
    tensor: str | None = None

    def _owners(self, model):
        for mixer, attr in direction_layers(model, self.layer):
            if self.tensor is None:
                yield mixer, attr
            else:
                layer = getattr(mixer, attr)
                yield getattr(layer, "base", layer), self.tensor

    def attach(self, model):
        params = []
        for owner, name in self._owners(model):
            delta = Delta(getattr(owner, name))
            parametrize.register_parametrization(owner, name, delta)
            params.append(delta.delta)
        return params

    def merge(self, model):
        for owner, name in self._owners(model):
            parametrize.remove_parametrizations(owner, name, leave_parametrized=True)


# id: (layer, tensor, config, description). One line here adds a partially tuned tensor of the mixer.
PARTIAL_TARGETS = {
    "partial_a": ("A_log", None, PartialConfig, "A-tuning: a delta on A_log (E x N per direction)"),
    "partial_d": ("D", None, PartialConfig, "D-tuning: a delta on the skip D (E per direction)"),
    "partial_conv1d": ("conv1d", "weight", PartialConfig, "Conv1d-tuning: a delta on the causal conv's kernel"),
    "partial_bias": ("dt_proj", "bias", PartialBiasConfig, "Bias-tuning: a delta on dt_proj's bias, the block's only bias"),
}

for _name, (_layer, _tensor, _config, _text) in PARTIAL_TARGETS.items():
    register(type(_name, (PartialTuning,), {
        "name": _name, "layer": _layer, "tensor": _tensor, "Config": _config, "description": _text,
        "targets": frozenset({(f"{_layer}.{_tensor}" if _tensor else _layer, None)}),
    }))
