"""DoRA (Liu et al., 2024) on the X half of in_proj: `dora_p_x`, the paper's Table 6 follow-up to lora_p_x.

    V = W_X + s * Up @ Down            W_X (E, d): the X rows of in_proj
    W_X' = m * V / ||V||               ||V|| the norm of each output row (E,); m (E,) starts at ||W_X||

so the update starts as the identity and learns a direction (LoRA on V) and a magnitude (m) apart. As in the
DoRA paper, ||V|| is treated as a constant in the backward pass (it saves memory and changes little).
Because the normalisation covers the whole of W_X's rows, no other method may change the X rows too.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Example, Method, add_delta, projections, register, remove_delta
from .lora import LinearLoRA, LoRAConfig, LoRADelta, check_rank


class DoRADelta(LoRADelta):
    """out[..., rows] = m / ||V|| * (W_rows x + s * Up(Down(x))), V = W_rows + s * Up @ Down."""

    def __init__(self, base: nn.Linear, start: int, stop: int, config: LoRAConfig):
        super().__init__(base.in_features, start, stop, config, like=base.weight)
        self._base = [base]                        # a plain list: not a submodule, so not saved twice
        self.magnitude = nn.Parameter(base.weight.detach()[start:stop].norm(dim=1))

    def direction_norm(self) -> torch.Tensor:
        weight = self._base[0].weight[self.start : self.stop]
        return (weight + self.s * self.up @ self.down).norm(dim=1)                         # (rows,)

    def forward(self, x, out):
        lora = self.s * F.linear(F.linear(self.dropout(x), self.down), self.up)           # (b, L, rows)
        scale = self.magnitude / self.direction_norm().detach()                            # (rows,)
        out[..., self.start : self.stop] = scale * (out[..., self.start : self.stop] + lora)
        return out

    @torch.no_grad()
    def merge_into(self, base: nn.Linear) -> None:
        rows = base.weight[self.start : self.stop]
        update = (rows + self.s * self.up @ self.down) * (self.magnitude / self.direction_norm())[:, None]
        rows.copy_(update.to(base.weight.dtype))


@register
class DoRAPartialX(Method):
    name = "dora_p_x"
    family = "LoRA"
    description = "DoRA on the X half of in_proj (paper Table 6): LoRA direction plus a learned row magnitude"
    Config = LoRAConfig
    targets = frozenset({("in_proj", "X")})
    exclusive = True
    examples = (Example("dora_p_x:r=4"),)
    presets = {"dora_p_x": ["dora_p_x:r=64"]}
    scaled_update = True
    search_step2 = LinearLoRA.search_step2

    def check(self, model):
        check_rank(self.name, self.config.r, projections(model, "X"))

    def attach(self, model):
        params = []
        for p in projections(model, "X"):
            delta = DoRADelta(p.layer, *p.rows, self.config)
            add_delta(p.owner, p.attr, self.name, delta)
            params += [delta.down, delta.up, delta.magnitude]
        return params

    def merge(self, model):
        for p in projections(model, "X"):
            remove_delta(p.owner, p.attr, self.name).merge_into(p.layer)
