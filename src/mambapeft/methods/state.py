"""State-based PEFT (Kang, Galim et al., "State-offset Tuning", ACL 2025; furiosa-ai/ssm-state-tuning): train the
scan's state instead of weights or tokens.

For the S6 recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,  y_t = (C_t h_t + D x_t) * silu(z_t), per layer and
(Vision Mamba) per scan direction:

    initial_state            H0 (E, N)   the scan of a fresh sequence starts from H0 instead of 0
    state_offset (variant h) h' (E, N)   y_t = (C_t (h_t + h') + D x_t) * silu(z_t); h' is not fed back
    state_offset (variant y) y' (E)      y_t = (C_t h_t + D x_t + y') * silu(z_t)

S0 tuning (Young, arXiv 2604.01168, on the hybrids' Gated DeltaNet and Mamba-2 layers) is initial-state tuning with
two settings of its own, options here: H0 enters the scan as `scale` x the learned tensor (its alpha: 0.07 on Gated
DeltaNet, 0.6-0.7 on Mamba-2; under Adam the scale sets how far H0 moves per step), and an L2 penalty `l2` x ||S||^2
on the learned tensor S (its l2_lambda, 5e-4), added to S's gradient (2 l2 S: coupled, unlike AdamW's weight decay).
`paper/s0` (Gated DeltaNet) and `paper/s0_mamba2` give its settings (lr 1e-3; it trains 20 optimiser steps:
--max-steps 20). Its per-step variant is `state_offset`. Where the penalty sits (on S, not on scale x S) follows our
reading of the paper's description; its code was not available to check.

All start at zero, so the model starts as the base model. The (h) offset is a cheap contraction with C outside the
scan (no second scan); H0 goes through the scan's `initial_state` argument, gradients included. None of them folds
into the weights: H0 is a starting state (no weight holds one), C_t h' is a rank-N map of x_t that no diagonal or
linear weight before the gate can absorb, and y' is gated by silu(z_t), so it is no bias of out_proj either;
`merge_and_unload` keeps them as the small remaining adapter.

Generation: H0 enters with the prompt and lives on in the recurrent state; the offsets apply at every step. With a
left-padded batch the mixer keeps H0 unchanged through the padding (dt is zero there), so it meets each row's first
real token, and padded and unpadded prompts give the same outputs. With prompt or affix tokens (a prefix), H0 is the
state before the first soft token: the two compose (H0, then the tokens, then the text), which is what both methods
mean on their own; additional scan's extra states start from zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..model.hooks import PeftHook
from .base import TABLE9_LR, Example, Method, MethodConfig, option, register

# the released configs' learning rates (furiosa-ai/ssm-state-tuning cfg/final/exps): mamba-130m on DART, mamba-1.4b
# on SAMSum (state-tuning-and-mamba2.md, 1.2)
STATE_OFFSET_LR = {"h": {"mamba-130m": 4e-4, "mamba-1.4b": 1e-4}, "y": {"mamba-130m": 4e-3, "mamba-1.4b": 1e-3}}
INITIAL_STATE_LR = {"mamba-130m": 2e-3, "mamba-1.4b": 2e-4}


@dataclass
class InitialStateConfig(MethodConfig):
    weight_decay: float | None = option(0.0, "weight decay of H0 (the authors' code exempts it)", minimum=0)
    scale: float = option(1.0, "H0 = scale x the learned tensor (S0 tuning's alpha: 0.07 on Gated DeltaNet, 0.6-0.7 "
                          "on Mamba-2)", exclusive_minimum=0)
    l2: float = option(0.0, "L2 penalty l2 x ||S||^2 on the learned tensor S, added to its gradient (S0 tuning's "
                       "l2_lambda, 5e-4)", minimum=0)


@dataclass
class StateOffsetConfig(MethodConfig):
    variant: str = option("h", "h: an offset h' (E x N) on the state read through C_t; y: an offset y' (E) on the "
                          "output before the gate", choices=("h", "y"))


class _L2Penalty(torch.autograd.Function):
    """Identity forward; the backward adds 2 l2 S, the gradient of l2 ||S||^2 (once per backward pass that used S:
    with gradient accumulation, once per micro-batch), so the task's loss stays what is logged and scored."""

    @staticmethod
    def forward(ctx, value, l2):
        ctx.save_for_backward(value)
        ctx.l2 = l2
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        (value,) = ctx.saved_tensors
        return grad + (2 * ctx.l2) * value, None


class StateTensors(PeftHook):
    """One mixer's learned states, one tensor per scan direction, zero at the start."""

    def __init__(self, mixer, shape: tuple[int, ...], role: str, scale: float = 1.0, l2: float = 0.0):
        super().__init__()
        like = next(mixer.parameters())
        self.role, self.scale, self.l2 = role, scale, l2
        self.values = nn.ParameterList(nn.Parameter(torch.zeros(*shape, device=like.device, dtype=like.dtype))
                                       for _ in range(mixer.num_directions))

    @torch.no_grad()
    def grow_state(self, direction, n, top):
        if self.role in ("initial", "h"):
            old = self.values[direction]
            zeros = old.new_zeros(*old.shape[:-1], n)
            self.values[direction] = nn.Parameter(torch.cat([zeros, old] if top else [old, zeros], -1),
                                                  requires_grad=old.requires_grad)

    def initial_state(self, direction):
        if self.role != "initial":
            return None
        value = self.values[direction]
        if self.l2 and torch.is_grad_enabled() and value.requires_grad:
            value = _L2Penalty.apply(value, self.l2)
        return value if self.scale == 1.0 else self.scale * value

    def state_offset(self, direction):
        return (self.role, self.values[direction]) if self.role in ("h", "y") else None


class StateMethod(Method):
    """Attaches one StateTensors hook per mixer, for the stage the method acts at."""

    category = "state tuning"
    mergeable = False
    stage: str

    def role(self) -> str:
        raise NotImplementedError

    def shape(self, mixer) -> tuple[int, ...]:
        return mixer.channel_shape if self.role() == "y" else mixer.state_shape

    def check(self, model):
        for mixer in model.peft_mixers():
            mixer.require_stage(self.stage, self.name)

    def attach(self, model):
        self.hooks = []
        for mixer in model.peft_mixers():
            hook = StateTensors(mixer, self.shape(mixer), self.role(), getattr(self.config, "scale", 1.0),
                                getattr(self.config, "l2", 0.0))
            mixer.hooks.append(hook)
            self.hooks.append(hook)
        return [t for hook in self.hooks for t in hook.values]

    def collapse(self, model, tensors):
        return [t for hook in self.hooks for t in hook.values]      # grown, if additional scan was merged


@register
class InitialStateTuning(StateMethod):
    name = "initial_state"
    description = "a learned initial state H0 (E x N per layer and direction) the scan starts from"
    why_not_mergeable = "H0 is the recurrence's starting state; no weight of the model holds a state"
    Config = InitialStateConfig
    stage = "initial_state"
    targets = frozenset({("initial_state", None)})
    examples = (Example("initial_state"), Example("initial_state:scale=0.07,l2=0.0005"))
    # S0 tuning (arXiv 2604.01168; its released config: 20 steps, lr 1e-3, l2_lambda 5e-4, alpha 0.07 on Qwen3.5's
    # Gated DeltaNet; its alpha sweep: 0.6-0.7 on Falcon-H1's Mamba-2)
    presets = {"initial_state": ["initial_state"], "s0": ["initial_state:scale=0.07,l2=0.0005,lr=0.001"],
               "s0_mamba2": ["initial_state:scale=0.65,l2=0.0005,lr=0.001"]}
    lr_by_size = INITIAL_STATE_LR
    search_step1 = {}
    search_step2 = {"lr": TABLE9_LR}

    def role(self):
        return "initial"


@register
class StateOffsetTuning(StateMethod):
    name = "state_offset"
    description = "a learned offset on the state read at every step (h: C_t h', E x N) or on the output (y: y', E)"
    why_not_mergeable = ("(h) adds C_t h', a rank-N map of x_t that no weight before the gate can hold; "
                         "(y) is gated by silu(z_t), so it is not a bias of out_proj")
    Config = StateOffsetConfig
    stage = "state_offset"
    targets = frozenset({("state_offset", None)})
    examples = (Example("state_offset"), Example("state_offset:variant=y"))
    presets = {"state_offset": ["state_offset:variant=h"], "state_offset_y": ["state_offset:variant=y"]}
    search_step1 = {"variant": "y"}                                    # the smallest: E per layer
    search_step2 = {"variant": {"choice": ["h", "y"]}, "lr": TABLE9_LR}

    def role(self):
        return self.config.variant

    @classmethod
    def size_lr(cls, config, arch):
        return STATE_OFFSET_LR[config.variant].get(arch)
