"""Vision Mamba (Vim, Zhu et al. 2024) on our one mixer, with the module names of the released checkpoints.

    pixel_values (b, 3, H, W) --patch_embed.proj (conv, kernel patch, stride s)--> M patch tokens (b, M, d)
    class token inserted in the middle (index M // 2)  -> (b, M + 1, d)
    + pos_embed (1, M + 1, d)
    [model hooks may insert soft prompt tokens here: stage "embeddings"]
    for each layer:  h = h + mixer(norm(h))          bidirectional "v2" mixer; residual in float32
    norm_f --> [soft prompt positions dropped] --> the class token (b, d) --> head --> logits (b, classes)

The released models (hustvl/Vim-{tiny,small,base}-midclstok; models_mamba.py, "bimambav2 ... midclstok_div2")
fuse the residual add into the next norm ("Add -> Norm -> Mixer", residual kept in fp32); that is the same
function as the pre-norm block above, which `MambaBlock` of the language model computes. The mixer averages the
two directions, (y_fwd + flip(y_bwd)) / 2, before out_proj ("div2"). Drop path (stochastic depth, rising linearly
over the blocks to `set_drop_path`'s rate, in training only) is off by default; the paper's VTAB fine-tuning uses 0.1
(every official config, e.g. vision/configs/.../vim/vtab1k/1_small/2_small_lorap_X_64.py L26), which the vision
recipe sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.utils import ModelOutput

from ...errors import ConfigError
from ..config import FamilyConfig
from ..hooks import drop_inserted, insert_from_hooks
from ..interface import PeftModelInterface, TensorSlot
from ..mamba import MambaBlock, MambaMixer, RMSNorm


@dataclass
class VimConfig(FamilyConfig):
    """The sizes of a Vision Mamba; everything an adapter or a checkpoint depends on."""

    title = "Vim"
    positive_ints = ("d_model", "depth", "img_size", "patch_size", "stride", "in_chans", "num_classes", "d_state",
                     "d_conv", "expand")

    d_model: int = 192
    depth: int = 24
    img_size: int = 224
    patch_size: int = 16
    stride: int = 16                   # 16: the plain models; 8: the "stride8" ones (overlapping patches)
    in_chans: int = 3
    num_classes: int = 1000
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None         # None: ceil(d_model / 16)
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    model_type: str = "vim"

    def validate(self):
        if self.img_size < self.patch_size:
            raise ConfigError(f"Vim config: img_size {self.img_size} is smaller than one patch ({self.patch_size})")

        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)

    def check_image_size(self, img_size: int) -> None:
        """A requested input size must tile into whole patches: otherwise the last pixel rows are silently ignored."""
        if img_size < self.patch_size or (img_size - self.patch_size) % self.stride:
            fits = self.patch_size + self.stride * max(0, (img_size - self.patch_size) // self.stride)
            raise ConfigError(f"image size {img_size} does not tile into patches of {self.patch_size} px with stride "
                              f"{self.stride} (pixels would be ignored); use {fits} or {fits + self.stride}")

    @property
    def grid_size(self) -> int:
        """Patches per side: (img - patch) // stride + 1 (14 for 224 px, patch 16; 27 for stride 8)."""
        return (self.img_size - self.patch_size) // self.stride + 1

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def cls_position(self) -> int:
        """Index of the class token in the sequence of M + 1 tokens: the middle, M // 2."""
        return self.num_patches // 2


# Named architectures: the released sizes (depth 24, patch 16, 224 px) and their stride-8 variants, plus
# "vim-micro", a tiny model for tests and quick demos.
VIM_ARCHITECTURES: dict[str, dict] = {
    "vim-tiny": dict(d_model=192),
    "vim-small": dict(d_model=384),
    "vim-base": dict(d_model=768),
    "vim-tiny-stride8": dict(d_model=192, stride=8),
    "vim-small-stride8": dict(d_model=384, stride=8),
    "vim-base-stride8": dict(d_model=768, stride=8),
    "vim-micro": dict(d_model=32, depth=2, img_size=32, patch_size=8, stride=8, num_classes=10),
}


def vim_config(name: str, **overrides) -> VimConfig:
    """The VimConfig of a named architecture ("vim-small", ...), with any field overridden."""
    return VimConfig.named(VIM_ARCHITECTURES, name, **overrides)


class PatchEmbed(nn.Module):
    """Non-overlapping (or, with stride < patch, overlapping) patches to tokens; `proj` as in the released code."""

    def __init__(self, config: VimConfig, device=None, dtype=None):
        super().__init__()
        self.img_size = config.img_size
        self.proj = nn.Conv2d(config.in_chans, config.d_model, config.patch_size, stride=config.stride,
                              device=device, dtype=dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"expected images (batch, channels, {self.img_size}, {self.img_size}), "
                f"got {tuple(pixel_values.shape)}; resize them, or load the model with "
                f"img_size={pixel_values.shape[-1]} (resizes the position embedding)"
            )
        return self.proj(pixel_values).flatten(2).mT                 # (b, d, g, g) -> (b, M, d)


@dataclass
class VimOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None       # (b, num_classes)
    features: torch.Tensor | None = None     # (b, d): the class token after norm_f


class VisionMamba(nn.Module, PeftModelInterface):
    """Vim with a middle class token; its PEFT interface (model/interface.py) adds the class token and the
    position embedding to what the language model offers."""

    family = "vim"
    paper_drop_path = 0.1                  # the rate of the paper's VTAB fine-tuning (every official Vim config)
    is_causal = False                      # bidirectional: a soft token anywhere reaches every output
    embedding_path = "patch_embed.proj"
    head_path = "head"

    def __init__(self, config: VimConfig, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.config = config
        d = config.d_model
        self.patch_embed = PatchEmbed(config, **factory)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d, **factory))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, d, **factory))
        self.layers = nn.ModuleList(
            MambaBlock(
                MambaMixer(d, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand,
                           dt_rank=config.dt_rank, bidirectional=True, **factory),
                config.norm_eps, config.residual_in_fp32, **factory,
            )
            for _ in range(config.depth)
        )
        self.norm_f = RMSNorm(d, config.norm_eps, **factory)
        self.head = nn.Linear(d, config.num_classes, **factory)
        self.hooks = nn.ModuleList()       # model-level PeftHooks: soft prompt tokens at stage "embeddings"
        if self.head.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None):
        """Random initialisation in the style of the released code (loading overwrites it)."""
        if seed is not None:
            torch.manual_seed(seed)
        fan_in = self.patch_embed.proj.weight[0].numel()
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=fan_in**-0.5)    # LeCun normal
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for block in self.layers:
            block.mixer.reset_parameters()
            block.mixer.out_proj.weight /= len(self.layers) ** 0.5      # GPT-2 style scaling of the residual branch
            block.norm.weight.fill_(1.0)
        self.norm_f.weight.fill_(1.0)
        self.reset_head()

    @torch.no_grad()
    def reset_head(self, num_classes: int | None = None) -> None:
        """A fresh head (truncated normal 0.02, bias 0), for `num_classes` classes if given."""
        if num_classes is not None and num_classes != self.head.out_features:
            if num_classes < 1:
                raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
            w = self.head.weight
            self.head = nn.Linear(self.config.d_model, num_classes, device=w.device, dtype=w.dtype)
            self.config = VimConfig(**{**self.config.to_dict(), "num_classes": num_classes})
        if self.head.weight.device.type != "meta":
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth rising linearly from 0 at the first block to `rate` at the last (timm's rule)."""
        if not 0 <= rate < 1:
            raise ConfigError(f"drop path rate {rate} must be in [0, 1)")
        depth = len(self.layers)
        for i, block in enumerate(self.layers):
            block.drop_path = rate * i / max(1, depth - 1)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    @property
    def d_model(self) -> int:
        return self.config.d_model

    def peft_mixers(self) -> list[MambaMixer]:
        return [layer.mixer for layer in self.layers]

    def model_tensor(self, role: str) -> TensorSlot:
        if role not in ("cls_token", "pos_embed"):
            return super().model_tensor(role)
        return TensorSlot(self, role)

    def peft_inputs(self, batch: int = 2, seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(seed)
        c = self.config
        images = torch.randn(batch, c.in_chans, c.img_size, c.img_size, generator=g)
        labels = torch.randint(0, c.num_classes, (batch,), generator=g)
        return {"pixel_values": images.to(self.device), "labels": labels.to(self.device)}

    def peft_fingerprint(self) -> dict:
        """The architecture an adapter depends on."""
        c = self.config.to_dict()
        c.pop("norm_eps")
        c.pop("residual_in_fp32")
        return c

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (b, C, H, W) -> the class token after the final norm (b, d)."""
        h = self.patch_embed(pixel_values.to(self.dtype))                     # (b, M, d)
        batch, m, _ = h.shape
        c = m // 2
        cls = self.cls_token.expand(batch, -1, -1)                            # (b, 1, d)
        h = torch.cat([h[:, :c], cls, h[:, c:]], dim=1) + self.pos_embed      # (b, M+1, d)
        for hook in self.hooks:
            hook.begin_forward(0)
        h, _, kept = insert_from_hooks(self.hooks, "embeddings", 0, h, None, 0)    # soft prompt in
        for layer in self.layers:
            h = layer(h)
        h = drop_inserted(self.norm_f(h), kept)                                # soft prompt out: (b, M+1, d)
        return h[:, c]

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **unused) -> VimOutput:
        """pixel_values (b, C, H, W) -> logits (b, num_classes); cross-entropy loss when labels (b,) are given."""
        features = self.forward_features(pixel_values)
        logits = self.head(features.to(self.head.weight.dtype)).float()
        loss = F.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        return VimOutput(loss=loss, logits=logits, features=features)


def build_vim(config: str | VimConfig, *, device=None, dtype=None, seed: int | None = None, **overrides) -> VisionMamba:
    """A randomly initialised Vim from a name ("vim-small", ...) or a VimConfig; device="meta": shapes only."""
    if isinstance(config, str):
        config = vim_config(config, **overrides)
    elif overrides:
        config = VimConfig(**{**config.to_dict(), **overrides})
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    return VisionMamba(config, device=device, dtype=dtype)
