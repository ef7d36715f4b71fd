"""Jamba checkpoints in the Hugging Face format (config.json with model_type "jamba"), read strictly.

The published layout (AI21's checkpoints, and what transformers' save_pretrained writes back) keeps each expert's
weights as modules of its own: model.layers.i.feed_forward.experts.e.{gate_proj, up_proj}.weight (I, d) and
.down_proj.weight (d, I). transformers' module tree (and ours) stacks them: feed_forward.experts.gate_up_proj
(E, 2I, d), gate rows first, and .down_proj (E, d, I). Reading takes either; writing writes the published layout.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import JambaConfig

from ...errors import ConfigError
from ..checkpoint import plain_state, write_weights
from ..files import decode_floats, read_raw_config
from .modeling import JambaLM

MODEL_TYPE = "jamba"
_EXPERT = re.compile(r"^(.*\.feed_forward\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def read_jamba_config(folder: Path) -> JambaConfig:
    raw, file = read_raw_config(Path(folder))
    if raw.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"{file} does not describe a Jamba model (model_type {MODEL_TYPE!r})")
    try:
        config = JambaConfig.from_dict(decode_floats(raw))
    except Exception as err:  # transformers' own validation
        raise ConfigError(f"{file} is not a valid {MODEL_TYPE} config: {err}") from None
    if config.hidden_act != "silu":
        raise ConfigError(f"{file}: hidden_act {config.hidden_act!r} is not supported (Jamba uses silu)")
    return config


def from_published(state: dict) -> dict:
    """Per-expert weights stacked in expert order: gate and up rows into gate_up_proj, down into down_proj."""
    out, experts = {}, {}
    for key, value in state.items():
        found = _EXPERT.match(key)
        if found:
            experts.setdefault(found[1], {}).setdefault(int(found[2]), {})[found[3]] = value
        else:
            out[key] = value
    for prefix, by_index in experts.items():
        order = sorted(by_index)
        try:
            out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([by_index[e]["gate_proj"], by_index[e]["up_proj"]])
                                                         for e in order])                   # (E, 2I, d)
            out[f"{prefix}.down_proj"] = torch.stack([by_index[e]["down_proj"] for e in order])  # (E, d, I)
        except KeyError as err:
            raise ConfigError(f"{prefix}: an expert lacks its {err.args[0]} weight") from None
    return out


def to_published(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if key.endswith(".feed_forward.experts.gate_up_proj"):
            prefix = key[: -len(".gate_up_proj")]
            for e, matrix in enumerate(value):                                             # (2I, d)
                gate, up = matrix.chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate, up
        elif key.endswith(".feed_forward.experts.down_proj"):
            prefix = key[: -len(".down_proj")]
            for e, matrix in enumerate(value):
                out[f"{prefix}.{e}.down_proj.weight"] = matrix
        else:
            out[key] = value
    return out


def load_state_dict_strict(model: JambaLM, state: dict, source: str) -> None:
    from ..registry import get_family

    get_family(MODEL_TYPE).load_state(model, state, source)


def build_jamba(config: JambaConfig, *, device=None, dtype=None, seed: int | None = None) -> JambaLM:
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    return JambaLM(config, device=device, dtype=dtype)


def load_jamba(folder, *, dtype: torch.dtype | str | None = torch.float32, device=None) -> JambaLM:
    """A Jamba checkpoint folder (Hugging Face format) as a JambaLM, every tensor checked."""
    from ..registry import get_family

    return get_family(MODEL_TYPE).load(folder, dtype=dtype, device=device)


def save_jamba(model: JambaLM, folder) -> None:
    """config.json + model.safetensors in the published layout (a tied head written once)."""
    state = plain_state(model)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    write_weights(to_published(state), folder)
