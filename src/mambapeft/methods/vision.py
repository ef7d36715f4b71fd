"""Partial tuning of the two tensors only Vision Mamba has: the class token and the position embedding.

    cls_token (1, 1, d) -> cls_token + delta          pos_embed (1, M + 1, d) -> pos_embed + delta

The same machinery as partial.py (a zero-initialised `Delta` parametrization, merged by removing it, weight
decay on the delta = decay toward the pretrained value); only where the tensor lives differs: on the model,
not in the mixers. The default decay is the official base strength 1e-4 (A, D and conv1d use x10).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import option, register
from .partial import PartialConfig, PartialTuning


@dataclass
class VisionPartialConfig(PartialConfig):
    weight_decay: float | None = option(1e-4, "decay of the delta = decay of |W - W_pretrained|^2", minimum=0)


class ModelTensorTuning(PartialTuning):
    """A delta on a tensor held by the model itself (`tensor` names the attribute)."""

    Config = VisionPartialConfig
    tensor: str

    def check(self, model):
        if not hasattr(model, self.tensor):
            raise ConfigError(f"{self.name} needs a Vision Mamba model (one with a {self.tensor}); "
                              f"this model is a {type(model).__name__}")

    def _owners(self, model):
        yield model, self.tensor


for _name, (_tensor, _text) in {
    "partial_cls_token": ("cls_token", "a delta on Vim's class token (d)"),
    "partial_pos_embed": ("pos_embed", "a delta on Vim's position embedding ((M + 1) x d)"),
}.items():
    register(type(_name, (ModelTensorTuning,), {
        "name": _name, "tensor": _tensor, "description": _text, "family": "partial tuning",
        "targets": frozenset({(_tensor, None)}),
    }))
