"""The two baselines every PEFT table has: full fine-tuning and linear probing (the head only)."""

from __future__ import annotations

from .base import Method, get_module, register
from .lora import untie_head


@register
class FullFineTuning(Method):
    name = "full"
    family = "baseline"
    description = "full fine-tuning: every weight of the model is trained"

    def attach(self, model):
        return [p for p in model.parameters()]

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

    def attach(self, model):
        untie_head(model)
        return list(get_module(model, model.head_path).parameters())

    def merge(self, model):
        pass                                   # the head is a plain weight already
