"""Bamba checkpoints in the Hugging Face format (config.json with model_type "bamba"), read strictly: every key and
shape checked (model/granitemoehybrid/loading.py's loader; Bamba's names need no renaming)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BambaConfig

from ...errors import ConfigError
from ..files import decode_floats, read_raw_config
from .modeling import BambaLM


def read_bamba_config(folder: Path) -> BambaConfig:
    raw, file = read_raw_config(Path(folder))
    if raw.get("model_type") != "bamba":
        raise ConfigError(f"{file} does not describe a Bamba model (model_type 'bamba')")
    try:
        return BambaConfig.from_dict(decode_floats(raw))
    except Exception as err:  # transformers' own validation
        raise ConfigError(f"{file} is not a valid bamba config: {err}") from None


def load_bamba(folder, *, dtype: torch.dtype | str | None = torch.float32, device=None) -> BambaLM:
    from ..registry import get_family

    return get_family("bamba").load(folder, dtype=dtype, device=device)
