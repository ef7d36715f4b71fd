"""LoRA and DoRA on the layers of hybrid models that are not SSM mixers: attention projections, MLPs, experts.

The roles are the model's (model/interface.py LAYER_PROJECTION_ROLES, LAYER_TENSOR_ROLES), so one method serves
every hybrid family, and a pure SSM model refuses by name ("mamba2 models have no q_proj ..."):

    lora_q_proj, lora_k_proj, lora_v_proj, lora_o_proj   W + s * Up @ Down on that projection of every attention layer
    lora_attn                                            the same on q, k, v and o
    lora_mlp                                             on every MLP's input and output layer (Granite 4.0-H's shared
                                                         MLP: input_linear, gate and up rows together, output_linear)
    dora_attn, dora_mlp                                  DoRA (methods/dora.py) on the same layers
    lora_experts                                         every expert's weights, stacked (E, out, in) and read at every
                                                         call: a parametrization W_e + s * Up_e @ Down_e, one pair per
                                                         expert, or one pair shared by all (per_expert=false)
    lora_router                                          the router's weight (E, d), the same way

The projections are nn.Linear layers of transformers' own modules, wrapped as the SSM LoRA wraps in_proj
(methods/lora.py); the experts have no linear layer to wrap (transformers keeps them as 3-D tensors), so their
update is a parametrization of the tensor, which every experts implementation (loop or grouped matmul) reads. A
parametrization acts on the weight, so it has no dropout. Every update starts at zero and merges exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..model.interface import TensorSlot
from .base import (
    Example,
    Method,
    MethodConfig,
    add_parametrization,
    fold_parametrizations,
    kaiming_,
    option,
    projections,
    register,
)
from .dora import DoRA
from .lora import LinearLoRA, LoRAConfig, attach_linear_lora, check_rank, merge_linear_lora


class LayerLoRA(Method):
    """LoRA on the `roles` projections of every layer that has them. Subclassed once per target below."""

    category = "LoRA"
    Config = LoRAConfig
    roles: tuple[str, ...]
    scaled_update = True
    search_step2 = LinearLoRA.search_step2

    def check(self, model):
        for role in self.roles:
            check_rank(self.name, self.config.r, projections(model, role))

    def attach(self, model):
        return [t for role in self.roles for t in attach_linear_lora(model, self.name, role, self.config)]

    def merge(self, model):
        for role in self.roles:
            merge_linear_lora(model, self.name, role)


class LayerDoRA(DoRA):
    """DoRA on the `roles` projections (whole layers) of every layer that has them."""

    roles: tuple[str, ...]

    def check(self, model):
        for role in self.roles:
            check_rank(self.name, self.config.r, projections(model, role))

    def attach(self, model):
        params = []
        for role in self.roles:
            self.role = role
            params += super().attach(model)
        return params

    def merge(self, model):
        for role in self.roles:
            self.role = role
            super().merge(model)


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("mlp_in", "mlp_out")

# id: (roles, description); the roles are also the clash targets (DoRA's normalisation excludes LoRA on its layers)
LAYER_LORA_TARGETS = {
    **{f"lora_{role}": ((role,), f"LoRA on the {role} of every attention layer (hybrid models)") for role in ATTENTION},
    "lora_attn": (ATTENTION, "LoRA on q_proj, k_proj, v_proj and o_proj of every attention layer (hybrid models)"),
    "lora_mlp": (MLP, "LoRA on every MLP's input (gate and up) and output layer (hybrid models; Granite 4.0-H: "
                 "input_linear and output_linear of the shared MLP)"),
}
LAYER_DORA_TARGETS = {
    "dora_attn": (ATTENTION, "DoRA on q_proj, k_proj, v_proj and o_proj of every attention layer (hybrid models)"),
    "dora_mlp": (MLP, "DoRA on every MLP's input and output layer (hybrid models)"),
}

for _name, (_roles, _text) in LAYER_LORA_TARGETS.items():
    register(type(_name, (LayerLoRA,), {
        "name": _name, "roles": _roles, "description": _text,
        "targets": frozenset((role, None) for role in _roles), "examples": (Example(f"{_name}:r=2"),),
    }))
for _name, (_roles, _text) in LAYER_DORA_TARGETS.items():
    register(type(_name, (LayerDoRA,), {
        "name": _name, "roles": _roles, "description": _text,
        "targets": frozenset((role, None) for role in _roles), "examples": (Example(f"{_name}:r=2"),),
    }))


# ---------------------------------------------------------------- experts and router: tensors, not layers


@dataclass
class TensorLoRAConfig(MethodConfig):
    r: int = option(8, "rank of the low-rank update of each weight matrix", minimum=1)
    s: float = option(0.1, "scale s of W + s * Up @ Down", exclusive_minimum=0)


@dataclass
class ExpertLoRAConfig(TensorLoRAConfig):
    per_expert: bool = option(True, "each expert its own Up and Down (true), or one pair shared by every expert of a "
                              "layer (false: the same update added to each expert's weights)")


class StackedLoRADelta(nn.Module):
    """A parametrization W (..., out, in) -> W + s * Up @ Down, with Down (..., r, in) Kaiming-uniform per matrix and
    Up (..., out, r) zeros; `shared`: one pair (r, in), (out, r) added to every matrix of the stack."""

    def __init__(self, like: torch.Tensor, r: int, s: float, shared: bool = False):
        super().__init__()
        factory = {"device": like.device, "dtype": like.dtype}
        lead = () if shared else tuple(like.shape[:-2])
        rows, inputs = like.shape[-2:]
        self.s = s
        self.down = nn.Parameter(torch.empty(*lead, r, inputs, **factory))
        for matrix in self.down.detach().view(-1, r, inputs):
            kaiming_(matrix)
        self.up = nn.Parameter(torch.zeros(*lead, rows, r, **factory))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.s * self.up @ self.down).to(weight.dtype)


class TensorLoRA(Method):
    """LoRA as a parametrization of the `roles` tensors of every layer that has them. Subclassed below."""

    category = "LoRA"
    roles: tuple[str, ...]
    scaled_update = True
    search_step2 = LinearLoRA.search_step2

    def slots(self, model) -> list[TensorSlot]:
        return [slot for role in self.roles for slot in model.layer_tensors(role)]

    def check(self, model):
        for slot in self.slots(model):
            rows, inputs = slot.value.shape[-2:]
            if self.config.r > max(rows, inputs):
                raise ConfigError(f"{self.name}: r={self.config.r} is larger than the weights it adapts ({slot.name}: "
                                  f"{inputs} inputs -> {rows} rows); use r <= {max(rows, inputs)}")

    def attach(self, model):
        params = []
        for slot in self.slots(model):
            delta = StackedLoRADelta(slot.value, self.config.r, self.config.s,
                                     shared=not getattr(self.config, "per_expert", True))
            add_parametrization(slot, delta)
            params += [delta.down, delta.up]
        return params

    def merge(self, model):
        fold_parametrizations(self.slots(model))


@register
class ExpertLoRA(TensorLoRA):
    name = "lora_experts"
    description = ("LoRA on every expert's weights (the stacked gate/up and down tensors of each MoE layer), one Up "
                   "and Down per expert or shared (per_expert)")
    Config = ExpertLoRAConfig
    roles = ("experts_in", "experts_out")
    targets = frozenset({("experts_in", None), ("experts_out", None)})
    examples = (Example("lora_experts:r=2"), Example("lora_experts:r=2,per_expert=false"))


@register
class RouterLoRA(TensorLoRA):
    name = "lora_router"
    description = "LoRA on the router of every MoE layer (its (experts, d) weight)"
    Config = TensorLoRAConfig
    roles = ("router",)
    targets = frozenset({("router", None)})
    examples = (Example("lora_router:r=2"),)
