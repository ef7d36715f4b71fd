"""LoRA on Mamba's linear layers, on row blocks of them (partial LoRA), on the embedding, and SLL LoRA.

    W' = W + s * Up @ Down          Down (r, in) Kaiming-uniform, Up (rows, r) zeros: the identity at start

The scale is the plain `s` of the paper's official code (0.1), not alpha / r. Dropout acts on the branch's input by
default (ours: the layer sees the whole input, the update a dropped-out one); `dropout_at=bottleneck` puts it after
Down, as the official code does where it calls LoRA as a module (X, Z, in_proj, out_proj; on x_proj, dt and the
B/C/dt rows it merges the weights and so applies none): the `paper/...` presets follow that. Partial LoRA (paper
Section 3.2) puts the delta on one output block only: the X or Z half of in_proj, or the dt, B or C rows of x_proj.
In Vision Mamba, x_proj and dt_proj exist once per scan direction and each direction gets its own LoRA; in_proj and
out_proj are shared and get one. VMamba's four directions keep x_proj and dt_proj as one stacked weight each
(x_proj_weight, dt_projs_weight): the LoRA of direction k acts on that direction's slice of the called module and
merges into entry k of the stacked weight (model/interface.py StackedLinear), so nothing changes here.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    add_delta,
    attach_delta,
    detach_delta,
    kaiming_,
    option,
    owner_and_attr,
    projections,
    register,
    remove_delta,
    unwrap,
)


@dataclass
class LoRAConfig(MethodConfig):
    r: int = option(8, "rank of the low-rank update", minimum=1)
    s: float = option(0.1, "scale s of W + s * Up @ Down", exclusive_minimum=0)
    dropout: float = option(0.1, "dropout on the LoRA branch (see dropout_at)", minimum=0, maximum=0.99)
    dropout_at: str = option("input", "where the dropout acts: input (on x, before Down) or bottleneck (after Down, "
                             "as the official MambaPEFT code)", choices=("input", "bottleneck"))


class LoRADelta(nn.Module):
    """out[..., start:stop] += s * Up(Down(dropout(x))) for a linear layer (or Up(dropout(Down(x))))."""

    def __init__(self, in_features: int, start: int, stop: int, config: LoRAConfig, like: torch.Tensor):
        super().__init__()
        factory = {"device": like.device, "dtype": like.dtype}
        self.start, self.stop, self.s = start, stop, config.s
        self.dropout = nn.Dropout(config.dropout)
        self.at_input = config.dropout_at == "input"
        self.down = nn.Parameter(kaiming_(torch.empty(config.r, in_features, **factory)))
        self.up = nn.Parameter(torch.zeros(stop - start, config.r, **factory))

    def branch(self, x):
        """s * Up(Down(x)) with the dropout where the config puts it."""
        if self.at_input:
            return self.s * F.linear(F.linear(self.dropout(x), self.down), self.up)
        return self.s * F.linear(self.dropout(F.linear(x, self.down)), self.up)

    def forward(self, x, out):
        delta = self.branch(x)
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
        self.at_input = config.dropout_at == "input"
        self.conv_args = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
        self.down = nn.Parameter(kaiming_(torch.empty(config.r, *like.shape[1:], device=like.device, dtype=like.dtype)))
        self.up = nn.Parameter(torch.zeros(like.shape[0], config.r, 1, 1, device=like.device, dtype=like.dtype))

    def forward(self, x, out):
        if self.at_input:
            return out + self.s * F.conv2d(F.conv2d(self.dropout(x), self.down, **self.conv_args), self.up)
        return out + self.s * F.conv2d(self.dropout(F.conv2d(x, self.down, **self.conv_args)), self.up)

    @torch.no_grad()
    def merge_into(self, base: nn.Conv2d) -> None:
        update = self.s * (self.up.flatten(1) @ self.down.flatten(1)).view_as(base.weight)
        base.weight += update.to(base.weight.dtype)


def untie_head(model) -> None:
    """Before the embedding changes on its own: give a tied output head its own copy of the weight."""
    model.untie_weights()


def check_rank(method: str, r: int, targets) -> None:
    """A rank above both sizes of the layer only costs memory (a huge one, all of it). A rank between the two is
    allowed: the paper itself uses r = 64 on Vim-S's dt_proj, whose input is 24 wide."""
    for p in targets:
        rows = p.rows[1] - p.rows[0]
        inputs = p.layer.in_features
        if r > max(rows, inputs):
            raise ConfigError(f"{method}: r={r} is larger than the layer it adapts ({p.attr}: {inputs} inputs -> "
                              f"{rows} rows); use r <= {max(rows, inputs)} (a full-rank update needs only "
                              f"{min(rows, inputs)})")


def attach_linear_lora(model, key: str, role: str, config: LoRAConfig) -> list[torch.Tensor]:
    """A LoRADelta named `key` on the `role` projection of every mixer and direction; returns its tensors."""
    params = []
    for p in projections(model, role):
        delta = LoRADelta(p.layer.in_features, *p.rows, config, like=p.layer.weight)
        attach_delta(p, key, delta)
        params += [delta.down, delta.up]
    return params


def merge_linear_lora(model, key: str, role: str) -> None:
    for p in projections(model, role):
        detach_delta(p, key).merge_into(p.layer)


class LinearLoRA(Method):
    """LoRA on the `role` projection of every mixer (a whole layer or a row block). Subclassed once per target below."""

    category = "LoRA"
    Config = LoRAConfig
    role: str
    scaled_update = True
    search_step2 = {"r": {"int": [4, 16]}, "s": {"log": [1e-2, 1.0]}, "lr": TABLE9_LR, "weight_decay": TABLE9_DECAY}

    def check(self, model):
        check_rank(self.name, self.config.r, projections(model, self.role))

    def attach(self, model):
        return attach_linear_lora(model, self.name, self.role, self.config)

    def merge(self, model):
        merge_linear_lora(model, self.name, self.role)


# id: (projection role, the (layer, row block) it changes for clash checks, Table 1 rank, Table 9 step-1 rank,
# description). One line here adds a LoRA target; the paper preset paper/<id> is the Table 1 rank.
LORA_TARGETS = {
    "lora_in_proj": ("in_proj", ("in_proj", None), 32, 8, "LoRA on in_proj (both the X and the Z half)"),
    "lora_x_proj": ("x_proj", ("x_proj", None), 64, 8,
                    "LoRA on x_proj (dt, B and C rows; one per direction in Vim and VMamba)"),
    "lora_dt_proj": ("dt_proj", ("dt_proj", None), 64, 4, "LoRA on dt_proj (one per direction in Vim and VMamba)"),
    "lora_out_proj": ("out_proj", ("out_proj", None), 96, 8, "LoRA on out_proj"),
    "lora_p_x": ("X", ("in_proj", "X"), 64, 8, "partial LoRA on the X half of in_proj: the paper's best single method"),
    "lora_p_z": ("Z", ("in_proj", "Z"), 64, 8, "partial LoRA on the Z (gate) half of in_proj"),
    "lora_p_dt": ("dt", ("x_proj", "dt"), 64, 4, "partial LoRA on the dt rows of x_proj (the paper's LoRA_p(d))"),
    "lora_p_b": ("B", ("x_proj", "B"), 64, 4, "partial LoRA on the B rows of x_proj"),
    "lora_p_c": ("C", ("x_proj", "C"), 64, 4, "partial LoRA on the C rows of x_proj"),
}
# where the official code calls LoRA as a module (with dropout), vision/.../vim_peft_all.py L122-171, L597-616
MODULE_CALLED = ("in_proj", "out_proj", "X", "Z")
# VMamba's Table 5 rows (vmamba_peft_all.py set_peft): `lora_out_proj` and `lora_in_proj` (LoRA_p(X): with no z gate
# in_proj is X alone) are called as modules with dropout 0.1 after Down, at set_peft's default scale 1; rank 64 for
# S and B (B's shipped config has 16, but the table's 2,039K is rank 64: docs/vision.md)
VMAMBA_LORA = {"lora_out_proj": "r=64,s=1,dropout=0.1,dropout_at=bottleneck",
               "lora_p_x": "r=64,s=1,dropout=0.1,dropout_at=bottleneck"}
# Table 7 (language): lora_p_x's learning rate by model size
LORA_P_X_LR = {"mamba-130m": 1e-3, "mamba-370m": 5e-4, "mamba-790m": 5e-4, "mamba-1.4b": 1e-4}

for _name, (_role, _target, _rank, _step1_rank, _text) in LORA_TARGETS.items():
    register(type(_name, (LinearLoRA,), {
        "name": _name, "role": _role, "description": _text, "targets": frozenset({_target}),
        "examples": (Example(f"{_name}:r=4"),),
        # the official placement: dropout 0.1 after Down where LoRA is called as a module (X, Z, in_proj, out_proj),
        # none where the official code merges the weights (x_proj, dt_proj, the dt/B/C rows)
        "presets": {_name: [f"{_name}:r={_rank},s=0.1," + ("dropout=0.1,dropout_at=bottleneck" if _role in MODULE_CALLED
                                                             else "dropout=0")],
                    **({f"vmamba/{_name}": [f"{_name}:{VMAMBA_LORA[_name]}"]} if _name in VMAMBA_LORA else {})},
        "search_step1": {"r": _step1_rank, "s": 0.1},
        "lr_by_size": LORA_P_X_LR if _name == "lora_p_x" else {},
        # Table 9 searches lora_p_b's rank in 4..12, the others in 4..16
        "search_step2": ({**LinearLoRA.search_step2, "r": {"int": [4, 12]}} if _name == "lora_p_b"
                         else LinearLoRA.search_step2),
    }))


def embedding_layer(model, method: str) -> tuple[nn.Module, str, nn.Module]:
    """(owner, attribute, plain layer) of the model's input embedding; NotApplicable without one."""
    if model.embedding_path is None:
        raise NotApplicable(f"{method}: {type(model).__name__} has no input embedding to adapt")
    owner, attr = owner_and_attr(model, model.embedding_path)
    return owner, attr, unwrap(getattr(owner, attr))


def check_embedding_lora(model, key: str, r: int) -> None:
    _, _, base = embedding_layer(model, key)
    if isinstance(base, nn.Embedding):
        size = max(base.num_embeddings, base.embedding_dim)
    elif isinstance(base, nn.Conv2d):
        size = max(base.out_channels, base.weight[0].numel())
    else:
        raise NotApplicable(f"{key}: the embedding {model.embedding_path} is a {type(base).__name__}, "
                            f"expected an Embedding or a patch Conv2d")
    if r > size:
        raise ConfigError(f"{key}: r={r} is larger than the embedding it adapts ({model.embedding_path}: width "
                          f"{size}); use r <= {size}")


def attach_embedding_lora(model, key: str, config: LoRAConfig) -> list[torch.Tensor]:
    owner, attr, base = embedding_layer(model, key)
    if isinstance(base, nn.Embedding):
        delta = EmbeddingLoRADelta(base, config)
    elif isinstance(base, nn.Conv2d):
        delta = ConvLoRADelta(base, config)
    add_delta(owner, attr, key, delta)
    return [delta.down, delta.up]


def merge_embedding_lora(model, key: str) -> None:
    owner, attr, base = embedding_layer(model, key)
    untie_head(model)
    remove_delta(owner, attr, key).merge_into(base)


@register
class EmbeddingLoRA(Method):
    name = "lora_embed"
    category = "LoRA"
    description = "LoRA on the token embedding (Vim: on the patch-embedding convolution)"
    Config = LoRAConfig
    targets = frozenset({("embedding", None)})
    examples = (Example("lora_embed:r=4"),)
    presets = {"lora_embed": ["lora_embed:r=32"]}
    scaled_update = True
    search_step1 = {"r": 8, "s": 0.1}
    search_step2 = LinearLoRA.search_step2

    def check(self, model):
        check_embedding_lora(model, self.name, self.config.r)

    def attach(self, model):
        return attach_embedding_lora(model, self.name, self.config)

    def merge(self, model):
        merge_embedding_lora(model, self.name)


@dataclass
class SLLLoRAConfig(LoRAConfig):
    r: int = option(8, "rank (Halloran et al.: 8 for 130m, 16 for 370m, 32 for 790m, 64 for 1.4b)", minimum=1)
    s: float = option(1.0, "scale s (SLL LoRA uses 1)", exclusive_minimum=0)


SLL_LAYERS = ("in_proj", "out_proj", "x_proj")
SLL_RANK = {"mamba-130m": 8, "mamba-370m": 16, "mamba-790m": 32, "mamba-1.4b": 64}     # Halloran et al.


@register
class SLLLoRA(Method):
    name = "sll_lora"
    category = "LoRA"
    description = "baseline of Halloran et al. (2024): LoRA on in_proj, out_proj, x_proj and the embedding, s=1"
    Config = SLLLoRAConfig
    targets = frozenset({(layer, None) for layer in SLL_LAYERS} | {("embedding", None)})
    examples = (Example("sll_lora:r=4"),)
    presets = {"sll_lora": ["sll_lora:s=1"]}
    scaled_update = True
    rank_by_size = SLL_RANK

    def check(self, model):
        check_embedding_lora(model, self.name, self.config.r)
        for layer in SLL_LAYERS:
            check_rank(self.name, self.config.r, projections(model, layer))

    def attach(self, model):
        params = attach_embedding_lora(model, self.name, self.config)
        for layer in SLL_LAYERS:
            params += attach_linear_lora(model, self.name, layer, self.config)
        return params

    def merge(self, model):
        merge_embedding_lora(model, self.name)
        for layer in SLL_LAYERS:
            merge_linear_lora(model, self.name, layer)
