"""The two baselines every PEFT table has: full fine-tuning and linear probing (the head only)."""

from __future__ import annotations

from ..errors import NotApplicable
from .base import Example, Method, get_module, register

FULL_LR = {"mamba-130m": 5e-5, "mamba-370m": 5e-5, "mamba-790m": 5e-5, "mamba-1.4b": 5e-5, "builtin": 1e-3}


@register
class FullFineTuning(Method):
    name = "full"
    category = "baseline"
    description = "full fine-tuning: every weight of the model is trained"
    examples = (Example("full"),)
    presets = {"full": ["full"], "vmamba/full": ["full"]}             # Table 5's Full row too
    lr_by_size = FULL_LR                   # paper: 5e-5 for every size; the built-in model: 1e-3 (measured)

    def attach(self, model):
        params = list(model.parameters())
        self.total = sum(p.numel() for p in params)
        self.head = self.head_path = None
        if model.head_path is not None:
            head = list(get_module(model, model.head_path).parameters())
            embedding = list(get_module(model, model.embedding_path).parameters()) if model.embedding_path else []
            if not any(h is e for h in head for e in embedding):          # a tied head is the embedding: no note
                self.head, self.head_path = sum(p.numel() for p in head), model.head_path
        return params

    def explain_count(self):
        """The backbone without the head: what the vision tables' Full rows count (VMamba Table 5: 49,379K S)."""
        if self.head is None:
            return None
        return (f"of which the output head ({self.head_path}) {self.head:,}; without it {self.total - self.head:,} "
                f"(the paper's vision Full rows count the backbone only)")

    def merge(self, model):
        pass                                   # the weights are the model already

    def clash(self, other):
        return f"full trains every weight already; it cannot be combined with {other.name}"


@register
class LinearProbe(Method):
    name = "linear_probe"
    category = "baseline"
    description = "linear probing: only the output head is trained (a tied LM head gets its own copy)"
    targets = frozenset({("head", None)})
    examples = (Example("linear_probe"),)
    presets = {"linear_probe": ["linear_probe"], "vmamba/linear_probe": ["linear_probe"]}   # Table 5's Linear

    def check(self, model):
        if model.head_path is None:
            raise NotApplicable(f"linear_probe: {type(model).__name__} has no output head")

    def attach(self, model):
        model.untie_weights()
        return list(get_module(model, model.head_path).parameters())

    def merge(self, model):
        pass                                   # the head is a plain weight already
