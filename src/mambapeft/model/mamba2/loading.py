"""Reading Mamba-2 checkpoint configs; the weights load through loading.py's shared, strict path.

Formats:
  * Hugging Face: config.json with model_type "mamba2" (transformers' Mamba2Config) and model.safetensors (sharded
    or not) or pytorch_model.bin. Saving writes this format (`Mamba2LM.save_pretrained`), which transformers'
    Mamba2ForCausalLM loads.
  * original mamba_ssm (state-spaces/mamba2-130m ... mamba2-2.7b): config.json with d_model, n_layer, vocab_size,
    ssm_cfg {"layer": "Mamba2", ...}, pad_vocab_size_multiple, tie_embeddings; pytorch_model.bin whose embedding
    is backbone.embedding (renamed by loading.py). The vocabulary is padded as mamba_ssm pads it.
`mambapeft.from_pretrained` picks this reader when `is_mamba2_folder` says so; every tensor is then checked against
the config (loading.check_tensors), so a missing, unexpected or misshapen tensor is an error that names it.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import Mamba2Config

from ...errors import ConfigError
from ..checkpoint import CONFIG_FILE
from ..files import decode_floats, read_raw_config

# mamba_ssm Mamba2 options we read, and those that only shape the random initialisation or the kernels
_SSM_OPTIONS = {"layer", "d_state", "d_conv", "expand", "headdim", "ngroups", "bias", "conv_bias", "chunk_size",
                "dt_limit", "D_has_hdim", "rmsnorm", "norm_before_gate", "d_ssm"}
_SSM_IGNORED = {"dt_min", "dt_max", "dt_init_floor", "A_init_range", "conv_init", "use_mem_eff_path"}
_MAMBA_SSM_EPS = 1e-5      # mamba_ssm's Mamba2 builds its gated norm with this eps, whatever norm_epsilon says


def is_mamba2_config(raw: dict) -> bool:
    """A transformers Mamba-2 config, or a mamba_ssm one whose layers are Mamba2."""
    if raw.get("model_type") == "mamba2":
        return True
    ssm = raw.get("ssm_cfg")
    return raw.get("model_type") is None and isinstance(ssm, dict) and ssm.get("layer") == "Mamba2"


def is_mamba2_folder(folder: Path) -> bool:
    """Whether a checkpoint folder holds a Mamba-2 model (False where config.json is missing or unreadable:
    the Mamba-1 reader then reports the problem)."""
    try:
        raw = json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and is_mamba2_config(raw)


def read_mamba2_config(folder: Path) -> tuple[Mamba2Config, str]:
    """(Mamba2Config, format) where format is "hf" or "mamba_ssm"."""
    raw, file = read_raw_config(folder)
    if not is_mamba2_config(raw):
        raise ConfigError(f"{file} does not describe a Mamba-2 model (model_type 'mamba2' or ssm_cfg.layer 'Mamba2')")
    try:
        if raw.get("model_type") == "mamba2":
            config, fmt = Mamba2Config.from_dict(decode_floats(raw)), "hf"
        else:
            config, fmt = _config_from_mamba_ssm(raw, file), "mamba_ssm"
    except ConfigError:
        raise
    except Exception as err:  # transformers' own validation, or a field of the wrong type
        raise ConfigError(f"{file} is not a valid Mamba-2 config: {err}") from None
    if config.hidden_act != "silu":
        raise ConfigError(f"{file}: hidden_act {config.hidden_act!r} is not supported (Mamba-2 uses silu)")
    if config.num_heads % config.n_groups:
        raise ConfigError(f"{file}: num_heads {config.num_heads} is not a multiple of n_groups {config.n_groups}")
    return config, fmt


def _config_from_mamba_ssm(raw: dict, file: Path) -> Mamba2Config:
    """mamba_ssm's MambaConfig dict with Mamba2 layers -> transformers Mamba2Config (vocab padded as mamba_ssm does)."""
    ssm = dict(raw.get("ssm_cfg") or {})
    if raw.get("d_intermediate", 0):
        raise ConfigError(f"{file}: d_intermediate > 0 (MLP layers between mixers) is not supported")
    if raw.get("attn_layer_idx"):
        raise ConfigError(f"{file}: attention layers (attn_layer_idx) are not supported, only pure Mamba-2")
    if not raw.get("rms_norm", True):
        raise ConfigError(f"{file}: rms_norm is false (LayerNorm); mambapeft supports RMSNorm Mamba models")
    unsupported = set(ssm) - _SSM_OPTIONS - _SSM_IGNORED
    if unsupported:
        raise ConfigError(f"{file}: ssm_cfg options {sorted(unsupported)} are not supported")
    if ssm.get("D_has_hdim", False):
        raise ConfigError(f"{file}: ssm_cfg.D_has_hdim (a D per channel) is not supported; D is one value per head")
    if not ssm.get("rmsnorm", True) or ssm.get("norm_before_gate", False):
        raise ConfigError(f"{file}: only the gated RMSNorm with norm_before_gate=false (mamba_ssm's default) is "
                          f"supported")
    d_model, expand, head_dim = raw["d_model"], ssm.get("expand", 2), ssm.get("headdim", 64)
    if ssm.get("d_ssm") not in (None, expand * d_model):
        raise ConfigError(f"{file}: ssm_cfg.d_ssm {ssm['d_ssm']} (a gated MLP beside the SSM) is not supported")
    if (expand * d_model) % head_dim:
        raise ConfigError(f"{file}: expand x d_model = {expand * d_model} is not a multiple of headdim {head_dim}")
    eps = raw.get("norm_epsilon", _MAMBA_SSM_EPS)
    if eps != _MAMBA_SSM_EPS:
        raise ConfigError(f"{file}: norm_epsilon {eps} differs from the {_MAMBA_SSM_EPS} mamba_ssm's Mamba2 uses in "
                          f"its gated norm; one eps for both norms is all a Mamba2Config can hold")
    vocab = raw["vocab_size"]
    multiple = raw.get("pad_vocab_size_multiple", 8)
    if vocab % multiple:
        vocab += multiple - vocab % multiple
    return Mamba2Config(
        hidden_size=d_model,
        num_hidden_layers=raw["n_layer"],
        vocab_size=vocab,
        num_heads=expand * d_model // head_dim,
        head_dim=head_dim,
        n_groups=ssm.get("ngroups", 1),
        state_size=ssm.get("d_state", 128),
        conv_kernel=ssm.get("d_conv", 4),
        expand=expand,
        use_bias=ssm.get("bias", False),
        use_conv_bias=ssm.get("conv_bias", True),
        chunk_size=ssm.get("chunk_size", 256),
        time_step_limit=tuple(ssm.get("dt_limit", (0.0, float("inf")))),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        layer_norm_epsilon=eps,
        tie_word_embeddings=raw.get("tie_embeddings", True),
        bos_token_id=0, eos_token_id=0, pad_token_id=0,    # GPT-NeoX's <|endoftext|>, as the Mamba-1 configs say
    )

