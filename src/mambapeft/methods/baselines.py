"""The two baselines every PEFT table has: full fine-tuning and linear probing (the head only)."""

from __future__ import annotations

from ..errors import NotApplicable
from .base import Example, Method, get_module, register

FULL_LR = {"mamba-130m": 5e-5, "mamba-370m": 5e-5, "mamba-790m": 5e-5, "mamba-1.4b": 5e-5, "builtin": 1e-3}


@register
class FullFineTuning(Method):
    name = "full"
    family = "baseline"
    description = "full fine-tuning: every weight of the model is trained"
    examples = (Example("full"),)
    presets = {"full": ["full"]}
    lr_by_size = FULL_LR                   # paper: 5e-5 for every size; the built-in model: 1e-3 (measured)

    def attach(self, model):
        return list(model.parameters())

    def merge(self, model):
        pass                                   # the weights are the model already

    def clash(self, other):
        return f"full trains every weight already; it cannot be combined with {other.name}"


@register
class LinearProbe(Method):
    name = "linear_probe"
    family = "baseline"
    description = "linear probing: only the output head is trained (a tied LM head gets its own copy)"
    targets = frozenset({("head", None)})
    examples = (Example("linear_probe"),)
    presets = {"linear_probe": ["linear_probe"]}

    def check(self, model):
        if model.head_path is None:
            raise NotApplicable(f"linear_probe: {type(model).__name__} has no output head")

    def attach(self, model):
        model.untie_weights()
        return list(get_module(model, model.head_path).parameters())

    def merge(self, model):
        pass                                   # the head is a plain weight already
