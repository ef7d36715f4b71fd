"""DoRA (Liu et al., 2024): `dora_p_x` on the X half of in_proj (the paper's Table 6 follow-up to lora_p_x), and DoRA on
whole layers (`dora_in_proj`, `dora_x_proj`, `dora_dt_proj`, `dora_out_proj`: what Hugging Face peft's `use_dora`
makes, so peft DoRA adapters import exactly).

    V = W_X + s * Up @ Down            W_X (E, d): the X rows of in_proj (or the whole layer)

    magnitude=output (ours, the DoRA paper's and Hugging Face peft's):  W_X' = m * V / ||V||_rows    m (E,)
    magnitude=input  (the official MambaPEFT code):                     W_X' = V * m / ||V||_cols    m (d,)

m starts at the same norms of W_X, so the update starts as the identity; the model learns a direction (LoRA on V)
and a magnitude (m) apart. As in both codes, ||V|| is a constant in the backward pass. The official code normalises
each *input column* of W_X (`vim_peft_all.py` L628, L643-645: the norm over dim 0) and applies no dropout; the
`paper/dora_p_x` preset uses that. Because the normalisation covers the whole of W_X, no other method may change the
X rows too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Example, Method, attach_delta, detach_delta, option, projections, register
from .lora import LinearLoRA, LoRAConfig, LoRADelta, check_rank


@dataclass
class DoRAConfig(LoRAConfig):
    magnitude: str = option("output", "what the learned magnitude scales: output (one value per row, the DoRA paper "
                            "and HF peft) or input (one per input column, the official MambaPEFT code)",
                            choices=("output", "input"))


class DoRADelta(LoRADelta):
    """The X rows as m-scaled, normalised V = W_rows + s * Up @ Down (see the module docstring for the two axes)."""

    def __init__(self, base: nn.Linear, start: int, stop: int, config: DoRAConfig):
        super().__init__(base.in_features, start, stop, config, like=base.weight)
        self._base = [base]                        # a plain list: not a submodule, so not saved twice
        self.axis = 1 if config.magnitude == "output" else 0     # the dimension the norm runs over
        self.magnitude = nn.Parameter(base.weight.detach()[start:stop].norm(dim=self.axis))

    def direction(self) -> torch.Tensor:
        return self._base[0].weight[self.start : self.stop] + self.s * self.up @ self.down          # V (rows, d)

    def scale(self) -> torch.Tensor:
        return self.magnitude / self.direction().norm(dim=self.axis).detach()           # (rows,) or (d,)

    def forward(self, x, out):
        # a bias (S4D's output linear has one) is added after the scaling, as HF peft does and as merging leaves it
        bias = self._base[0].bias
        bias = 0 if bias is None else bias[self.start : self.stop]
        if self.axis == 1:                                                    # per output row
            rows = out[..., self.start : self.stop] - bias + self.branch(x)   # V x, computed as W x + LoRA(x)
            out[..., self.start : self.stop] = self.scale() * rows + bias
            return out
        xs = x * self.scale()                                                 # per input column: V diag(scale) x
        out[..., self.start : self.stop] = (F.linear(xs, self._base[0].weight[self.start : self.stop]) + self.branch(xs)
                                            + bias)
        return out

    @torch.no_grad()
    def merge_into(self, base: nn.Linear) -> None:
        scale = self.scale()
        update = self.direction() * (scale[:, None] if self.axis == 1 else scale[None, :])
        base.weight[self.start : self.stop].copy_(update.to(base.weight.dtype))


class DoRA(Method):
    """DoRA on the `role` projection of every mixer. Subclassed once per target below."""

    category = "LoRA"
    Config = DoRAConfig
    role: str
    exclusive = True                  # the normalisation covers the whole of its rows: nothing else may change them
    scaled_update = True
    search_step2 = LinearLoRA.search_step2

    def check(self, model):
        check_rank(self.name, self.config.r, projections(model, self.role))

    def attach(self, model):
        params = []
        for p in projections(model, self.role):
            delta = DoRADelta(p.layer, *p.rows, self.config)
            attach_delta(p, self.name, delta)
            params += [delta.down, delta.up, delta.magnitude]
        return params

    def merge(self, model):
        for p in projections(model, self.role):
            detach_delta(p, self.name).merge_into(p.layer)


# id: (role, (layer, row block) for clash checks, description)
DORA_TARGETS = {
    "dora_p_x": ("X", ("in_proj", "X"), "DoRA on the X half of in_proj (paper Table 6): LoRA direction plus a "
                 "learned magnitude"),
    "dora_in_proj": ("in_proj", ("in_proj", None), "DoRA on the whole in_proj (Hugging Face peft's use_dora)"),
    "dora_x_proj": ("x_proj", ("x_proj", None), "DoRA on x_proj (one per direction in Vim and VMamba)"),
    "dora_dt_proj": ("dt_proj", ("dt_proj", None), "DoRA on dt_proj (one per direction in Vim and VMamba)"),
    "dora_out_proj": ("out_proj", ("out_proj", None), "DoRA on out_proj"),
}

for _name, (_role, _target, _text) in DORA_TARGETS.items():
    register(type(_name, (DoRA,), {
        "name": _name, "role": _role, "description": _text, "targets": frozenset({_target}),
        "examples": ((Example(f"{_name}:r=4"), Example(f"{_name}:r=4,magnitude=input,dropout=0"))
                     if _name == "dora_p_x" else (Example(f"{_name}:r=2"),)),
        # the paper's Table 6 row; the official axis, no dropout
        "presets": {_name: ["dora_p_x:r=64,magnitude=input,dropout=0"]} if _name == "dora_p_x" else {},
    }))
