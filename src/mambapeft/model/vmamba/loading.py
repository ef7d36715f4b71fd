"""Loading VMamba checkpoints, safely and strictly; saving our own VMamba format.

Formats read:
  * the released ones (MzeroMiko/VMamba GitHub release assets, e.g. vssm_small_0229_ckpt_epoch_222.pth): a `.pth`
    pickle of a dict whose "model" is the state dict, beside "optimizer", "lr_scheduler", "scaler", "epoch",
    "max_accuracy", the training config (a yacs `CfgNode`) and maybe "model_ema";
  * a bare state dict in a `.pth`;
  * ours: a folder with config.json (a VMambaConfig) and model.safetensors (`save_vmamba`).
A pickle is read with torch.load(weights_only=True). The one global allowed beyond torch's tensors and plain data
is yacs.config.CfgNode, rebuilt as a plain OrderedDict (`CfgNodeStandIn`): yacs need not be installed and none of
its code runs. The globals a pickle asks for are listed before it is loaded; anything else is refused by
name. Every key and shape is checked against the architecture read from the weights; a Linear2d weight
(out, in, 1, 1) of the channel-first code loads as (out, in).

The released checkpoints' 1000-class ImageNet head (classifier.head.*) is dropped, as MambaPEFT's Backbone_VSSM
does: the model gets a fresh zero-initialised head for `num_classes`. Our own folders keep their head.

The official weights are GitHub release assets, not Hugging Face repositories: they load from a local file only
(download them where there is a network). A hub id of the form owner/name is tried for folders in our format.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

from ...assets import HERE as ASSETS
from ...errors import CheckpointError, ConfigError
from ..checkpoint import CONFIG_FILE, WEIGHTS_FILE
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
from .modeling import FORMAT, VMAMBA_ARCHITECTURES, VMamba, VMambaConfig

RELEASES = "https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls"
# short names -> the released file (GitHub release assets of MzeroMiko/VMamba; not on the Hugging Face hub)
RELEASED_FILES = {
    "vmamba-tiny": "vssm1_tiny_0230s_ckpt_epoch_264.pth",
    "vmamba-small": "vssm_small_0229_ckpt_epoch_222.pth",
    "vmamba-base": "vssm_base_0229_ckpt_epoch_237.pth",
}
# built into the package (scripts/pretrain_tiny_vmamba.py writes it)
BUILTIN = {"tiny-vmamba": ASSETS / "tiny-vmamba"}
HEAD_PREFIX = "classifier.head."
LINEAR2D_SUFFIXES = ("in_proj.weight", "out_proj.weight", "fc1.weight", "fc2.weight")
# upstream forward types with the maths of "v05_noz" (they differ only in kernels and einsum vs conv1d)
SUPPORTED_FORWARD_TYPES = {f"{v}_noz" for v in ("v01", "v02", "v03", "v04", "v05", "v2", "v3")}


class CfgNodeStandIn:
    """What a pickled yacs.config.CfgNode is rebuilt as: a plain OrderedDict of its keys.

    A CfgNode pickles as "new CfgNode, set its items, set its flags". torch's restricted unpickler sets items on
    plain dicts only, so creating the node returns an OrderedDict; its flags (__immutable__, ...) land in that
    dict's attribute dict, where nothing reads them. No code of yacs, or of the file, runs.
    """

    def __new__(cls, *args):
        return OrderedDict()


ALLOWED_GLOBALS = [(CfgNodeStandIn, "yacs.config.CfgNode")]


def _cfg(cfg, *path, default=None):
    """cfg.MODEL.VSSM.EMBED_DIM without failing on a missing level."""
    for key in path:
        if not isinstance(cfg, dict) or key not in cfg:
            return default
        cfg = cfg[key]
    return cfg


# ---------------------------------------------------------------- reading the released pickles


def read_vmamba_pickle(file: Path, *, mmap: bool = False) -> tuple[dict, dict | None]:
    """(state dict, training config or None) from a released-style .pth, without running anything in it."""
    state, whole = read_safe_pickle(Path(file), ALLOWED_GLOBALS, "VMamba", mmap=mmap)
    cfg = whole.get("config") if whole else None
    return state, cfg if isinstance(cfg, dict) else None


def _blocks_per_stage(state: dict) -> list[int]:
    found: dict[int, int] = {}
    for key in state:
        if m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key):
            stage, block = int(m.group(1)), int(m.group(2))
            found[stage] = max(found.get(stage, 0), block + 1)
    return [found.get(i, 0) for i in range(max(found) + 1)] if found else []


def check_training_config(cfg: dict | None, source: str) -> None:
    """The released config says which variant was trained; refuse the variants whose maths differ from ours."""
    if cfg is None:
        return
    checks = {
        ("MODEL", "VSSM", "SSM_FORWARDTYPE"): (SUPPORTED_FORWARD_TYPES, "the scan variant (forward type)"),
        ("MODEL", "VSSM", "PATCHEMBED"): ({"v2"}, "the patch embedding"),
        ("MODEL", "VSSM", "DOWNSAMPLE"): ({"v3"}, "the downsampling"),
        ("MODEL", "VSSM", "NORM_LAYER"): ({"ln", "ln2d"}, "the norm layer"),
        ("MODEL", "VSSM", "SSM_ACT_LAYER"): ({"silu"}, "the SS2D activation"),
        ("MODEL", "VSSM", "MLP_ACT_LAYER"): ({"gelu"}, "the MLP activation"),
        ("MODEL", "VSSM", "GMLP"): ({False}, "the gated MLP"),
        ("MODEL", "VSSM", "POSEMBED"): ({False}, "a position embedding"),
    }
    for path, (supported, what) in checks.items():
        value = _cfg(cfg, *path)
        if value is None:
            continue
        norm = value.lower() if isinstance(value, str) else value
        if norm not in supported:
            raise CheckpointError(f"{source} was trained with {'.'.join(path)} = {value!r} ({what}); mambapeft's "
                                  f"VMamba supports {', '.join(map(repr, sorted(supported, key=str)))}")


def config_from_state(state: dict, cfg: dict | None, source: str) -> VMambaConfig:
    """The architecture of a VMamba state dict; the training config (if any) adds the resolution and drop path."""
    first = "layers.0.blocks.0.op."
    needed = ("patch_embed.0.weight", "patch_embed.5.weight", first + "in_proj.weight", first + "A_logs",
              first + "x_proj_weight", first + "conv2d.weight", "layers.0.blocks.0.mlp.fc1.weight",
              "classifier.norm.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise CheckpointError(f"{source} is not a VMamba (VSSM) checkpoint in the 0229 layout: it lacks "
                              f"{', '.join(missing)}")
    check_training_config(cfg, source)
    stem = state["patch_embed.0.weight"]                                     # (d/2, C, k, k), stride k - 1
    d = state["patch_embed.5.weight"].shape[0]
    depths = _blocks_per_stage(state)
    if not depths or 0 in depths:
        raise CheckpointError(f"{source}: a stage without blocks ({depths})")
    E4, N = state[first + "A_logs"].shape
    E = E4 // 4
    E_in = state[first + "in_proj.weight"].shape[0]
    if E_in == 2 * E:
        raise CheckpointError(f"{source}: in_proj has 2E outputs (a z gate): a forward type without '_noz', which is "
                              f"not supported (MambaPEFT's VMamba is 'v05_noz')")
    if E_in != E or E4 % 4:
        raise CheckpointError(f"{source}: in_proj has {E_in} outputs and A_logs {E4} rows; expected E and 4 E")
    dims = [d * 2**i for i in range(len(depths))]
    ranks = []
    for i in range(len(depths)):
        rows = state.get(f"layers.{i}.blocks.0.op.x_proj_weight")
        if rows is None:
            raise CheckpointError(f"{source} lacks layers.{i}.blocks.0.op.x_proj_weight")
        ranks.append(rows.shape[1] - 2 * N)
    if ranks == [math.ceil(di / 16) for di in dims]:
        dt_rank = None
    elif len(set(ranks)) == 1:
        dt_rank = ranks[0]
    else:
        raise CheckpointError(f"{source}: dt ranks {ranks} per stage are neither 'auto' (ceil(d / 16)) nor one value")
    fc1 = state["layers.0.blocks.0.mlp.fc1.weight"].shape[0]
    named = next((n for n, a in VMAMBA_ARCHITECTURES.items()
                  if a["embed_dim"] == d and tuple(a["depths"]) == tuple(depths)
                  and a.get("ssm_ratio", 2.0) == E / d), None)
    drop_path = _cfg(cfg, "MODEL", "DROP_PATH_RATE")
    if not isinstance(drop_path, (int, float)):
        drop_path = VMAMBA_ARCHITECTURES[named].get("drop_path_rate", 0.0) if named else 0.0
    img_size = _cfg(cfg, "DATA", "IMG_SIZE")
    head = state.get(HEAD_PREFIX + "weight")
    try:
        return VMambaConfig(
            embed_dim=d, depths=tuple(depths), img_size=img_size if isinstance(img_size, int) else 224,
            patch_size=2 * (stem.shape[-1] - 1), in_chans=stem.shape[1],
            num_classes=head.shape[0] if head is not None else 1000, d_state=N, ssm_ratio=E / d, dt_rank=dt_rank,
            d_conv=state[first + "conv2d.weight"].shape[-1], mlp_ratio=fc1 / d, drop_path_rate=float(drop_path),
        )
    except ConfigError as err:
        raise CheckpointError(f"{source}: the weights describe no valid VMamba ({err})") from None


def _linear2d_as_linear(state: dict, expected: dict) -> dict:
    """Channel-first Linear2d weights (out, in, 1, 1) -> nn.Linear's (out, in)."""
    for key, shape in expected.items():
        t = state.get(key)
        if (t is not None and key.endswith(LINEAR2D_SUFFIXES) and len(shape) == 2 and t.dim() == 4
                and tuple(t.shape) == (*shape, 1, 1)):
            state[key] = t.reshape(shape)
    return state


def load_state_dict_strict(model: VMamba, state: dict, source: str, *, with_head: bool) -> None:
    """Copies `state` into `model` after checking every key and shape; without the head, the model keeps a fresh
    zero-initialised one."""
    expected = {k: v.shape for k, v in model.state_dict().items() if with_head or not k.startswith(HEAD_PREFIX)}
    state = _linear2d_as_linear(state, expected)
    check_tensors(expected, state, source, against="the VMamba architecture it describes", implied="expected")
    model.load_state_dict(state, strict=with_head, assign=True)
    if not with_head:
        head = model.classifier.head
        dtype = next(iter(state.values())).dtype if state else torch.float32
        model.classifier.head = nn.Linear(head.in_features, head.out_features, dtype=dtype)
        model.reset_head()


# ---------------------------------------------------------------- where the files are


def resolve_checkpoint(name_or_path, *, filename=None, revision=None, cache_dir=None, local_files_only=None) -> Path:
    """A local .pth file or folder as is; "tiny-vmamba" (built in); a hub id (our folder format or one .pth)."""
    local = local_checkpoint(name_or_path, BUILTIN, "scripts/pretrain_tiny_vmamba.py", filename)
    if local is not None:
        return local
    key = str(name_or_path).lower()
    name = str(name_or_path)
    released = RELEASED_FILES.get(key) or next((f for f in RELEASED_FILES.values() if f.startswith(key)), None)
    if released or key.startswith(("vssm", "vmamba-")):
        file = released or "the .pth of that model"
        url = f"{RELEASES}/{released}" if released else "https://github.com/MzeroMiko/VMamba/releases"
        raise CheckpointError(
            f"{name!r}: the official VMamba weights are GitHub release assets, not on the Hugging Face hub, so "
            f"mambapeft cannot fetch them. Download {file} ({url}) where there is a network and pass its local path, "
            f"e.g. load_vmamba('/path/to/{released or 'vssm_small_0229_ckpt_epoch_222.pth'}'). To build the "
            f"architecture with random weights instead, use "
            f"from_config('{key if key in VMAMBA_ARCHITECTURES else 'vmamba-small'}')."
        )
    if looks_local(name) or "/" not in name:
        raise CheckpointError(f"no file or folder {name}: pass a VMamba checkpoint (.pth or a save_vmamba folder), "
                              f"'tiny-vmamba', or a hub id of the form owner/name")
    found = hub_download(name, filename=filename, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, "*.pth"],
                         revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    return resolve_checkpoint(found, filename=filename) if found.is_dir() else found


# ---------------------------------------------------------------- the public loader and saver


def load_vmamba(name_or_path, *, num_classes: int | None = None, img_size: int | None = None,
                drop_path_rate: float | None = None, filename: str | None = None,
                dtype: torch.dtype | None = torch.float32, device=None, revision: str | None = None, cache_dir=None,
                local_files_only: bool | None = None) -> VMamba:
    """A pretrained VMamba: a released .pth (local: the official weights are GitHub release assets), one of our
    folders (`save_vmamba`), a hub id holding one of those, or "tiny-vmamba", the built-in one pretrained on digits
    (scripts/pretrain_tiny_vmamba.py).

    num_classes: the task's classes; a released checkpoint's ImageNet head is always replaced by a fresh
    zero-initialised one (for its 1000 classes if not given), one of our folders keeps its head unless num_classes
    differs. img_size: the resolution recorded in the config (VMamba runs at any size). drop_path_rate: stochastic
    depth for fine-tuning (default: the training config's, else the named architecture's: 0.3 S, 0.6 B).
    dtype: float32 by default; None keeps the checkpoint's.
    """
    file = resolve_checkpoint(name_or_path, filename=filename, revision=revision, cache_dir=cache_dir,
                              local_files_only=local_files_only)
    source = str(file)
    if file.is_dir():
        config, state = _read_folder(file)
        released = False
    else:
        state, cfg = read_vmamba_pickle(file)
        config = config_from_state(state, cfg, source)
        released = True
    head_rows = config.num_classes
    overrides = {"num_classes": num_classes, "img_size": img_size, "drop_path_rate": drop_path_rate}
    try:
        config = VMambaConfig(**{**config.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})
    except ConfigError as err:
        raise ConfigError(f"load_vmamba({name_or_path!r}): {err}") from None
    with_head = not released and config.num_classes == head_rows
    if released and any(k.startswith(HEAD_PREFIX) for k in state):
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
        warnings.warn(f"{source}: the checkpoint's {head_rows}-class head (classifier.head) is dropped, as MambaPEFT "
                      f"does; the model has a fresh zero-initialised head for {config.num_classes} classes",
                      stacklevel=2)
    elif not with_head:
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    with torch.device("meta"):
        model = VMamba(config)
    load_state_dict_strict(model, state, source, with_head=with_head)
    return ready(model, name_or_path, dtype=dtype, device=device)


def read_vmamba_shapes(name_or_path) -> VMamba:
    """A meta-device VMamba (shapes only) for a checkpoint: our folders are read from config.json alone."""
    file = resolve_checkpoint(name_or_path)
    if file.is_dir():
        config, _ = _read_folder(file, weights=False)
    else:
        state, cfg = read_vmamba_pickle(file, mmap=True)
        config = config_from_state(state, cfg, str(file))
    with torch.device("meta"):
        return VMamba(config)


def _read_folder(folder: Path, *, weights: bool = True) -> tuple[VMambaConfig, dict | None]:
    config = read_our_config(folder, FORMAT, VMambaConfig, "VMamba")
    return config, read_weights_file(folder) if weights else None


def save_vmamba(model: VMamba, folder) -> None:
    """config.json + model.safetensors, which `load_vmamba` reads back (PEFT parts must be merged or saved apart):
    `VMamba.save_pretrained`."""
    model.save_pretrained(folder)


def looks_like_vmamba(name_or_path) -> bool:
    """Whether a path or name is a VMamba checkpoint (for front ends that take several model families)."""
    key = str(name_or_path).lower()
    if key in BUILTIN or key in RELEASED_FILES or key.startswith("vssm"):
        return True
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        try:
            state, _ = read_vmamba_pickle(path, mmap=True)       # tensor data stays on disk
        except CheckpointError:
            return False
        return "layers.0.blocks.0.op.A_logs" in state
    return config_format(path) == FORMAT
