"""Loading and saving deep S4D models: our own folder format, strictly checked.

    save_s4d(model, folder)          config.json ({"format": "mambapeft-s4d", ...the S4DConfig}) + model.safetensors
    load_s4d(name_or_path)           such a folder; "tiny-s4d" (built in, scripts/pretrain_tiny_s4d.py); or a named
                                     architecture ("s4d-pixels", ...), which has random weights (seeded by `seed`)
    read_s4d_shapes(name_or_path)    the same on the meta device: config.json only, no weights read
    looks_like_s4d(name_or_path)     whether a name or path is one of those

Every key and shape of the weights is checked against the architecture config.json describes; a folder that is not
ours, a corrupt or truncated file, a missing or extra tensor is a CheckpointError naming it. There are no released
S4D checkpoints to read: the SDT authors' S4 code trains its models from scratch.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ...assets import HERE as ASSETS
from ...errors import CheckpointError, ConfigError, did_you_mean
from ..checkpoint import CONFIG_FILE, WEIGHTS_FILE, write_model_folder
from ..files import config_format, load_strict, read_our_config, read_weights_file, ready
from .modeling import S4D_ARCHITECTURES, DeepS4D, S4DConfig, build_s4d

FORMAT = "mambapeft-s4d"
# built into the package (scripts/pretrain_tiny_s4d.py writes it): s4d-pixels pretrained on the digits 0-4
BUILTIN = {"tiny-s4d": ASSETS / "tiny-s4d"}


def save_s4d(model: DeepS4D, folder) -> None:
    """config.json + model.safetensors, which `load_s4d` reads back (PEFT parts must be merged or saved apart)."""
    if not isinstance(model, DeepS4D):
        raise ConfigError(f"save_s4d saves S4D models, not {type(model).__name__}")
    write_model_folder(model, folder, {"format": FORMAT, **model.config.to_dict()})


def resolve_s4d(name_or_path) -> Path | None:
    """The folder of a built-in name or a path; None for a named architecture. Anything else is an error."""
    key = str(name_or_path).lower()
    if key in BUILTIN:
        folder = BUILTIN[key]
        if not (folder / CONFIG_FILE).is_file():
            raise CheckpointError(f"the built-in {name_or_path} is missing from this install ({folder}); build it "
                                  f"with scripts/pretrain_tiny_s4d.py")
        return folder
    if key in S4D_ARCHITECTURES:
        return None
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; an S4D checkpoint is a folder holding {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE} (save_s4d)")
    known = [*BUILTIN, *S4D_ARCHITECTURES]
    raise CheckpointError(f"no S4D model {name_or_path!r}{did_you_mean(key, known)}: pass a folder saved by "
                          f"save_s4d, a built-in model ({', '.join(BUILTIN)}) or an architecture "
                          f"({', '.join(S4D_ARCHITECTURES)}, random weights)")


def read_s4d_config(folder: Path) -> S4DConfig:
    """The S4DConfig of one of our folders (CheckpointError when it is not one)."""
    if not (Path(folder) / CONFIG_FILE).is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in {folder}: not an S4D folder (save_s4d writes {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE})")
    return read_our_config(Path(folder), FORMAT, S4DConfig, "S4D")


def load_s4d(name_or_path, *, num_classes: int | None = None, dtype: torch.dtype | None = torch.float32,
             device=None, seed: int | None = None) -> DeepS4D:
    """A deep S4D: one of our folders (`save_s4d`), "tiny-s4d" (built in: s4d-pixels pretrained on the 8x8 digits 0-4
    read row by row) or a named architecture ("s4d-pixels", ...: random weights, seeded by `seed`).

    num_classes: the task's classes; a classifier whose decoder has another count gets a fresh decoder (nn.Linear's
    initialisation, from torch's global generator), one with the same count keeps its own. dtype: float32 by
    default; None keeps the checkpoint's."""
    folder = resolve_s4d(name_or_path)
    if folder is None:
        model = build_s4d(str(name_or_path), seed=seed, device=device, dtype=dtype,
                          **({"num_classes": num_classes} if num_classes is not None else {}))
        return ready(model, name_or_path)
    config = read_s4d_config(folder)
    state = read_weights_file(folder)
    with torch.device("meta"):
        model = DeepS4D(config)
    load_strict(model, state, str(folder), against=f"the S4D architecture its {CONFIG_FILE} describes")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{folder}: tensor {bad[0]} holds NaN or infinite values")
    if num_classes is not None and config.form == "classifier" and num_classes != config.num_classes:
        model.reset_head(num_classes)
    elif num_classes is not None and config.form != "classifier":
        raise ConfigError(f"load_s4d({name_or_path!r}, num_classes={num_classes}): a {config.form!r} S4D has no "
                          f"classes (no decoder)")
    return ready(model, name_or_path, dtype=dtype, device=device)


def read_s4d_shapes(name_or_path) -> DeepS4D:
    """A meta-device DeepS4D (shapes only) for anything `load_s4d` takes: config.json alone is read."""
    folder = resolve_s4d(name_or_path)
    if folder is None:
        return build_s4d(str(name_or_path), device="meta")
    with torch.device("meta"):
        return DeepS4D(read_s4d_config(folder))


def looks_like_s4d(name_or_path) -> bool:
    """Whether a name or path is an S4D model: a built-in S4D, a named S4D architecture or a save_s4d folder."""
    key = str(name_or_path).lower()
    return key in BUILTIN or key in S4D_ARCHITECTURES or config_format(name_or_path) == FORMAT
