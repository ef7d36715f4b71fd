"""Qwen3.5 checkpoints in the Hugging Face format, read strictly (every key and shape checked): a text model's
(config.json with model_type "qwen3_5_text", what transformers' Qwen3_5ForCausalLM and our save_pretrained write)
or a published one's (model_type "qwen3_5": the vision-language model, whose text_config we read and whose
model.language_model.* tensors are the text model's model.*; the vision tower model.visual.* and the
multi-token-prediction head mtp.* are left out, as transformers' Qwen3_5ForCausalLM leaves them)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen3_5TextConfig

from ...errors import ConfigError
from ..files import decode_floats, read_raw_config
from ..qwen3_next.loading import check_hybrid_config
from .modeling import Qwen3_5LM

MODEL_TYPES = ("qwen3_5_text", "qwen3_5")


def is_qwen3_5_config(raw: dict) -> bool:
    return raw.get("model_type") == "qwen3_5_text" or (raw.get("model_type") == "qwen3_5"
                                                       and isinstance(raw.get("text_config"), dict))


def read_qwen3_5_config(folder: Path) -> Qwen3_5TextConfig:
    raw, file = read_raw_config(Path(folder))
    if not is_qwen3_5_config(raw):
        raise ConfigError(f"{file} does not describe a Qwen3.5 model (model_type 'qwen3_5_text', or 'qwen3_5' with "
                          "a text_config)")
    text = raw
    if raw["model_type"] == "qwen3_5":
        text = {"tie_word_embeddings": raw.get("tie_word_embeddings", False), **raw["text_config"],
                "model_type": "qwen3_5_text"}
    try:
        config = Qwen3_5TextConfig.from_dict(decode_floats(text))
    except Exception as err:  # transformers' own validation
        raise ConfigError(f"{file} is not a valid Qwen3.5 config: {err}") from None
    check_hybrid_config(config, file)
    return config


def text_model_keys(state: dict) -> dict:
    """The text model's tensors under its own names: model.language_model.* -> model.*; model.visual.* and mtp.*
    left out."""
    out = {}
    for key, value in state.items():
        if key.startswith(("model.visual.", "mtp.")):
            continue
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        out[key] = value
    return out


def load_qwen3_5(folder, *, dtype: torch.dtype | str | None = torch.float32, device=None) -> Qwen3_5LM:
    from ..registry import get_family

    return get_family("qwen3_5").load(folder, dtype=dtype, device=device)
