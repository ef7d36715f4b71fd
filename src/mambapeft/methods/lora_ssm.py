"""LoRA on the SSM's own parameters (S4D): a rank-r update of the channel x state matrices C, log_A_real, A_imag.

    C          (H, N) complex:  C + s * Up_C @ Down_C          Up_C (H, r), Down_C (r, N) complex (real pairs)
    log_A_real (H, N):          log_A_real + s * Up @ Down     Up (H, r) zeros, Down (r, N) standard normal
    A_imag     (H, N):          A_imag + s * Up @ Down

As the SDT authors' S4 code does (`get_ssm_lora_adapter`, furiosa-ai/ssm-peft S4/run_s4_real.py L318-367): Up
starts at zero (the identity at the start), Down is standard normal (complex normal for C), no scale (s = 1), rank
4 by default. Their synthetic script defines it but never calls it, so its "LoRA (S4 + Proj)" row trains Proj-LoRA
(and dt, D, the bias) only; here the method is wired wherever it is asked for.

The update rides on each tensor through `torch.nn.utils.parametrize` and merges by folding. It needs a family that
keeps C and A as parameters per channel and state, i.e. S4D; Mamba computes C from the input (see lora_p_c) and has
a real A_log (see partial_a).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, NotApplicable
from .base import TABLE9_LR, Example, Method, MethodConfig, is_meta, option, register

ROLES = ("C", "log_A_real", "A_imag")


@dataclass
class SSMLoRAConfig(MethodConfig):
    r: int = option(4, "rank of the update of each (H, N) matrix (the authors' ssm_lora_rank: 4)", minimum=1)
    s: float = option(1.0, "scale s of W + s * Up @ Down (the authors' code has none: 1)", exclusive_minimum=0)


class LowRankDelta(nn.Module):
    """Parametrization W + s * Up @ Down of an (H, N) tensor, or of C's (H, N, 2) real pairs as a complex product."""

    def __init__(self, value: torch.Tensor, r: int, s: float):
        super().__init__()
        H, N = value.shape[:2]
        pairs = value.shape[2:]                        # (2,) for complex C, () for a real tensor
        factory = {"device": value.device, "dtype": value.dtype}
        self.s = s
        self.up = nn.Parameter(torch.zeros(H, r, *pairs, **factory))
        self.down = nn.Parameter(torch.empty(r, N, *pairs, **factory))
        if not is_meta(self.down):
            with torch.no_grad():
                if pairs:                              # complex standard normal, as torch.randn(..., dtype=cfloat)
                    self.down.copy_(torch.view_as_real(torch.randn(r, N, dtype=torch.cdouble)).to(value.dtype))
                else:
                    self.down.normal_()

    def update(self) -> torch.Tensor:
        if self.up.dim() == 3:                         # complex: (H, r) @ (r, N), back to real pairs
            up, down = (torch.complex(t[..., 0], t[..., 1]) for t in (self.up, self.down))
            product = up @ down
            return self.s * torch.stack([product.real, product.imag], dim=-1)
        return self.s * self.up @ self.down

    def forward(self, value):
        return value + self.update()


@register
class SSMLoRA(Method):
    name = "lora_ssm"
    category = "LoRA"
    description = "LoRA on S4D's SSM parameters: rank-r updates of C (complex), log_A_real and A_imag (H x N each)"
    Config = SSMLoRAConfig
    targets = frozenset({(role, None) for role in ROLES})
    examples = (Example("lora_ssm:r=2"), Example("lora_ssm:r=1,s=0.5"))
    presets = {"lora_ssm": ["lora_ssm:r=4,s=1"]}
    # S4D only, so not in the default search space (which serves Mamba and Vim); its ranges for a custom space
    search_step2 = {"r": {"int": [1, 8]}, "lr": TABLE9_LR}

    def slots(self, model):
        try:
            return [mixer.tensors(role)[0] for mixer in model.peft_mixers() for role in ROLES]
        except NotApplicable as err:
            raise NotApplicable(f"lora_ssm: {err}; LoRA on the SSM's channel x state matrices needs a family that "
                                f"keeps C and a complex A as parameters (S4D); Mamba computes C from the input (see "
                                f"lora_p_c) and has a real A_log (see partial_a)") from None

    def check(self, model):
        slots = self.slots(model)
        if not slots:
            raise NotApplicable(f"lora_ssm: {type(model).__name__} has no SSM layers")
        for slot in slots:
            H, N = slot.value.shape[:2]
            if self.config.r > max(H, N):
                raise ConfigError(f"lora_ssm: r={self.config.r} is larger than the ({H}, {N}) matrices it adapts; use "
                                  f"r <= {min(H, N)} (a full-rank update)")

    def attach(self, model):
        params = []
        for slot in self.slots(model):
            delta = LowRankDelta(slot.value, self.config.r, self.config.s)
            parametrize.register_parametrization(slot.owner, slot.name, delta)
            params += [delta.up, delta.down]
        return params

    def merge(self, model):
        for slot in self.slots(model):
            parametrize.remove_parametrizations(slot.owner, slot.name, leave_parametrized=True)
