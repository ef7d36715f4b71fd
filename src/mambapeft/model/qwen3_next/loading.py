"""Qwen3-Next checkpoints in the Hugging Face format (config.json with model_type "qwen3_next"), read strictly: every
key and shape checked.

The published layout (Qwen/Qwen3-Next-*, and what transformers' save_pretrained writes back) keeps each expert as a
module: model.layers.i.mlp.experts.e.gate_proj.weight and .up_proj.weight (I, d), .down_proj.weight (d, I).
transformers' module tree (and ours) stacks them: experts.gate_up_proj (E, 2I, d) with each expert's gate rows
before its up rows, and experts.down_proj (E, d, I). Reading takes either; writing writes the published layout. The
published checkpoints' multi-token-prediction head (mtp.*), which transformers' causal LM skips too, is left out."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import Qwen3NextConfig

from ...errors import ConfigError
from ..checkpoint import plain_state, write_weights
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


_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def from_published(state: dict) -> dict:
    """Per-expert weights stacked in expert order (gate and up joined); the MTP head (mtp.*) left out."""
    out, experts = {}, {}
    for key, value in state.items():
        if key.startswith("mtp."):
            continue
        found = _EXPERT.match(key)
        if found:
            experts.setdefault(found[1], {}).setdefault(int(found[2]), {})[found[3]] = value
        else:
            out[key] = value
    for prefix, by_index in experts.items():
        order = sorted(by_index)
        try:
            out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([by_index[e]["gate_proj"], by_index[e]["up_proj"]])
                                                         for e in order])
            out[f"{prefix}.down_proj"] = torch.stack([by_index[e]["down_proj"] for e in order])
        except KeyError as err:
            raise ConfigError(f"expert {prefix} lacks its {err.args[0]} weight") from None
    return out


def to_published(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if key.endswith(".mlp.experts.gate_up_proj"):
            prefix = key[: -len(".gate_up_proj")]
            for e, matrix in enumerate(value):                       # (2I, d): gate rows, then up rows
                gate, up = matrix.chunk(2)
                out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate, up
        elif key.endswith(".mlp.experts.down_proj"):
            prefix = key[: -len(".down_proj")]
            for e, matrix in enumerate(value):
                out[f"{prefix}.{e}.down_proj.weight"] = matrix
        else:
            out[key] = value
    return out


def load_qwen3_next(folder, *, dtype: torch.dtype | str | None = torch.float32, device=None) -> Qwen3NextLM:
    from ..registry import get_family

    return get_family(MODEL_TYPE).load(folder, dtype=dtype, device=device)


def save_qwen3_next(model: Qwen3NextLM, folder) -> None:
    """config.json + model.safetensors in the published layout (a tied head written once); refused while PEFT parts
    are attached (save the adapter, or merge first)."""
    state = plain_state(model)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    write_weights(to_published(state), folder)
