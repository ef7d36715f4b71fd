"""Granite 4.0-H checkpoints: the Hugging Face format (config.json with model_type "granitemoehybrid" and
model.safetensors, sharded or not, or pytorch_model.bin), read strictly: every key and shape is checked against the
config, a missing, unexpected or misshapen tensor is an error that names it. Saving writes the same format
(`GraniteHybridLM.save_pretrained`), which transformers' GraniteMoeHybridForCausalLM loads.

The published checkpoints (and transformers' save_pretrained) name the MoE tensors as Granite's original code did:
block_sparse_moe.input_linear.weight, .output_linear.weight and .router.layer.weight for what transformers' module
tree (and ours) calls experts.gate_up_proj, experts.down_proj and router.weight, the same tensors renamed. Reading
takes either; writing writes the published names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GraniteMoeHybridConfig

from ...errors import ConfigError
from ..checkpoint import plain_state, write_weights
from ..files import decode_floats, read_raw_config
from .modeling import GraniteHybridLM, layer_kind

MODEL_TYPE = "granitemoehybrid"


def is_granite_hybrid_config(raw: dict) -> bool:
    return raw.get("model_type") == MODEL_TYPE


def read_granite_hybrid_config(folder: Path) -> GraniteMoeHybridConfig:
    raw, file = read_raw_config(Path(folder))
    if not is_granite_hybrid_config(raw):
        raise ConfigError(f"{file} does not describe a Granite 4.0-H model (model_type {MODEL_TYPE!r})")
    try:
        config = GraniteMoeHybridConfig.from_dict(decode_floats(raw))
    except Exception as err:  # transformers' own validation, or a field of the wrong type
        raise ConfigError(f"{file} is not a valid {MODEL_TYPE} config: {err}") from None
    try:
        for t in config.layer_types:
            layer_kind(t)
    except ValueError as err:
        raise ConfigError(f"{file}: {err}") from None
    if config.hidden_act != "silu":
        raise ConfigError(f"{file}: hidden_act {config.hidden_act!r} is not supported (Granite 4.0-H uses silu)")
    return config


# the published name of a MoE tensor -> ours (transformers' module names)
PUBLISHED_NAMES = {"block_sparse_moe.input_linear.weight": "block_sparse_moe.experts.gate_up_proj",
                   "block_sparse_moe.output_linear.weight": "block_sparse_moe.experts.down_proj",
                   "block_sparse_moe.router.layer.weight": "block_sparse_moe.router.weight"}


def renamed(state: dict, names: dict[str, str]) -> dict:
    """`state` with every key ending in a key of `names` ending in its value instead."""
    out = {}
    for key, value in state.items():
        for old, new in names.items():
            if key.endswith("." + old):
                key = key[: -len(old)] + new
                break
        out[key] = value
    return out


def load_state_dict_strict(model: GraniteHybridLM, state: dict, source: str) -> None:
    """Copies `state` (published or transformers' names) into `model` after checking every key and shape; ties the
    head again if tied."""
    from ..registry import get_family

    get_family("granitemoehybrid").load_state(model, state, source)


def build_granite_hybrid(config: GraniteMoeHybridConfig, *, device=None, dtype=None,
                         seed: int | None = None) -> GraniteHybridLM:
    """Random weights (from_config); device="meta" allocates nothing."""
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    return GraniteHybridLM(config, device=device, dtype=dtype)


def load_granite_hybrid(folder, *, dtype: torch.dtype | str | None = torch.float32, device=None) -> GraniteHybridLM:
    """A Granite 4.0-H checkpoint folder (Hugging Face format) as a GraniteHybridLM, every tensor checked."""
    from ..registry import get_family

    return get_family("granitemoehybrid").load(folder, dtype=dtype, device=device)


def save_granite_hybrid(model: GraniteHybridLM, folder) -> None:
    """config.json + model.safetensors with the published tensor names (a tied head written once); refused while
    PEFT parts are attached (save the adapter, or merge first)."""
    state = plain_state(model)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    write_weights(renamed(state, {ours: published for published, ours in PUBLISHED_NAMES.items()}), folder)
