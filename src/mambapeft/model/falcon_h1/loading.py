"""Falcon-H1 checkpoints in the Hugging Face format (config.json with model_type "falcon_h1"), read strictly: every
key and shape checked (the hybrid loader of model/language.py; Falcon-H1's names need no renaming, and its µP vector
is a non-persistent buffer rebuilt from the config)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import FalconH1Config

from ...errors import ConfigError
from ..files import decode_floats, read_raw_config
from .modeling import FalconH1LM

MODEL_TYPE = "falcon_h1"


def read_falcon_h1_config(folder: Path) -> FalconH1Config:
    raw, file = read_raw_config(Path(folder))
    if raw.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"{file} does not describe a Falcon-H1 model (model_type {MODEL_TYPE!r})")
    try:
        config = FalconH1Config.from_dict(decode_floats(raw))
    except Exception as err:  # transformers' own validation
        raise ConfigError(f"{file} is not a valid {MODEL_TYPE} config: {err}") from None
    if config.hidden_act != "silu":
        raise ConfigError(f"{file}: hidden_act {config.hidden_act!r} is not supported (Falcon-H1 uses silu)")
    if len(config.ssm_multipliers) != 5 or len(config.mlp_multipliers) != 2:
        raise ConfigError(f"{file}: ssm_multipliers needs 5 values (z, x, B, C, dt) and mlp_multipliers 2 (gate, "
                          f"down), got {config.ssm_multipliers} and {config.mlp_multipliers}")
    return config


def load_state_dict_strict(model: FalconH1LM, state: dict, source: str) -> None:
    from ..registry import get_family

    get_family(MODEL_TYPE).load_state(model, state, source)


def build_falcon_h1(config: FalconH1Config, *, device=None, dtype=None, seed: int | None = None) -> FalconH1LM:
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    return FalconH1LM(config, device=device, dtype=dtype)


def load_falcon_h1(folder, *, dtype: torch.dtype | str | None = torch.float32, device=None) -> FalconH1LM:
    """A Falcon-H1 checkpoint folder (Hugging Face format) as a FalconH1LM, every tensor checked."""
    from ..registry import get_family

    return get_family(MODEL_TYPE).load(folder, dtype=dtype, device=device)
