"""Loading Vision Mamba checkpoints, safely and strictly; saving our own Vim format.

Formats read:
  * the released ones (hustvl/Vim-{tiny,small,base}-midclstok): a `.pth` pickle of a dict whose "model" is the
    state dict and whose "args" is the training script's argparse.Namespace (plus optimizer state and the like);
  * ours: a folder with config.json (a VimConfig) and model.safetensors (`save_vim`).
A pickle is read with torch.load(weights_only=True) and only argparse.Namespace allow-listed: torch's restricted
unpickler builds tensors, containers and plain values, nothing else, so no code in the file can run. Before
that, the globals the pickle asks for are listed without loading it, and anything outside the allow-list is
refused by name. Every key and shape is checked against the architecture read from the weights.

Other sizes: `num_classes` gives a fresh head; `img_size` resizes the position embedding, taking the class token
out of the middle, interpolating the patch grid bicubically and putting the class token back in the new middle.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ...assets import HERE as ASSETS
from ...errors import CheckpointError, ConfigError
from ..checkpoint import CONFIG_FILE, WEIGHTS_FILE, write_model_folder
from ..files import (
    PICKLE_SUFFIXES,
    check_tensors,
    config_format,
    hub_download,
    local_checkpoint,
    looks_local,
    read_our_config,
    read_safe_pickle,
    read_weights_file,
    ready,
)
from .modeling import VIM_ARCHITECTURES, VimConfig, VisionMamba

# short name -> (hub id, file in it)
HUB_CHECKPOINTS = {
    "vim-tiny": ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth"),
    "vim-small": ("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth"),
    "vim-base": ("hustvl/Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth"),
}
HUB_FILES = dict(HUB_CHECKPOINTS.values())
# built into the package (scripts/pretrain_tiny_vim.py writes it): the vision default
BUILTIN = {"tiny-vim": ASSETS / "tiny-vim"}
ALLOWED_GLOBALS = (argparse.Namespace,)       # what a released checkpoint pickles besides tensors and plain data
FORMAT = "mambapeft-vim"


# ---------------------------------------------------------------- reading the released pickles


def read_vim_pickle(file: Path) -> tuple[dict, argparse.Namespace | None]:
    """(state dict, training args or None) from a released-style .pth, without running anything in it."""
    state, whole = read_safe_pickle(Path(file), list(ALLOWED_GLOBALS), "Vim")
    args = whole.get("args") if whole else None
    return state, args if isinstance(args, argparse.Namespace) else None


def config_from_state(state: dict, args: argparse.Namespace | None, source: str) -> VimConfig:
    """The architecture of a Vim state dict (the training args settle the stride and image size)."""
    needed = ("patch_embed.proj.weight", "pos_embed", "cls_token", "layers.0.mixer.A_log",
              "layers.0.mixer.in_proj.weight", "layers.0.mixer.dt_proj.weight", "head.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise CheckpointError(f"{source} is not a Vim checkpoint with a class token: it lacks {', '.join(missing)}")
    if "layers.0.mixer.A_b_log" not in state:
        raise CheckpointError(f"{source} has no backward-direction weights (A_b_log): only bidirectional "
                              f"'bimamba v2' Vim checkpoints are supported")
    model_name = str(getattr(args, "model", "") or "")
    if model_name and "midclstok" not in model_name and "middle_cls_token" not in model_name:
        raise CheckpointError(f"{source} was trained as {model_name!r}; only Vim models with the class token in the "
                              f"middle ('midclstok') are supported")
    if "rope" in model_name:
        raise CheckpointError(f"{source} was trained as {model_name!r} (rotary positions), which is not supported")
    proj = state["patch_embed.proj.weight"]                                   # (d, C, p, p)
    d_model, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k)))
    E2, _ = state["layers.0.mixer.in_proj.weight"].shape                       # (2E, d)
    E, N = state["layers.0.mixer.A_log"].shape                                # (E, N)
    if E2 != 2 * E or E % d_model:
        raise CheckpointError(f"{source}: in_proj has {E2} outputs and A_log {E} rows; expected 2E and E = expand * d")
    tokens = state["pos_embed"].shape[1]
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise CheckpointError(f"{source}: pos_embed has {tokens} rows, not a square grid plus one class token")
    stride = int(m.group(1)) if (m := re.search(r"stride(\d+)", model_name)) else patch
    img_size = (grid - 1) * stride + patch
    trained = getattr(args, "input_size", None)
    if isinstance(trained, int) and (trained - patch) // stride + 1 == grid:
        img_size = trained                       # the training resolution, when it gives this grid
    conv_k = state["layers.0.mixer.conv1d.weight"].shape[-1] if "layers.0.mixer.conv1d.weight" in state else 4
    try:
        return VimConfig(
            d_model=d_model, depth=depth, img_size=img_size, patch_size=patch, stride=stride, in_chans=in_chans,
            num_classes=state["head.weight"].shape[0], d_state=N, d_conv=conv_k, expand=E // d_model,
            dt_rank=state["layers.0.mixer.dt_proj.weight"].shape[1],
        )
    except ConfigError as err:
        raise CheckpointError(f"{source}: the weights describe no valid Vim ({err})") from None


def load_state_dict_strict(model: VisionMamba, state: dict, source: str) -> None:
    """Copies `state` into `model` after checking every key and shape."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_tensors(expected, state, source, against="the Vim architecture it describes", implied="expected")
    model.load_state_dict(state, strict=True, assign=True)


# ---------------------------------------------------------------- other sizes


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """(1, g*g + 1, d) with the class token at g*g // 2 -> (1, G*G + 1, d) with it at G*G // 2 (bicubic)."""
    _, tokens, d = pos_embed.shape
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise ConfigError(f"pos_embed has {tokens} rows, not a square grid plus one class token")
    if new_grid == grid:
        return pos_embed
    c, new_c = grid * grid // 2, new_grid * new_grid // 2
    cls = pos_embed[:, c : c + 1]                                                    # (1, 1, d)
    patches = torch.cat([pos_embed[:, :c], pos_embed[:, c + 1 :]], dim=1)             # (1, g*g, d) row-major
    patches = patches.reshape(1, grid, grid, d).permute(0, 3, 1, 2).float()           # (1, d, g, g)
    patches = F.interpolate(patches, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, d).to(pos_embed.dtype)
    return torch.cat([patches[:, :new_c], cls, patches[:, new_c:]], dim=1)


# ---------------------------------------------------------------- where the files are


def resolve_checkpoint(name_or_path, *, filename=None, revision=None, cache_dir=None, local_files_only=None) -> Path:
    """A local .pth file or folder as is; "tiny-vim" (built in); a short name ("vim-small") or hub id fetched from
    the hub (or its cache)."""
    local = local_checkpoint(name_or_path, BUILTIN, "scripts/pretrain_tiny_vim.py", filename)
    if local is not None:
        return local
    name = str(name_or_path)
    if looks_local(name):
        raise CheckpointError(f"no file or folder {name}: pass an existing Vim checkpoint or a hub id")
    key = name.lower()
    if key in HUB_CHECKPOINTS:
        name, filename = HUB_CHECKPOINTS[key][0], filename or HUB_CHECKPOINTS[key][1]
    elif "/" not in name:
        hint = f"; {name!r} is an architecture: build it with from_config({name!r})" if key in VIM_ARCHITECTURES else ""
        raise CheckpointError(f"{name!r} is not a file, a folder, a released Vim ({', '.join(HUB_CHECKPOINTS)}) or a "
                              f"hub id of the form owner/name{hint}")
    filename = filename or HUB_FILES.get(name)
    found = hub_download(name, filename=filename, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, "*.pth"],
                         revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    return resolve_checkpoint(found, filename=filename) if found.is_dir() else found


# ---------------------------------------------------------------- the public loader and saver


def load_vim(name_or_path, *, num_classes: int | None = None, img_size: int | None = None, filename: str | None = None,
             dtype: torch.dtype | None = torch.float32, device=None, revision: str | None = None, cache_dir=None,
             local_files_only: bool | None = None) -> VisionMamba:
    """A pretrained Vim: a released .pth (local, or from the hub: "vim-small", "hustvl/Vim-small-midclstok"), one of
    our folders (`save_vim`), or "tiny-vim", the built-in one pretrained on digits (scripts/pretrain_tiny_vim.py).

    num_classes: replace the head by a fresh one for that many classes. img_size: another input resolution (the
    position embedding is resized). dtype: float32 by default; None keeps the checkpoint's.
    """
    file = resolve_checkpoint(name_or_path, filename=filename, revision=revision, cache_dir=cache_dir,
                              local_files_only=local_files_only)
    source = str(file)
    if file.is_dir():
        config, state = _read_folder(file)
    else:
        state, args = read_vim_pickle(file)
        config = config_from_state(state, args, source)
    with torch.device("meta"):
        model = VisionMamba(config)
    load_state_dict_strict(model, state, source)
    if img_size is not None and img_size != config.img_size:
        config.check_image_size(img_size)
        model = with_image_size(model, img_size)
    if num_classes is not None and num_classes != model.config.num_classes:
        model.reset_head(num_classes)
    return ready(model, name_or_path, dtype=dtype, device=device)


@torch.no_grad()
def with_image_size(model: VisionMamba, img_size: int) -> VisionMamba:
    """The same weights for images of `img_size` pixels: the position embedding resized to the new grid."""
    config = VimConfig(**{**model.config.to_dict(), "img_size": img_size})
    state = dict(model.state_dict())
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], config.grid_size)
    with torch.device("meta"):
        resized = VisionMamba(config)
    load_state_dict_strict(resized, state, f"the model resized to {img_size} px")
    return resized


def _read_folder(folder: Path) -> tuple[VimConfig, dict]:
    return read_our_config(folder, FORMAT, VimConfig, "Vim"), read_weights_file(folder)


def save_vim(model: VisionMamba, folder) -> None:
    """config.json + model.safetensors, which `load_vim` reads back (PEFT parts must be merged or saved apart)."""
    write_model_folder(model, folder, {"format": FORMAT, **model.config.to_dict()})


def read_vim_shapes(name_or_path) -> VisionMamba:
    """A meta-device Vim (shapes only) for a checkpoint: our folders are read from config.json alone."""
    file = resolve_checkpoint(name_or_path)
    if file.is_dir():
        config = read_our_config(file, FORMAT, VimConfig, "Vim")
    else:
        state, args = read_vim_pickle(file)
        config = config_from_state(state, args, str(file))
    with torch.device("meta"):
        return VisionMamba(config)


def looks_like_vim(name_or_path) -> bool:
    """Whether a name is one of Vim's, a .pth (Vim's release format), or one of our Vim folders (by its config)."""
    key = str(name_or_path).lower()
    path = Path(os.fspath(name_or_path)).expanduser()
    return (key in HUB_CHECKPOINTS or key in BUILTIN or key.startswith("hustvl/vim")
            or (path.is_file() and path.suffix in PICKLE_SUFFIXES) or config_format(path) == FORMAT)
