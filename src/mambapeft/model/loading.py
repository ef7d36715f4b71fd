"""Loading Mamba-1 checkpoints into our model, strictly, and saving them back in the Hugging Face format.

Formats read:
  * Hugging Face ("-hf", e.g. state-spaces/mamba-130m-hf): config.json with model_type "mamba" (or
    "falcon_mamba") and model.safetensors (sharded or not) or pytorch_model.bin;
  * original mamba_ssm (e.g. state-spaces/mamba-130m): config.json with d_model, n_layer, vocab_size, ssm_cfg, ...
    and pytorch_model.bin whose embedding is named backbone.embedding (not embeddings).
Mamba-2 folders (model_type "mamba2", or ssm_cfg {"layer": "Mamba2"}) load through the same `from_pretrained`
into `Mamba2LM`; their configs are read by mamba2_loading.py, everything else here is shared.
Every key and shape is checked: a missing, unexpected or misshapen tensor is an error that names it, never a
silently random weight. Pickled .bin files are read with torch.load(weights_only=True): tensors only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import FalconMambaConfig, MambaConfig

from ..errors import CheckpointError, ConfigError, did_you_mean
from .architectures import ARCHITECTURES, HUB_IDS, MAMBA2_ARCHITECTURES
from .checkpoint import CONFIG_FILE, WEIGHTS_FILE, write_hf_checkpoint
from .lm import MambaLM

SAFETENSORS_FILE = WEIGHTS_FILE
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]


# ---------------------------------------------------------------- where the files are


def resolve_folder(name_or_path: str | os.PathLike, *, revision: str | None = None, cache_dir=None,
                   local_files_only: bool | None = None) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id, downloaded (or found in the cache).

    A short architecture name ("mamba-130m") stands for its official hub id ("state-spaces/mamba-130m-hf").
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        from ..outputs import check_complete

        check_complete(path, "model folder")
        return path
    from ..assets import BUILTIN_LANGUAGE_MODELS

    if str(name_or_path) in BUILTIN_LANGUAGE_MODELS:    # the packaged tiny Mamba and Mamba-2 (mambapeft/assets)
        return BUILTIN_LANGUAGE_MODELS[str(name_or_path)]
    name = str(name_or_path)
    if path.exists():
        raise CheckpointError(f"{name} is a file; pass the folder that holds config.json and the weights")
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")
    if looks_local:
        raise CheckpointError(f"no folder {name}: pass an existing checkpoint folder or a Hugging Face hub id")
    name = HUB_IDS.get(name.lower(), name)
    if "/" not in name:
        known = [*ARCHITECTURES, *MAMBA2_ARCHITECTURES]
        raise CheckpointError(
            f"{name!r} is not a folder, a known architecture{did_you_mean(name.lower(), known)} or a hub id "
            f"of the form owner/name; known architectures: {', '.join(known)}"
        )

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS,
                                      local_files_only=bool(local_files_only)))
    except HFValidationError:
        raise CheckpointError(f"{name!r} is neither a local folder nor a valid Hugging Face hub id") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"cannot fetch {name!r} from the Hugging Face hub: it needs the network (none reachable, or "
            f"HF_HUB_OFFLINE is set) and it is not in the local cache. Download it where there is a network "
            f"(`hf download {name}`), or pass the path of a local folder holding config.json and the weights."
        ) from None
    except GatedRepoError:
        raise CheckpointError(f"{name!r} is gated on the hub: accept its terms and log in (`hf auth login`)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{name!r} has no revision {revision!r} on the hub") from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"no repository {name!r} on the Hugging Face hub (and no local folder of that name)") from None


# ---------------------------------------------------------------- config


def read_raw_config(folder: Path) -> tuple[dict, Path]:
    """The parsed config.json of a checkpoint folder and its path; CheckpointError if missing or not a JSON object."""
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(
            f"no {CONFIG_FILE} in {folder}: a Mamba checkpoint folder holds config.json plus model.safetensors "
            f"(Hugging Face format) or pytorch_model.bin (mamba_ssm format)"
        )
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); the file is corrupt or truncated") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} must hold a JSON object, it holds a {type(raw).__name__}")
    return raw, file


def read_config(folder: Path):
    """(transformers config, format) where format is "hf" or "mamba_ssm"; Mamba-1 only (see mamba2_loading.py)."""
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


def _load_safetensors(file: Path) -> dict:
    try:
        return load_file(str(file))
    except Exception as err:
        raise CheckpointError(f"{file} is corrupt or truncated ({err}); download or save it again") from None


PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def local_vision_checkpoint(name_or_path, builtin: dict[str, Path], script: str, filename=None) -> Path | None:
    """What a vision family's checkpoint name means on this machine, or None (then it may be a hub id): a built-in
    name (its folder, which `script` builds), a file, a folder in our format, or a folder with exactly one pickle."""
    key = str(name_or_path).lower()
    if key in builtin:
        folder = builtin[key]
        if not (folder / CONFIG_FILE).is_file():
            raise CheckpointError(f"the built-in {name_or_path} is missing from this install ({folder}); "
                                  f"build it with {script}")
        return folder
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    if (path / CONFIG_FILE).is_file():
        return path
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if filename:
        pickles = [p for p in pickles if p.name == filename]
    if len(pickles) != 1:
        found = ", ".join(p.name for p in pickles) or "none"
        raise CheckpointError(f"{path} must hold {CONFIG_FILE} + {WEIGHTS_FILE} (our format) or exactly one .pth "
                              f"checkpoint (found: {found}); pass the file itself")
    return pickles[0]


def pickle_refusal(file: Path, err: Exception, allowed: str = "tensors and plain data") -> CheckpointError:
    """Why torch's restricted unpickler refused `file`, without passing on its advice to load the file unrestricted
    (which would run whatever code the pickle holds)."""
    import re

    text = str(err)
    asked = re.search(r"unsupported GLOBAL (\S+)", text) or re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if asked:
        return CheckpointError(f"{file} asks to unpickle {asked.group(1)}, which is not one of {allowed}; refusing to "
                               f"load it (nothing in it was run). If you trust the file, convert it to safetensors "
                               f"with the tool that made it.")
    return CheckpointError(f"{file} cannot be read as a PyTorch checkpoint of {allowed} ({type(err).__name__}); it is "
                           f"corrupt, truncated or not a PyTorch file: download or save it again")


def _load_bin(file: Path) -> dict:
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as err:
        raise pickle_refusal(file, err) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _load_sharded(folder: Path, index_name: str, loader) -> dict:
    index_file = folder / index_name
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except Exception as err:
        raise CheckpointError(f"{index_file} is not a valid shard index ({err})") from None
    state = {}
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise CheckpointError(f"{index_file} lists shard {shard}, which is missing from {folder}")
        state.update(loader(folder / shard))
    return state


def read_state_dict(folder: Path) -> dict:
    if (folder / SAFETENSORS_FILE).is_file():
        return _load_safetensors(folder / SAFETENSORS_FILE)
    if (folder / SAFETENSORS_INDEX).is_file():
        return _load_sharded(folder, SAFETENSORS_INDEX, _load_safetensors)
    if (folder / BIN_FILE).is_file():
        return _load_bin(folder / BIN_FILE)
    if (folder / BIN_INDEX).is_file():
        return _load_sharded(folder, BIN_INDEX, _load_bin)
    raise CheckpointError(
        f"no weights in {folder}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE} or {BIN_INDEX}"
    )


def _normalise_keys(state: dict) -> dict:
    """mamba_ssm's backbone.embedding -> backbone.embeddings; a bare MambaModel's keys get the backbone prefix."""
    if not any(k.startswith("backbone.") for k in state):
        state = {("backbone." + k if not k.startswith("lm_head.") else k): v for k, v in state.items()}
    return {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in state.items()}


def check_tensors(expected: dict, state: dict, source: str, *, against: str = "its config",
                  implied: str = "the config implies") -> None:
    """CheckpointError naming missing, unexpected or misshapen tensors of `state` against `expected` shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (first: {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (first: {', '.join(unexpected[:4])})")
        raise CheckpointError(f"{source} does not match {against}: " + "; ".join(parts))
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise CheckpointError(
                f"{source}: tensor {key} has shape {tuple(state[key].shape)}, {implied} {tuple(shape)}")
    bad = [key for key in expected if state[key].is_floating_point() and not torch.isfinite(state[key]).all()]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} tensor(s) hold NaN or infinite values (first: "
                              f"{', '.join(bad[:4])}); the checkpoint is damaged or comes from a run that diverged, "
                              f"and no score or fine-tuning of it would mean anything. Use another copy of the model")


def load_state_dict_strict(model: MambaLM, state: dict, source: str) -> None:
    """Copies `state` into `model` after checking every key and shape; ties the head again if tied."""
    state = _normalise_keys(state)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = model.config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)       # a tied head is the embedding; transformers ignores it too
    check_tensors(expected, state, source)
    if tied:
        state["lm_head.weight"] = state["backbone.embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()


def save_pretrained(model: MambaLM, folder) -> None:
    """config.json + model.safetensors that transformers' MambaForCausalLM (Mamba2ForCausalLM for a Mamba2LM) and our
    from_pretrained both load."""
    write_hf_checkpoint(model, folder)
