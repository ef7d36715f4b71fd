"""Vision Mamba (Vim, "bimamba v2", class token in the middle) on Mamba-1's bidirectional mixer.

    modeling.py   the model: patch embedding, class token, position embedding, the blocks, the head
    loading.py    the released .pth checkpoints (read safely) and our own folder format
"""

from __future__ import annotations

import os
from pathlib import Path

from ..files import PICKLE_SUFFIXES, config_format
from ..registry import EXACT, FILES, GUESS, ClassifierFamily, register_family
from ..summary import count_unique
from .loading import BUILTIN, FORMAT, HUB_CHECKPOINTS, load_vim, read_vim_shapes, save_vim, with_image_size
from .modeling import VIM_ARCHITECTURES, VimConfig, VimOutput, VisionMamba, build_vim, vim_config


class VisionFamily(ClassifierFamily):
    """The image-classification families (Vim, VMamba): VTAB-1k runs."""

    tasks = ("vision",)


@register_family
class VimFamily(VisionFamily):
    name = "vim"
    title = "Vision Mamba"
    model_class = VisionMamba
    config_class = VimConfig
    architectures = VIM_ARCHITECTURES
    hub_ids = {name: repo for name, (repo, _) in HUB_CHECKPOINTS.items()}
    builtins = BUILTIN
    check_architecture = "vim-micro"

    def config(self, name: str, **overrides):
        return vim_config(name, **overrides)

    def claim(self, name_or_path) -> int:
        key = str(name_or_path).lower()
        if self.owns_name(key) or key in HUB_CHECKPOINTS:
            return EXACT
        path = Path(os.fspath(name_or_path)).expanduser()
        if config_format(path) == FORMAT:
            return FILES
        if key.startswith("hustvl/vim") or (path.is_file() and path.suffix in PICKLE_SUFFIXES):
            return GUESS          # Vim's release format; VMamba claims the .pth files whose keys are its own
        return 0

    def load(self, name_or_path, **options):
        return load_vim(name_or_path, **options)

    def read_shapes(self, name_or_path):
        return read_vim_shapes(name_or_path)

    def source(self, name_or_path) -> str:
        return f"Vision Mamba checkpoint, {name_or_path}"

    def save(self, model, folder) -> None:
        save_vim(model, folder)

    def fit_to_adapter(self, model, architecture: dict):
        size = architecture.get("img_size")
        if isinstance(size, int) and size != model.config.img_size:
            model = with_image_size(model, size)
        return super().fit_to_adapter(model, architecture)

    def summary(self, model) -> dict:
        c = model.config
        mixer = model.layers[0].mixer
        per_layer = count_unique(model.layers[0].parameters())
        return {
            "model_type": "vim", "d_model": c.d_model, "depth": c.depth, "img_size": c.img_size,
            "patch_size": c.patch_size, "stride": c.stride, "tokens": c.num_patches + 1, "num_classes": c.num_classes,
            "d_inner": mixer.d_inner, "d_state": mixer.d_state, "dt_rank": mixer.dt_rank, "d_conv": mixer.d_conv,
            "parameters": {
                "total": count_unique(model.parameters()),
                "patch_embed": count_unique(model.patch_embed.parameters()),
                "cls_token": model.cls_token.numel(), "pos_embed": model.pos_embed.numel(),
                "per_layer": per_layer, "layers": per_layer * c.depth,
                "norm_f": model.norm_f.weight.numel(), "head": count_unique(model.head.parameters()),
            },
        }

    def summary_lines(self, summary: dict) -> list[str]:
        return [
            "  " + "   ".join(f"{k} {summary[k]}" for k in ("d_model", "depth", "img_size", "patch_size", "stride",
                                                          "tokens", "num_classes")),
            "  " + "   ".join(f"{k} {summary[k]}" for k in ("d_inner", "d_state", "dt_rank", "d_conv"))
            + "   bidirectional (v2), class token in the middle",
            *(f"  {key:<12} {value:,}" for key, value in summary["parameters"].items()),
        ]


__all__ = ["VIM_ARCHITECTURES", "VimConfig", "VimOutput", "VisionMamba", "build_vim", "vim_config", "load_vim",
           "save_vim", "VimFamily", "VisionFamily"]
