"""Partial tuning (paper Section 3.3): train a zero-initialised delta on one small tensor of every mixer.

    A_log -> A_log + delta        D, the conv kernel and the dt bias (dt_proj's, the block's only bias) likewise
                                  (S4D: log_dt and the output linear's bias too)

The delta rides on the tensor through `torch.nn.utils.parametrize`, so the mixer reads A_log + delta
wherever it reads A_log and merging is `remove_parametrizations(leave_parametrized=True)`. Weight decay on
the delta is the paper's modified decay |W - W_pretrained|^2: it pulls the tensor back toward its
pretrained value, not toward zero. Default strengths are the official ones: 1e-3 for A, D and conv1d (x10 of
the base 1e-4) and 1e-2 for the dt bias (x100). Vim's mixers get one delta per scan direction; so do VMamba's, each
on its direction's part of the stacked tensor (A_logs, Ds, dt_projs_bias), and `partial_conv1d` there tunes the
depthwise 3x3 conv2d (the paper's Conv2d-tuning, Table 5) and `partial_norm` out_norm's weight. The same
machinery serves tensors the model itself holds (Vim's class token and position embedding, `ModelTensorTuning`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .base import Example, Method, MethodConfig, add_parametrization, fold_parametrizations, option, register

PARTIAL_SEARCH = {"lr": {"log": [1e-4, 5e-3]}, "weight_decay": {"log": [1e-5, 1e-2]}}    # Table 9, step 2


@dataclass
class PartialConfig(MethodConfig):
    weight_decay: float | None = option(1e-3, "decay of the delta = decay of |W - W_pretrained|^2", minimum=0)


@dataclass
class PartialBiasConfig(MethodConfig):
    weight_decay: float | None = option(1e-2, "decay of the delta = decay of |W - W_pretrained|^2", minimum=0)


@dataclass
class ModelTensorConfig(PartialConfig):
    weight_decay: float | None = option(1e-4, "decay of the delta = decay of |W - W_pretrained|^2", minimum=0)


class Delta(nn.Module):
    """Parametrization W = W0 + delta with a trainable delta that starts at zero."""

    def __init__(self, original: torch.Tensor):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros_like(original))

    def forward(self, original):
        return original + self.delta


class PartialTuning(Method):
    """A delta on the `role` tensor of every mixer and direction (see model/interface.py for the roles)."""

    category = "partial tuning"
    Config = PartialConfig
    role: str
    search_step1 = {"weight_decay": 1e-3}          # Table 9, step 1: every partial target at decay 1e-3
    search_step2 = PARTIAL_SEARCH

    def slots(self, model):
        return [slot for mixer in model.peft_mixers() for slot in mixer.tensors(self.role)]

    def check(self, model):
        self.slots(model)

    def attach(self, model):
        params = []
        for slot in self.slots(model):
            delta = Delta(slot.value)
            add_parametrization(slot, delta)
            params.append(delta.delta)
        return params

    def merge(self, model):
        fold_parametrizations(self.slots(model))


class ModelTensorTuning(PartialTuning):
    """A delta on a tensor the model itself holds (`model.model_tensor(role)`): Vim's class token and position
    embedding. The default decay is the official base strength 1e-4 (A, D and conv1d use x10)."""

    Config = ModelTensorConfig
    search_vision_only = True

    def slots(self, model):
        return [model.model_tensor(self.role)]


class S4DTensorTuning(PartialTuning):
    """A delta on a tensor only S4D has (model/s4d/); not in the default search space, which serves Mamba and Vim."""

    search_step1 = None


# id: (role, whose tensor, config, (layer, block) it changes, description). One line here adds a partial target.
PARTIAL_TARGETS = {
    "partial_a": ("A_log", PartialTuning, PartialConfig, ("A_log", None),
                  "A-tuning: a delta on A_log (E x N per direction)"),
    "partial_d": ("D", PartialTuning, PartialConfig, ("D", None), "D-tuning: a delta on the skip D (E per direction)"),
    "partial_conv1d": ("conv", PartialTuning, PartialConfig, ("conv1d.weight", None),
                       "Conv1d-tuning: a delta on the causal conv's kernel (VMamba: its 3x3 conv2d, Conv2d-tuning)"),
    "partial_bias": ("dt_bias", PartialTuning, PartialBiasConfig, ("dt_proj.bias", None),
                     "Bias-tuning: a delta on the dt bias, the block's only bias"),
    "partial_norm": ("norm", PartialTuning, PartialConfig, ("norm.weight", None),
                     "a delta on the norm's weight before out_proj (Mamba-2's gated RMSNorm, VMamba's out_norm)"),
    "partial_cls_token": ("cls_token", ModelTensorTuning, ModelTensorConfig, ("cls_token", None),
                          "a delta on Vim's class token (d)"),
    "partial_pos_embed": ("pos_embed", ModelTensorTuning, ModelTensorConfig, ("pos_embed", None),
                          "a delta on Vim's position embedding ((M + 1) x d)"),
    "partial_log_dt": ("log_dt", S4DTensorTuning, PartialConfig, ("log_dt", None),
                       "dt-tuning on S4D: a delta on log_dt (H per layer)"),
    "partial_out_bias": ("out_bias", S4DTensorTuning, PartialConfig, ("output_linear.bias", None),
                         "a delta on S4D's output-linear bias (H per layer)"),
}

# VMamba's Table 5 row "Conv2d" (learnable_conv1d_v2 on its conv2d: a zero-initialised delta with decay_mult 10 on
# the base 1e-4, the default here)
VMAMBA_PRESETS = {"partial_conv1d": "vmamba/partial_conv1d"}

for _name, (_role, _base, _config, _target, _text) in PARTIAL_TARGETS.items():
    _presets = {_name: [f"{_name}:weight_decay={_config().weight_decay:g}"]}
    if _name in VMAMBA_PRESETS:
        _presets[VMAMBA_PRESETS[_name]] = _presets[_name]
    register(type(_name, (_base,), {
        "name": _name, "role": _role, "Config": _config, "description": _text, "targets": frozenset({_target}),
        "examples": (Example(_name),), "presets": _presets,
    }))
