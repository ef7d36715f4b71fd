"""Building and loading models by name, for every family: the one place front ends (CLI, training, search) ask.

    from_config("mamba-130m" | "tiny" | "vim-small" | "s4d-theory" | MambaConfig | VimConfig | S4DConfig,
                device="meta")   random weights
    shapes_model(name)        a meta-device model (no weights read) for any name `train` or `eval` accepts:
                              an architecture, "builtin", "tiny-vim", a checkpoint folder or file, a hub id
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError, did_you_mean
from .architectures import ARCHITECTURES, arch_config
from .lm import MambaLM
from .s4d import S4D_ARCHITECTURES, DeepS4D, S4DConfig, build_s4d
from .vim import VIM_ARCHITECTURES, VimConfig, VisionMamba, build_vim

# every name from_config builds, and the packaged pretrained models
ALL_ARCHITECTURES = [*ARCHITECTURES, *VIM_ARCHITECTURES]
ALL_ARCHITECTURES += [*S4D_ARCHITECTURES]
BUILTIN_NAMES = ("builtin", "tiny-vim")
# every model family, by the small architecture that stands for it in checks (`mambapeft methods`, the conformance
# test): adding a family is implementing model/interface.py and one line here
FAMILIES = {"mamba": "mamba-micro", "vim": "vim-micro"}
FAMILIES["s4d"] = "s4d-micro"


def from_config(config, *, device=None, dtype=None, seed: int | None = None) -> MambaLM | VisionMamba | DeepS4D:
    """A randomly initialised model from an architecture name ("mamba-130m", "tiny", "vim-small", ...) or a
    MambaConfig or VimConfig. device="meta" allocates nothing (shapes only): even mamba-2.8b builds instantly."""
    if isinstance(config, VimConfig) or (isinstance(config, str) and config.lower() in VIM_ARCHITECTURES):
        return build_vim(config, device=device, dtype=dtype, seed=seed)
    if isinstance(config, S4DConfig) or (isinstance(config, str) and config.lower() in S4D_ARCHITECTURES):
        return build_s4d(config, device=device, dtype=dtype, seed=seed)
    if isinstance(config, str):
        if config.lower() not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {config!r}{did_you_mean(config.lower(), ALL_ARCHITECTURES)}; "
                              f"known: {', '.join(ALL_ARCHITECTURES)}")
        config = arch_config(config)
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    return MambaLM(config, device=device, dtype=dtype)


def shapes_model(name: str):
    """(a meta-device model, where it came from) for an architecture name, a built-in model, a folder or a hub id."""
    from .loading import read_config, resolve_folder
    from .vim_loading import looks_like_vim, read_vim_shapes

    if name.lower() in ALL_ARCHITECTURES:
        return from_config(name, device="meta"), "architecture (random weights)"
    if "/" not in name and not Path(name).expanduser().exists() and name not in BUILTIN_NAMES:
        raise ConfigError(f"unknown architecture {name!r}{did_you_mean(name.lower(), ALL_ARCHITECTURES)}; known: "
                          f"{', '.join(ALL_ARCHITECTURES)}; or a built-in model ({', '.join(BUILTIN_NAMES)}), a "
                          f"checkpoint folder or a hub id owner/name")
    if looks_like_vim(name):
        return read_vim_shapes(name), f"Vision Mamba checkpoint, {name}"
    if Path(name).expanduser().is_file():
        raise ConfigError(f"{name} is a file: pass a checkpoint folder (or a Vision Mamba .pth)")
    folder = resolve_folder(name)
    config, fmt = read_config(folder)
    with torch.device("meta"):
        model = MambaLM(config)
    return model, f"checkpoint, {'Hugging Face' if fmt == 'hf' else 'mamba_ssm'} format, {folder}"
