"""Building and loading models by name, for every family: the one place front ends (CLI, training, search) ask.

    from_config("mamba-130m" | "tiny" | "vim-small" | "vmamba-small" | "s4d-theory" | a config, device="meta")
                              random weights
    shapes_model(name)        a meta-device model (no weights read) for any name `train` or `eval` accepts:
                              an architecture, a built-in model, a checkpoint folder or file, a hub id
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Mamba2Config

from ..errors import ConfigError, did_you_mean
from .architectures import ARCHITECTURES, MAMBA2_ARCHITECTURES, arch_config, mamba2_config
from .lm import MambaLM
from .mamba2 import Mamba2LM
from .s4d import S4D_ARCHITECTURES, DeepS4D, S4DConfig, build_s4d
from .vim import VIM_ARCHITECTURES, VimConfig, VisionMamba, build_vim
from .vmamba import VMAMBA_ARCHITECTURES, VMamba, VMambaConfig, build_vmamba

# every name from_config builds, and the packaged pretrained models
ALL_ARCHITECTURES = [*ARCHITECTURES, *MAMBA2_ARCHITECTURES, *VIM_ARCHITECTURES, *VMAMBA_ARCHITECTURES,
                     *S4D_ARCHITECTURES]
BUILTIN_NAMES = ("builtin", "tiny-mamba", "tiny-mamba2", "builtin-mamba2", "tiny-vim", "tiny-vmamba")
# every model family, by the small architecture that stands for it in checks (`mambapeft methods`, the conformance
# test): adding a family is implementing model/interface.py and one line here
FAMILIES = {"mamba": "mamba-micro", "mamba2": "mamba2-tiny", "vim": "vim-micro", "s4d": "s4d-micro",
            "vmamba": "vmamba-micro"}


def from_config(config, *, device=None, dtype=None,
                seed: int | None = None) -> MambaLM | Mamba2LM | VisionMamba | VMamba | DeepS4D:
    """A randomly initialised model from an architecture name ("mamba-130m", "mamba2-130m", "tiny", "vim-small",
    "vmamba-small", "s4d-theory", ...) or a MambaConfig, Mamba2Config, VimConfig, VMambaConfig or S4DConfig.
    device="meta" allocates nothing (shapes only): even mamba-2.8b builds instantly."""
    if isinstance(config, VimConfig) or (isinstance(config, str) and config.lower() in VIM_ARCHITECTURES):
        return build_vim(config, device=device, dtype=dtype, seed=seed)
    if isinstance(config, VMambaConfig) or (isinstance(config, str) and config.lower() in VMAMBA_ARCHITECTURES):
        return build_vmamba(config, device=device, dtype=dtype, seed=seed)
    if isinstance(config, S4DConfig) or (isinstance(config, str) and config.lower() in S4D_ARCHITECTURES):
        return build_s4d(config, device=device, dtype=dtype, seed=seed)
    if isinstance(config, str) and config.lower() in MAMBA2_ARCHITECTURES:
        config = mamba2_config(config)
    if isinstance(config, Mamba2Config):
        if seed is not None and str(device) != "meta":
            torch.manual_seed(seed)
        return Mamba2LM(config, device=device, dtype=dtype)
    if isinstance(config, str):
        if config.lower() not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {config!r}{did_you_mean(config.lower(), ALL_ARCHITECTURES)}; "
                              f"known: {', '.join(ALL_ARCHITECTURES)}")
        config = arch_config(config)
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    return MambaLM(config, device=device, dtype=dtype)


def language_config(folder: Path):
    """(transformers config, format "hf" or "mamba_ssm", model class) of a language checkpoint folder."""
    from .loading import read_config
    from .mamba2_loading import is_mamba2_folder, read_mamba2_config

    if is_mamba2_folder(folder):
        return (*read_mamba2_config(folder), Mamba2LM)
    return (*read_config(folder), MambaLM)


def from_pretrained(name_or_path, *, dtype: torch.dtype | str | None = torch.float32, device=None,
                    revision: str | None = None, cache_dir=None, local_files_only: bool | None = None):
    """Loads a Mamba language checkpoint (local folder or hub id; Hugging Face or mamba_ssm format): Mamba-1 into
    `MambaLM`, Mamba-2 into `Mamba2LM`, every key and shape checked.

    dtype: float32 by default (the CPU's fast type); "auto" keeps the checkpoint's dtype.
    """
    from .loading import load_state_dict_strict, read_state_dict, resolve_folder

    folder = resolve_folder(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    config, _, model_class = language_config(folder)
    state = read_state_dict(folder)
    with torch.device("meta"):
        model = model_class(config)
    load_state_dict_strict(model, state, str(folder))
    if dtype != "auto":
        model.to(dtype=dtype)
    if device is not None:
        model.to(device)
    model.name_or_path = str(name_or_path)
    return model.eval()


def shapes_model(name: str):
    """(a meta-device model, where it came from) for an architecture name, a built-in model, a folder or a hub id."""
    from .loading import resolve_folder
    from .vim_loading import looks_like_vim, read_vim_shapes
    from .vmamba_loading import looks_like_vmamba, read_vmamba_shapes

    if name.lower() in ALL_ARCHITECTURES:
        return from_config(name, device="meta"), "architecture (random weights)"
    if "/" not in name and not Path(name).expanduser().exists() and name not in BUILTIN_NAMES:
        raise ConfigError(f"unknown architecture {name!r}{did_you_mean(name.lower(), ALL_ARCHITECTURES)}; known: "
                          f"{', '.join(ALL_ARCHITECTURES)}; or a built-in model ({', '.join(BUILTIN_NAMES)}), a "
                          f"checkpoint folder or a hub id owner/name")
    if looks_like_vmamba(name):        # before Vim: both families ship .pth files
        return read_vmamba_shapes(name), f"VMamba checkpoint, {name}"
    if looks_like_vim(name):
        return read_vim_shapes(name), f"Vision Mamba checkpoint, {name}"
    if Path(name).expanduser().is_file():
        raise ConfigError(f"{name} is a file: pass a checkpoint folder (or a Vision Mamba or VMamba .pth)")
    folder = resolve_folder(name)
    config, fmt, model_class = language_config(folder)
    with torch.device("meta"):
        model = model_class(config)
    return model, f"checkpoint, {'Hugging Face' if fmt == 'hf' else 'mamba_ssm'} format, {folder}"
