"""Loading Mamba-1 checkpoints into our model, strictly, and saving them back in the Hugging Face format.

Formats read:
  * Hugging Face ("-hf", e.g. state-spaces/mamba-130m-hf): config.json with model_type "mamba" (or
    "falcon_mamba") and model.safetensors (sharded or not) or pytorch_model.bin;
  * original mamba_ssm (e.g. state-spaces/mamba-130m): config.json with d_model, n_layer, vocab_size, ssm_cfg, ...
    and pytorch_model.bin whose embedding is named backbone.embedding (not embeddings).
Mamba-2 folders (model_type "mamba2", or ssm_cfg {"layer": "Mamba2"}) are the mamba2 family's (model/mamba2/).
The weights load through the shared strict path (model/language.py, model/files.py): a missing, unexpected or
misshapen tensor is an error that names it, never a silently random weight.
"""

from __future__ import annotations

from pathlib import Path

from transformers import FalconMambaConfig, MambaConfig

from ...errors import ConfigError
from ..files import read_raw_config

# ---------------------------------------------------------------- config


def is_mamba1_config(raw: dict) -> bool:
    """A transformers Mamba / FalconMamba config, or a mamba_ssm one whose layers are not Mamba2 (variants this
    family does not support are then named by `read_config`)."""
    if raw.get("model_type") in ("mamba", "falcon_mamba"):
        return True
    ssm = raw.get("ssm_cfg") or {}
    return (raw.get("model_type") is None and "d_model" in raw and "n_layer" in raw
            and not (isinstance(ssm, dict) and ssm.get("layer") == "Mamba2"))


def read_config(folder: Path):
    """(transformers config, format) where format is "hf" or "mamba_ssm"; Mamba-1 only (see model/mamba2/)."""
    raw, file = read_raw_config(folder)
    model_type = raw.get("model_type")
    try:
        if model_type == "mamba":
            return MambaConfig.from_dict(raw), "hf"
        if model_type == "falcon_mamba":
            return FalconMambaConfig.from_dict(raw), "hf"
        if model_type is None and "d_model" in raw and "n_layer" in raw:
            return _config_from_mamba_ssm(raw, file), "mamba_ssm"
    except ConfigError:
        raise
    except Exception as err:  # transformers' own validation
        raise ConfigError(f"{file} is not a valid {model_type or 'mamba_ssm'} config: {err}") from None
    if model_type == "mamba2":
        raise ConfigError(f"{file} describes a Mamba-2 model: load it with mambapeft.from_pretrained, which "
                          f"returns a Mamba2LM")
    described = f"a {model_type!r} model" if model_type else "no known model (no model_type, no d_model/n_layer)"
    raise ConfigError(
        f"{file} describes {described}, not Mamba-1. mambapeft loads Hugging Face Mamba checkpoints "
        f"(model_type 'mamba' or 'falcon_mamba') and original mamba_ssm ones (d_model, n_layer, vocab_size, ssm_cfg)."
    )


def _config_from_mamba_ssm(raw: dict, file: Path) -> MambaConfig:
    """mamba_ssm's MambaConfig dict -> transformers MambaConfig (vocab padded as mamba_ssm pads it)."""
    ssm = raw.get("ssm_cfg") or {}
    if ssm.get("layer", "Mamba1") != "Mamba1":
        raise ConfigError(f"{file}: ssm_cfg.layer is {ssm['layer']!r}; mambapeft supports Mamba1 and Mamba2 layers "
                          f"only")
    if raw.get("d_intermediate", 0):
        raise ConfigError(f"{file}: d_intermediate > 0 (MLP layers between mixers) is not supported")
    if raw.get("attn_layer_idx"):
        raise ConfigError(f"{file}: attention layers (attn_layer_idx) are not supported, only pure Mamba-1")
    if not raw.get("rms_norm", True):
        raise ConfigError(f"{file}: rms_norm is false (LayerNorm); mambapeft supports RMSNorm Mamba models")
    unsupported = set(ssm) - {"layer", "d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias",
                              "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "use_fast_path"}
    if unsupported:
        raise ConfigError(f"{file}: ssm_cfg options {sorted(unsupported)} are not supported")
    vocab = raw["vocab_size"]
    multiple = raw.get("pad_vocab_size_multiple", 8)
    if vocab % multiple:
        vocab += multiple - vocab % multiple
    return MambaConfig(
        hidden_size=raw["d_model"],
        num_hidden_layers=raw["n_layer"],
        vocab_size=vocab,
        state_size=ssm.get("d_state", 16),
        conv_kernel=ssm.get("d_conv", 4),
        expand=ssm.get("expand", 2),
        time_step_rank=ssm.get("dt_rank", "auto"),
        use_conv_bias=ssm.get("conv_bias", True),
        use_bias=ssm.get("bias", False),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        layer_norm_epsilon=raw.get("norm_epsilon", 1e-5),
        tie_word_embeddings=raw.get("tie_embeddings", True),
    )


# ---------------------------------------------------------------- weights


def normalise_keys(state: dict) -> dict:
    """mamba_ssm's backbone.embedding -> backbone.embeddings; a bare MambaModel's keys get the backbone prefix."""
    if not any(k.startswith("backbone.") for k in state):
        state = {("backbone." + k if not k.startswith("lm_head.") else k): v for k, v in state.items()}
    return {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in state.items()}
