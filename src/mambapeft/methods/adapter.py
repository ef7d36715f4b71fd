"""Parallel adapter (He et al., 2022) beside out_proj, Mamba's counterpart of a Transformer's FFN (paper Section 3.1).

    out = out_proj(y) + s * Up(Dropout(ReLU(Down(y))))   y (b, L, E): the gated SSM output, out_proj's own input
                                                          Down E -> dim (Kaiming), Up dim -> d (zeros: identity)

As the official code builds it (`vim_peft_all.py` L592-618, L801-804): no biases and dropout 0.1 after the ReLU;
`bias=true` adds the two biases our first version had (+dim + d per layer). The ReLU makes it non-linear, so it
cannot be folded into out_proj: after merging it stays as extra parameters (dim x (E + d) per layer). Vision Mamba
shares out_proj between its scan directions, so each block gets one adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import (
    TABLE9_DECAY,
    TABLE9_LR,
    Example,
    Method,
    MethodConfig,
    attach_delta,
    kaiming_,
    option,
    projections,
    register,
)


@dataclass
class ParallelAdapterConfig(MethodConfig):
    dim: int = option(32, "bottleneck width of the adapter", minimum=1)
    s: float = option(0.1, "scale s of the adapter's output", exclusive_minimum=0)
    dropout: float = option(0.1, "dropout after the ReLU (the official code's)", minimum=0, maximum=0.99)
    bias: bool = option(False, "biases on Down and Up (the official adapter has none)")


class ParallelBranch(nn.Module):
    """out + s * up(relu(down(y))), hung on out_proj as a delta of an AdaptedLayer."""

    def __init__(self, base: nn.Linear, config: ParallelAdapterConfig):
        super().__init__()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.s = config.s
        self.down = nn.Linear(base.in_features, config.dim, bias=config.bias, **factory)
        self.up = nn.Linear(config.dim, base.out_features, bias=config.bias, **factory)
        self.dropout = nn.Dropout(config.dropout)
        kaiming_(self.down.weight)
        with torch.no_grad():
            if self.down.weight.device.type != "meta":
                self.up.weight.zero_()
                for linear in (self.down, self.up):
                    if linear.bias is not None:
                        linear.bias.zero_()

    def forward(self, y, out):
        return out + self.s * self.up(self.dropout(F.relu(self.down(y))))


@register
class ParallelAdapter(Method):
    name = "parallel_adapter"
    category = "adapter"
    description = "parallel adapter beside out_proj: out += s * Up(ReLU(Down(y))); stays unmerged (non-linear)"
    Config = ParallelAdapterConfig
    mergeable = False
    why_not_mergeable = "the ReLU between its two projections is not linear, so no weight can absorb it"
    examples = (Example("parallel_adapter:dim=8"), Example("parallel_adapter:dim=8,bias=true,dropout=0"))
    # VMamba (Table 5): the official `adaptformer` flag, dim_adaptf 32 at set_peft's default scale s_adaptf = 1
    presets = {"parallel_adapter": ["parallel_adapter:dim=32,s=0.1,dropout=0.1,bias=false"],
               "vmamba/parallel_adapter": ["parallel_adapter:dim=32,s=1,dropout=0.1,bias=false"]}
    scaled_update = True
    search_step1 = {"dim": 8, "s": 0.1}
    search_step2 = {"dim": {"int": [4, 16]}, "s": {"log": [1e-2, 1.0]}, "lr": TABLE9_LR, "weight_decay": TABLE9_DECAY}

    def check(self, model):
        projections(model, "out_proj")

    def attach(self, model):
        params = []
        for p in projections(model, "out_proj"):
            branch = ParallelBranch(p.layer, self.config)
            attach_delta(p, self.name, branch)
            params += list(branch.parameters())
        return params
