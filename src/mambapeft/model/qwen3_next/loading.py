"""Qwen3-Next checkpoints in the Hugging Face format (config.json with model_type "qwen3_next"), read strictly: every
key and shape checked. Our names are transformers' (the experts stacked, as transformers' own save_pretrained writes
them); the published checkpoints' multi-token-prediction head (mtp.*), which transformers skips too, is left out."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen3NextConfig

from ...errors import ConfigError
from ..files import decode_floats, read_raw_config
from ..granitemoehybrid.modeling import layer_kind
from .modeling import Qwen3NextLM

MODEL_TYPE = "qwen3_next"


def check_hybrid_config(config, file) -> None:
    """What our glue refuses of a Qwen3-Next / Qwen3.5 config, as a ConfigError that names the file."""
    try:
        for t in config.layer_types:
            layer_kind(t)
    except ValueError as err:
        raise ConfigError(f"{file}: {err}") from None
    if config.hidden_act != "silu":
        raise ConfigError(f"{file}: hidden_act {config.hidden_act!r} is not supported (the Qwen hybrids use silu)")
    if getattr(config, "output_router_logits", False):
        raise ConfigError(f"{file}: output_router_logits (the router's load-balancing loss) is not supported")


def read_qwen3_next_config(folder: Path) -> Qwen3NextConfig:
    raw, file = read_raw_config(Path(folder))
    if raw.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"{file} does not describe a Qwen3-Next model (model_type {MODEL_TYPE!r})")
    try:
        config = Qwen3NextConfig.from_dict(decode_floats(raw))
    except Exception as err:  # transformers' own validation
        raise ConfigError(f"{file} is not a valid {MODEL_TYPE} config: {err}") from None
    check_hybrid_config(config, file)
    return config


def without_mtp(state: dict) -> dict:
    """The state without the multi-token-prediction head (mtp.*): transformers' causal LM skips it on loading."""
    return {k: v for k, v in state.items() if not k.startswith("mtp.")}


def load_qwen3_next(folder, *, dtype: torch.dtype | str | None = torch.float32, device=None) -> Qwen3NextLM:
    from ..registry import get_family

    return get_family(MODEL_TYPE).load(folder, dtype=dtype, device=device)
