"""Our folder format for deep S4D models: config.json (an S4DConfig with a "format" marker) + model.safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import CheckpointError
from ..checkpoint import write_model_folder
from ..files import load_strict, read_our_config, read_weights_file, ready
from .modeling import DeepS4D, S4DConfig

FORMAT = "mambapeft-s4d"


def save_s4d(model: DeepS4D, folder) -> None:
    """config.json + model.safetensors, which `load_s4d` reads back (PEFT parts must be merged or saved apart)."""
    write_model_folder(model, folder, {"format": FORMAT, **model.config.to_dict()})


def load_s4d(name_or_path, *, dtype: torch.dtype | None = torch.float32, device=None) -> DeepS4D:
    """A deep S4D saved by `save_s4d`, every key and shape checked."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"no S4D folder {name_or_path}: pass a folder written by save_s4d")
    config = read_our_config(folder, FORMAT, S4DConfig, "S4D")
    state = read_weights_file(folder)
    with torch.device("meta"):
        model = DeepS4D(config)
    load_strict(model, state, str(folder), against="the S4D architecture it describes", implied="expected")
    return ready(model, name_or_path, dtype=dtype, device=device)


def read_s4d_shapes(name_or_path) -> DeepS4D:
    config = read_our_config(Path(name_or_path).expanduser(), FORMAT, S4DConfig, "S4D")
    with torch.device("meta"):
        return DeepS4D(config)
