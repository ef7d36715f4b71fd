"""LoRA on Mamba's linear layers, on row blocks of them (partial LoRA), on the embedding, and SLL LoRA.

    W' = W + s * Up @ Down          Down (r, in) Kaiming-uniform, Up (rows, r) zeros: the identity at start

The scale is the plain `s` of the paper's official code (0.1), not alpha / r; dropout acts on the
branch's input. Partial LoRA (paper Section 3.2) puts the delta on one output block only: the X or Z half
of in_proj, or the dt, B or C rows of x_proj. In Vision Mamba, x_proj and dt_proj exist once per scan
direction and each direction gets its own LoRA; in_proj and out_proj are shared and get one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .base import (
    Method,
    MethodConfig,
    add_delta,
    direction_layers,
    get_module,
    kaiming_,
    option,
    register,
    remove_delta,
    row_block,
)


@dataclass
class LoRAConfig(MethodConfig):
    r: int = option(8, "rank of the low-rank update", minimum=1)
    s: float = option(0.1, "scale s of W + s * Up @ Down", exclusive_minimum=0)
    dropout: float = option(0.1, "dropout on the LoRA branch's input", minimum=0, maximum=0.99)


class LoRADelta(nn.Module):
    """out[..., start:stop] += s * Up(Down(dropout(x))) for a linear layer."""

    def __init__(self, in_features: int, start: int, stop: int, config: LoRAConfig, like: torch.Tensor):
        super().__init__()
        factory = {"device": like.device, "dtype": like.dtype}
        self.start, self.stop, self.s = start, stop, config.s
        self.dropout = nn.Dropout(config.dropout)
        self.down = nn.Parameter(kaiming_(torch.empty(config.r, in_features, **factory)))
        self.up = nn.Parameter(torch.zeros(stop - start, config.r, **factory))

    def forward(self, x, out):
        delta = self.s * F.linear(F.linear(self.dropout(x), self.down), self.up)
        if self.start == 0 and self.stop == out.shape[-1]:
            return out + delta
        out[..., self.start : self.stop] += delta
        return out

    @torch.no_grad()
    def merge_into(self, base: nn.Linear) -> None:
        base.weight[self.start : self.stop] += (self.s * self.up @ self.down).to(base.weight.dtype)


class EmbeddingLoRADelta(nn.Module):
    """Embedding rows plus s * Up(Down[token]): Down is an (vocab, r) table, Up (d, r) starts at zero."""

    def __init__(self, base: nn.Embedding, config: LoRAConfig):
        super().__init__()
        like = base.weight
        self.s = config.s
        self.down = nn.Parameter(torch.empty(base.num_embeddings, config.r, device=like.device, dtype=like.dtype))
        if like.device.type != "meta":
            nn.init.normal_(self.down)
        self.up = nn.Parameter(torch.zeros(base.embedding_dim, config.r, device=like.device, dtype=like.dtype))

    def forward(self, ids, out):
        return out + self.s * F.linear(F.embedding(ids, self.down), self.up)

    @torch.no_grad()
    def merge_into(self, base: nn.Embedding) -> None:
        base.weight += (self.s * self.down @ self.up.t()).to(base.weight.dtype)


class ConvLoRADelta(nn.Module):
    """For Vim's patch embedding (Conv2d): Down is a conv with the patch kernel to r channels, Up a 1x1 conv."""

    def __init__(self, base: nn.Conv2d, config: LoRAConfig):
        super().__init__()
        like = base.weight
        self.s = config.s
        self.dropout = nn.Dropout(config.dropout)
        self.conv_args = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
        self.down = nn.Parameter(kaiming_(torch.empty(config.r, *like.shape[1:], device=like.device, dtype=like.dtype)))
        self.up = nn.Parameter(torch.zeros(like.shape[0], config.r, 1, 1, device=like.device, dtype=like.dtype))

    def forward(self, x, out):
        return out + self.s * F.conv2d(F.conv2d(self.dropout(x), self.down, **self.conv_args), self.up)

    @torch.no_grad()
    def merge_into(self, base: nn.Conv2d) -> None:
        update = self.s * (self.up.flatten(1) @ self.down.flatten(1)).view_as(base.weight)
        base.weight += update.to(base.weight.dtype)


def _base(layer: nn.Module) -> nn.Module:
    return getattr(layer, "base", layer)


def untie_head(model) -> None:
    """Before the embedding changes on its own: give a tied output head its own copy of the weight."""
    untie = getattr(model, "untie_weights", None)
    if untie is not None:
        untie()


def attach_linear_lora(model, key: str, layer: str, block: str | None, config: LoRAConfig) -> list[torch.Tensor]:
    """A LoRADelta named `key` on `layer` (rows `block`) of every mixer and direction; returns its tensors."""
    params = []
    for mixer, attr in direction_layers(model, layer):
        base = _base(getattr(mixer, attr))
        start, stop = row_block(mixer, layer, block)
        delta = LoRADelta(base.in_features, start, stop, config, like=base.weight)
        add_delta(mixer, attr, key, delta)
        params += [delta.down, delta.up]
    return params


def merge_linear_lora(model, key: str, layer: str) -> None:
    for mixer, attr in direction_layers(model, layer):
        base = _base(getattr(mixer, attr))
        remove_delta(mixer, attr, key).merge_into(base)


class LinearLoRA(Method):
    """LoRA on `layer` of every mixer (rows `block` only, if set). Subclassed once per target below."""

    family = "LoRA"
    Config = LoRAConfig
    layer: str
    block: str | None = None

    def attach(self, model):
        return attach_linear_lora(model, self.name, self.layer, self.block, self.config)

    def merge(self, model):
        merge_linear_lora(model, self.name, self.layer)


# id: (layer, row block, description). One line here adds a LoRA target.
LORA_TARGETS = {
    "lora_in_proj": ("in_proj", None, "LoRA on in_proj (both the X and the Z half)"),
    "lora_x_proj": ("x_proj", None, "LoRA on x_proj (dt, B and C rows; one per direction in Vim)"),
    "lora_dt_proj": ("dt_proj", None, "LoRA on dt_proj (one per direction in Vim)"),
    "lora_out_proj": ("out_proj", None, "LoRA on out_proj"),
    "lora_p_x": ("in_proj", "X", "partial LoRA on the X half of in_proj: the paper's best single method"),
    "lora_p_z": ("in_proj", "Z", "partial LoRA on the Z (gate) half of in_proj"),
    "lora_p_dt": ("x_proj", "dt", "partial LoRA on the dt rows of x_proj (the paper's LoRA_p(d))"),
    "lora_p_b": ("x_proj", "B", "partial LoRA on the B rows of x_proj"),
    "lora_p_c": ("x_proj", "C", "partial LoRA on the C rows of x_proj"),
}

for _name, (_layer, _block, _text) in LORA_TARGETS.items():
    register(type(_name, (LinearLoRA,), {
        "name": _name, "layer": _layer, "block": _block, "description": _text,
        "targets": frozenset({(_layer, _block)}),
    }))


def attach_embedding_lora(model, key: str, config: LoRAConfig) -> list[torch.Tensor]:
    owner_path, _, attr = model.embedding_path.rpartition(".")
    owner = get_module(model, owner_path) if owner_path else model
    base = _base(getattr(owner, attr))
    if isinstance(base, nn.Embedding):
        delta = EmbeddingLoRADelta(base, config)
    elif isinstance(base, nn.Conv2d):
        delta = ConvLoRADelta(base, config)
    else:
        raise ConfigError(f"{key}: the embedding {model.embedding_path} is a {type(base).__name__}, "
                          f"expected an Embedding or a patch Conv2d")
    add_delta(owner, attr, key, delta)
    return [delta.down, delta.up]


def merge_embedding_lora(model, key: str) -> None:
    owner_path, _, attr = model.embedding_path.rpartition(".")
    owner = get_module(model, owner_path) if owner_path else model
    base = _base(getattr(owner, attr))
    untie_head(model)
    remove_delta(owner, attr, key).merge_into(base)


@register
class EmbeddingLoRA(Method):
    name = "lora_embed"
    family = "LoRA"
    description = "LoRA on the token embedding (Vim: on the patch-embedding convolution)"
    Config = LoRAConfig
    targets = frozenset({("embedding", None)})

    def attach(self, model):
        return attach_embedding_lora(model, self.name, self.config)

    def merge(self, model):
        merge_embedding_lora(model, self.name)


@dataclass
class SLLLoRAConfig(LoRAConfig):
    r: int = option(8, "rank (Halloran et al.: 8 for 130m, 16 for 370m, 32 for 790m, 64 for 1.4b)", minimum=1)
    s: float = option(1.0, "scale s (SLL LoRA uses 1)", exclusive_minimum=0)


SLL_LAYERS = ("in_proj", "out_proj", "x_proj")


@register
class SLLLoRA(Method):
    name = "sll_lora"
    family = "LoRA"
    description = "baseline of Halloran et al. (2024): LoRA on in_proj, out_proj, x_proj and the embedding, s=1"
    Config = SLLLoRAConfig
    targets = frozenset({(layer, None) for layer in SLL_LAYERS} | {("embedding", None)})

    def attach(self, model):
        params = attach_embedding_lora(model, self.name, self.config)
        for layer in SLL_LAYERS:
            params += attach_linear_lora(model, self.name, layer, None, self.config)
        return params

    def merge(self, model):
        merge_embedding_lora(model, self.name)
        for layer in SLL_LAYERS:
            merge_linear_lora(model, self.name, layer)
