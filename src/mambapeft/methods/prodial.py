"""ProDiaL (Ham, Kim, Woo, Kim, "Parameter Efficient Mamba Tuning via Projector-targeted Diagonal-centric Linear
Transformation", CVPR 2025, arXiv 2411.15224): the projectors' pretrained weights are transformed, not updated.

The paper's finding is that Mamba's projectors (in_proj and out_proj), not its SSM, carry transfer learning; so it
keeps each projector's W frozen and learns a linear transformation T of its input space, W' = W T, with T made of a
(block-)diagonal part D_b, which starts at the identity, and a small off-diagonal part eps, a low-rank product:

    T = D_b + s * Up @ Down          D_b = blockdiag(D_1, ..., D_{n/b}), each D_k (b, b), identity at the start
                                     Down (r, n) nn.Linear's init, Up (n, r) zero: T = I, the model is the base model
    out = W' x + bias = base(x) + W ((D_b - I) x + s * Up(Down(x)))      n = the projector's input width

Only D_b, Down and Up train (n b + 2 n r per projector, where b divides n). W' = W T merges exactly; it is merged
before any other method's delta on the same layer (merge_order -1), since T transforms W alone and not what others
add. DoRA, which normalises W's columns, must be alone on its layer and refuses to combine.

Families: every family whose mixers have in_proj and out_proj (Mamba, Mamba-2, Vim, VMamba, the hybrids' SSM
layers); S4D has neither and raises NotApplicable. The block size b and rank r of the paper's runs, and whether T
acts on W's input side, are what we read from its description (docs/fidelity.md); its code was not released.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .base import (
    TABLE9_DECAY,
    TABLE9_LR,
    Example,
    Method,
    MethodConfig,
    attach_delta,
    detach_delta,
    kaiming_,
    option,
    projections,
    register,
)

PROJECTORS = ("in_proj", "out_proj")


@dataclass
class ProDiaLConfig(MethodConfig):
    block: int = option(1, "block size b of the diagonal part D_b (1: a plain diagonal; a width b does not divide "
                        "ends in one smaller block)", minimum=1)
    r: int = option(4, "rank of the off-diagonal part eps = s * Up @ Down (0: the diagonal part alone)", minimum=0)
    s: float = option(1.0, "scale s of the off-diagonal part", exclusive_minimum=0)


class DiagonalCentricDelta(nn.Module):
    """W T x - W x for the frozen layer it sits on: out + W ((D_b - I) x + s Up(Down(x))). x (..., n) -> (..., out)."""

    def __init__(self, layer, config: ProDiaLConfig):
        super().__init__()
        n, b, r = layer.in_features, config.block, config.r
        like = layer.weight
        factory = {"device": like.device, "dtype": like.dtype}
        self.block, self.s = b, config.s
        self.diagonal = nn.Parameter(torch.eye(b, **factory).expand(n // b, b, b).clone())   # (n//b, b, b) D_b
        tail = n % b                        # a width b does not divide ends in one smaller block
        self.tail = nn.Parameter(torch.eye(tail, **factory)) if tail else None              # (n % b, n % b)
        self.down = nn.Parameter(kaiming_(torch.empty(r, n, **factory))) if r else None       # (r, n)
        self.up = nn.Parameter(torch.zeros(n, r, **factory)) if r else None                 # (n, r)
        self._layer = (layer,)              # the frozen layer whose W it transforms; a tuple keeps it out of the tree

    def transformed_minus_identity(self, x: torch.Tensor) -> torch.Tensor:
        """(T - I) x: x (..., n) -> (..., n)."""
        full = self.diagonal.shape[0] * self.block
        blocks = x[..., :full].unflatten(-1, (-1, self.block))                       # (..., n//b, b)
        moved = torch.einsum("kij,...kj->...ki", self.diagonal, blocks) - blocks      # (D_k - I) x_k
        moved = moved.flatten(-2)                                                    # (..., full)
        if self.tail is not None:
            rest = x[..., full:]                                                     # (..., n % b)
            moved = torch.cat([moved, F.linear(rest, self.tail) - rest], dim=-1)    # (..., n)
        if self.down is not None:
            moved = moved + self.s * F.linear(F.linear(x, self.down), self.up)
        return moved

    def transform(self) -> torch.Tensor:
        """T (n, n) as a matrix."""
        T = torch.block_diag(*self.diagonal, *([self.tail] if self.tail is not None else []))
        if self.down is not None:
            T = T + self.s * self.up @ self.down
        return T

    def forward(self, x, out):
        weight = self._layer[0].weight                                               # (out, n) frozen
        return out + F.linear(self.transformed_minus_identity(x).to(weight.dtype), weight).to(out.dtype)

    @torch.no_grad()
    def merge_into(self, base) -> None:
        base.weight.copy_(base.weight @ self.transform().to(base.weight.dtype))


@register
class ProDiaL(Method):
    name = "prodial"
    category = "projector transform"
    description = ("ProDiaL (CVPR 2025): in_proj and out_proj as W (D_b + s Up Down), a learned block-diagonal plus "
                   "low-rank transformation of the frozen weight; merges exactly")
    Config = ProDiaLConfig
    merge_order = -1                          # W' = W T before other deltas on the layer are added to W
    targets = frozenset({("in_proj", None), ("out_proj", None)})
    examples = (Example("prodial:r=2"), Example("prodial:block=2,r=0"))
    presets = {"prodial": ["prodial:block=1,r=4,s=1"]}
    search_step1 = {"block": 1, "r": 2}
    search_step2 = {"block": {"choice": [1, 2, 4]}, "r": {"int": [0, 8]}, "s": {"log": [0.1, 1.0]},
                    "lr": TABLE9_LR, "weight_decay": TABLE9_DECAY}

    def check(self, model):
        for role in PROJECTORS:
            for p in projections(model, role):
                n = p.layer.in_features
                if self.config.block > n:
                    raise ConfigError(f"prodial: block={self.config.block} is wider than {p.attr}'s input ({n}); "
                                      f"use block <= {n}")
                if p.rows != (0, p.layer.weight.shape[0]):
                    raise ConfigError(f"prodial: {p.attr} is a row block here; ProDiaL transforms whole projectors")

    def attach(self, model):
        params = []
        for role in PROJECTORS:
            for p in projections(model, role):
                delta = DiagonalCentricDelta(p.layer, self.config)
                attach_delta(p, self.name, delta)
                params += [t for t in (delta.diagonal, delta.tail, delta.down, delta.up) if t is not None]
        return params

    def merge(self, model):
        for role in PROJECTORS:
            for p in projections(model, role):
                detach_delta(p, self.name).merge_into(p.layer)

    def explain_count(self):
        c = self.config
        return (f"per projector of input width n: D_b n x {c.block} (blocks of {c.block}) + Down and Up 2 x n x {c.r}; "
                "on in_proj (n = d) and out_proj (n = E) of every mixer")
