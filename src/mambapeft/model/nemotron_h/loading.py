"""Nemotron-H checkpoints in the Hugging Face format (config.json with model_type "nemotron_h"), read strictly.

The published layout (NVIDIA's own modeling code, and what transformers writes back) calls the model `backbone` and
keeps each expert as a module: backbone.layers.i.mixer.experts.e.up_proj.weight (I, d) and .down_proj.weight (d, I).
transformers' module tree (and ours) calls the model `model` and stacks the experts: model.layers.i.mixer.experts.
up_proj (E, I, d) and .down_proj (E, d, I). Reading takes either; writing writes the published layout.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import NemotronHConfig

from ...errors import ConfigError
from ..checkpoint import plain_state, write_weights
from ..files import decode_floats, read_raw_config
from .modeling import NemotronHLM, block_kind

MODEL_TYPE = "nemotron_h"
_EXPERT = re.compile(r"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")


def read_nemotron_h_config(folder: Path) -> NemotronHConfig:
    raw, file = read_raw_config(Path(folder))
    if raw.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"{file} does not describe a Nemotron-H model (model_type {MODEL_TYPE!r})")
    try:
        config = NemotronHConfig.from_dict(decode_floats(raw))
        for t in config.layers_block_type:
            block_kind(t)
    except Exception as err:  # transformers' own validation, or ours
        raise ConfigError(f"{file} is not a valid {MODEL_TYPE} config: {err}") from None
    return config


def from_published(state: dict) -> dict:
    """backbone. -> model.; per-expert weights stacked in expert order."""
    out, experts = {}, {}
    for key, value in state.items():
        key = "model." + key[len("backbone."):] if key.startswith("backbone.") else key
        found = _EXPERT.match(key)
        if found:
            experts.setdefault((found[1], found[3]), {})[int(found[2])] = value
        else:
            out[key] = value
    for (prefix, name), by_index in experts.items():
        out[f"{prefix}.{name}"] = torch.stack([by_index[e] for e in sorted(by_index)])
    return out


def to_published(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        key = "backbone." + key[len("model."):] if key.startswith("model.") else key
        if key.endswith((".mixer.experts.up_proj", ".mixer.experts.down_proj")):
            prefix, name = key.rsplit(".", 1)
            for e, matrix in enumerate(value):
                out[f"{prefix}.{e}.{name}.weight"] = matrix
        else:
            out[key] = value
    return out


def load_state_dict_strict(model: NemotronHLM, state: dict, source: str) -> None:
    from ..registry import get_family

    get_family("nemotron_h").load_state(model, state, source)


def build_nemotron_h(config: NemotronHConfig, *, device=None, dtype=None, seed: int | None = None) -> NemotronHLM:
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    return NemotronHLM(config, device=device, dtype=dtype)


def load_nemotron_h(folder, *, dtype: torch.dtype | str | None = torch.float32, device=None) -> NemotronHLM:
    from ..registry import get_family

    return get_family("nemotron_h").load(folder, dtype=dtype, device=device)


def save_nemotron_h(model: NemotronHLM, folder) -> None:
    state = plain_state(model)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    write_weights(to_published(state), folder)
