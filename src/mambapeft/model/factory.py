"""Building and loading models by name, for every family: what front ends (CLI, training, search) call. Each
function asks the family registry (registry.py), which knows every family's names, files and loaders.

    from_config("mamba-130m" | "tiny" | "vim-small" | "vmamba-small" | "s4d-theory" | a config, device="meta")
                                random weights
    from_pretrained(name)       a pretrained model of any family: a built-in model, a checkpoint file or folder,
                                a hub id (`load_model` is the same)
    shapes_model(name)          (a meta-device model, where it came from) for any of those names, no weights read
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .registry import FAMILIES, all_architectures, builtin_names, family_of, family_of_config, known_names_hint


def family_of_architecture(name: str):
    """The family that names an architecture `name`; ConfigError listing the known ones otherwise."""
    for family in FAMILIES.values():
        if name.lower() in family.architectures:
            return family
    raise ConfigError(f"unknown architecture {name!r}{known_names_hint(name)}")


def from_config(config, *, device=None, dtype=None, seed: int | None = None):
    """A randomly initialised model from an architecture name ("mamba-130m", "mamba2-130m", "tiny", "vim-small",
    "vmamba-small", "s4d-theory", ...) or a family's config object (MambaConfig, Mamba2Config, VimConfig, ...).
    device="meta" allocates nothing (shapes only): even mamba-2.8b builds instantly."""
    if isinstance(config, str):
        family = family_of_architecture(config)
        config = family.config(config)
    else:
        family = family_of_config(config)
    return family.build(config, device=device, dtype=dtype, seed=seed)


def from_pretrained(name_or_path, **options):
    """A pretrained model of any family, every key and shape checked: a built-in model ("builtin", "tiny-mamba2",
    "tiny-vim", ...), a local checkpoint folder or file, or a hub id (a released architecture's short name stands
    for its hub id). Options go to the family's loader: language families take dtype (float32 by default; "auto"
    keeps the checkpoint's), device, revision, cache_dir, local_files_only; vision ones num_classes, img_size, ...
    """
    return family_of(name_or_path).load(name_or_path, **options)


load_model = from_pretrained


def shapes_model(name: str):
    """(a meta-device model, where it came from) for an architecture name, a built-in model, a folder, a file or
    a hub id."""
    if name.lower() in all_architectures():
        return from_config(name, device="meta"), "architecture (random weights)"
    family = family_of(name)
    return family.read_shapes(name), family.source(name)


def check_models() -> dict[str, torch.nn.Module]:
    """One small model per family (meta device), the one that stands for it in checks (`mambapeft methods`)."""
    return {name: from_config(family.check_architecture, device="meta") for name, family in FAMILIES.items()}


__all__ = ["from_config", "from_pretrained", "load_model", "shapes_model", "family_of", "family_of_architecture",
           "builtin_names", "all_architectures", "check_models"]
