"""Mamba-Adaptor (Xie et al., arXiv 2505.12685, "State Space Model Adaptor for Visual Recognition"), PEFT mode.

Why it exists: a visual Mamba reads the image as a 1-D scan, so (1) a token's state forgets far-away tokens and (2)
the 2-D neighbourhood of a patch is split across distant scan positions. The paper adds two small modules to each
block's SSM output y, the input of out_proj, with the backbone frozen:

    y (b, L, E), on a VMamba (b, H, W, E) read in raster order
    Adaptor-T (memory):   T(y)_i = gamma (.) concat_s  sum_k c^s_ik  y^s(i + p^s_ik)        s = 1..S channel groups
                          p^s_ik = phi_p(y_i)   learned real offsets along the scan (K per group), y^s(q) read by
                                                linear interpolation between the two nearest positions, 0 outside
                          c^s_i  = SoftMax_k(phi_c(y_i))   phi_p, phi_c: Linear E -> S K;  gamma (E,) zeros
    Adaptor-S (spatial):  S(y)   = sum_{r in dilations} DWConv_{k x k, dilation r}(y on its H x W patch grid)
                          (depthwise, no bias, zero kernels; on Vim the class token gets nothing, and the last
                          block has no S: the head reads only the class token, so S there could not change it)
    out = out_proj(y + T(y) + S(y))      = out_proj(y) + W_out (T(y) + S(y))      W_out: out_proj's frozen weight

Both terms start at zero (gamma and the kernels are zeros), so the model starts as the pretrained one; phi_c starts as
nn.Linear does, phi_p's weight at zero with its bias at the offsets +-1, +-2, ... (near neighbours first).

No official code was available to us: this restates the paper's equations (Sec. 3.2-3.3), with these assumptions
(docs/fidelity.md): the "hidden states" T aggregates are the SSM's output tokens y (a scan does not materialise the
(E, N) state of every position), sampled along the scan order; the aggregate is added to y (the paper's h_i := h_i +
sum w_j h_j) through a zero-initialised per-channel gamma so that PEFT starts at the identity; S's dilations default
to 1, 2, 3 with 3 x 3 kernels; both modules sit in every block.

Not mergeable: T's offsets and weights depend on the input, and S mixes neighbouring positions, which no change of
out_proj's weight can express. Vision only: a language model has no 2-D token map (Adaptor-S), and T's offsets read
later tokens, which a causal model must not see.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, NotApplicable
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
class MambaAdaptorConfig(MethodConfig):
    temporal: bool = option(True, "Adaptor-T: input-dependent memory read from learned offsets along the scan")
    spatial: bool = option(True, "Adaptor-S: multi-dilation depthwise convolution on the 2-D patch grid")
    points: int = option(4, "K: positions each group reads (Adaptor-T)", minimum=1)
    groups: int = option(4, "S: channel groups with their own offsets and weights (Adaptor-T); must divide E",
                         minimum=1)
    kernel: int = option(3, "k: kernel size of Adaptor-S's depthwise convolutions (odd)", minimum=1)
    dilations: str = option("1+2+3", "Adaptor-S's dilation rates joined by + (one k x k kernel each; + because a "
                           "spec's options are comma-separated)")

    def dilation_list(self) -> list[int]:
        try:
            rates = [int(r) for r in str(self.dilations).split("+") if r.strip()]
        except ValueError:
            rates = []
        if not rates or min(rates) < 1 or len(set(rates)) != len(rates):
            raise ConfigError(f"mamba_adaptor: dilations={self.dilations!r} must be distinct whole numbers >= 1, "
                              f"joined by + (e.g. 1+2+3)")
        return rates


def read_along(y: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """y (b, L, S, c) read at real positions (b, L, S, K) by linear interpolation, 0 outside [0, L-1]: (b, L, S, K, c).

    The weight of each of the two nearest positions is 1 - distance, so the read is differentiable in the offsets."""
    b, L, S, c = y.shape
    K = positions.shape[-1]
    low = positions.floor()
    frac = (positions - low).unsqueeze(-1)                                  # (b, L, S, K, 1)
    out = 0
    for index, weight in ((low, 1 - frac), (low + 1, frac)):
        inside = ((index >= 0) & (index <= L - 1)).unsqueeze(-1).to(y.dtype)
        idx = index.clamp(0, L - 1).long()                                  # (b, L, S, K)
        # gather along L: y as (b, S, L, c), indices (b, S, L*K)
        src = y.permute(0, 2, 1, 3)                                         # (b, S, L, c)
        flat = idx.permute(0, 2, 1, 3).reshape(b, S, L * K, 1).expand(-1, -1, -1, c)
        got = src.gather(2, flat).reshape(b, S, L, K, c).permute(0, 2, 1, 3, 4)   # (b, L, S, K, c)
        out = out + got * weight * inside
    return out


class AdaptorT(nn.Module):
    """The memory read: y (b, L, E) -> gamma (.) sum_k c_k y(i + p_k), per channel group."""

    def __init__(self, E: int, config: MambaAdaptorConfig, like: torch.Tensor):
        super().__init__()
        if E % config.groups:
            raise ConfigError(f"mamba_adaptor: groups={config.groups} must divide the SSM width E={E}")
        factory = {"device": like.device, "dtype": like.dtype}
        self.S, self.K = config.groups, config.points
        self.offsets = nn.Linear(E, self.S * self.K, **factory)          # phi_p
        self.weights = nn.Linear(E, self.S * self.K, **factory)          # phi_c
        self.gamma = nn.Parameter(torch.zeros(E, **factory))
        kaiming_(self.weights.weight)
        if like.device.type != "meta":
            with torch.no_grad():
                self.offsets.weight.zero_()
                k = torch.arange(self.K)
                start = (k // 2 + 1) * torch.where(k % 2 == 0, -1, 1)      # -1, +1, -2, +2, ...
                self.offsets.bias.copy_(start.repeat(self.S).to(**factory))
                self.weights.bias.zero_()

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        b, L, E = y.shape
        p = self.offsets(y).view(b, L, self.S, self.K)                   # (b, L, S, K) offsets
        c = self.weights(y).view(b, L, self.S, self.K).softmax(-1)        # (b, L, S, K) weights
        positions = torch.arange(L, device=y.device, dtype=y.dtype).view(1, L, 1, 1) + p
        read = read_along(y.view(b, L, self.S, E // self.S), positions)   # (b, L, S, K, E/S)
        return (c.unsqueeze(-1) * read).sum(3).reshape(b, L, E) * self.gamma


class AdaptorS(nn.Module):
    """Sum of depthwise k x k convolutions, one per dilation, on the grid (b, H, W, E) -> (b, H, W, E)."""

    def __init__(self, E: int, config: MambaAdaptorConfig, like: torch.Tensor):
        super().__init__()
        self.rates = config.dilation_list()
        self.kernel = config.kernel
        self.weight = nn.Parameter(torch.zeros(len(self.rates), E, 1, config.kernel, config.kernel,
                                               device=like.device, dtype=like.dtype))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        x = grid.permute(0, 3, 1, 2)                                      # (b, E, H, W)
        out = sum(F.conv2d(x, w, padding=r * (self.kernel // 2), dilation=r, groups=x.shape[1])
                  for w, r in zip(self.weight, self.rates))
        return out.permute(0, 2, 3, 1)                                    # (b, H, W, E)


class AdaptorBranch(nn.Module):
    """out_proj(y) + W_out (T(y) + S(y)), hung on out_proj as a delta; `layout` says how y maps to the grid."""

    def __init__(self, base: nn.Linear, config: MambaAdaptorConfig, layout: tuple[int, int] | None):
        super().__init__()
        self._base = (base,)                     # the frozen out_proj, not a submodule: nothing saved twice
        self.layout = layout                     # Vim: (grid side, class-token index); VMamba: None, y is 4-D
        E = base.in_features
        self.temporal = AdaptorT(E, config, base.weight) if config.temporal else None
        self.spatial = AdaptorS(E, config, base.weight) if config.spatial else None

    def forward(self, y, out):
        if y.dim() == 4:                                                  # VMamba: (b, H, W, E)
            b, H, W, E = y.shape
            delta = 0
            if self.temporal is not None:
                delta = delta + self.temporal(y.reshape(b, H * W, E)).view(b, H, W, E)
            if self.spatial is not None:
                delta = delta + self.spatial(y)
        else:                                                             # Vim: (b, M + 1, E), class token at cls
            side, cls = self.layout
            b, L, E = y.shape
            if side * side + 1 != L:
                raise ConfigError(f"mamba_adaptor: out_proj sees {L} tokens, not the {side * side} patches and the "
                                  f"class token; another method inserts tokens (prompt, affix), so the 2-D grid is "
                                  f"lost. Use mamba_adaptor without soft-token methods")
            delta = 0
            if self.temporal is not None:
                delta = delta + self.temporal(y)
            if self.spatial is not None:
                patches = torch.cat([y[:, :cls], y[:, cls + 1:]], dim=1).view(b, side, side, E)
                s = self.spatial(patches).reshape(b, side * side, E)
                delta = delta + torch.cat([s[:, :cls], torch.zeros_like(s[:, :1]), s[:, cls:]], dim=1)
        return out + F.linear(delta, self._base[0].weight)


@register
class MambaAdaptor(Method):
    name = "mamba_adaptor"
    category = "adapter"
    description = ("Mamba-Adaptor: memory read at learned scan offsets (Adaptor-T) + multi-dilation depthwise conv "
                   "on the patch grid (Adaptor-S), added to out_proj's input; stays unmerged")
    Config = MambaAdaptorConfig
    mergeable = False
    why_not_mergeable = ("Adaptor-T's offsets and weights depend on the input and Adaptor-S mixes neighbouring "
                         "positions; no weight of out_proj can express either")
    examples = (Example("mamba_adaptor:points=2,groups=2"),
                Example("mamba_adaptor:temporal=false,dilations=1,kernel=3"),
                Example("mamba_adaptor:spatial=false,points=3,groups=1"))
    # the paper's PEFT setting as we read it (no official code): both modules, 3 x 3 kernels at dilations 1, 2, 3
    presets = {"mamba_adaptor": ["mamba_adaptor:points=4,groups=4,kernel=3,dilations=1+2+3"]}
    search_step1 = {"points": 2, "groups": 1}
    search_step2 = {"points": {"int": [1, 8]}, "lr": TABLE9_LR, "weight_decay": TABLE9_DECAY}
    search_vision_only = True

    def check(self, model):
        c = self.config
        c.dilation_list()
        if c.kernel % 2 == 0:
            raise ConfigError(f"mamba_adaptor: kernel={c.kernel} must be odd so the convolution keeps the grid centred")
        if not (c.temporal or c.spatial):
            raise ConfigError("mamba_adaptor: temporal=false and spatial=false leave nothing to train; keep at least "
                              "one")
        if getattr(model, "family", None) not in ("vim", "vmamba"):
            raise NotApplicable("Mamba-Adaptor works on a visual token map: Adaptor-S convolves the 2-D patch grid, "
                                "which a language model does not have, and Adaptor-T's learned offsets read later "
                                "tokens, which a causal model must not see")
        widths = sorted({p.layer.in_features for p in projections(model, "out_proj")})   # VMamba: one per stage
        if self.config.temporal and any(E % self.config.groups for E in widths):
            raise ConfigError(f"mamba_adaptor: groups={self.config.groups} must divide the SSM width of every block "
                              f"(E = {', '.join(map(str, widths))})")

    def attach(self, model):
        layout = None
        if model.family == "vim":
            layout = (model.config.grid_size, model.config.cls_position)
        params, seen = [], set()
        found = projections(model, "out_proj")
        for p in found:
            if (id(p.owner), p.attr) in seen:
                continue
            seen.add((id(p.owner), p.attr))
            config = self.config
            if layout is not None and p.owner is found[-1].owner:
                # Vim's head reads only the class token, and after the last block nothing mixes the patches into
                # it: a spatial part there (which leaves the class token alone) could never change the output
                if not config.temporal:
                    continue
                config = replace(config, spatial=False)
            branch = AdaptorBranch(p.layer, config, layout)
            attach_delta(p, self.name, branch)
            params += list(branch.parameters())
        return params

    def clash(self, other):
        """Soft tokens inserted at the model's input (prompt tuning) shift every position:
        the 2-D patch grid is no longer where this method
        reads it; refused before anything runs (the search space then never samples the pair).
        Affix tokens are dropped before out_proj and do not matter."""
        if other.name == "prompt":
            return (f"{self.name} and prompt cannot be combined: prompt's tokens move the 2-D patch grid, which "
                    f"{self.name} relies on")
        return super().clash(other)
