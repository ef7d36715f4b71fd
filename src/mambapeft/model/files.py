"""Reading checkpoint files, for every family: the one copy of what loading needs besides a family's own layout.

    hub_download        a hub repo's files (or one file), with the hub's errors translated into what to do
    read_raw_config     a folder's config.json as a dict
    read_our_config     config.json of one of our own folders (a "format" marker names the family)
    read_state_dict     a folder's weights: safetensors or pickled .bin, sharded or not
    read_safe_pickle    a released .pth, read without running anything in it (an allow-list of globals)
    check_tensors       every key and shape of a state dict against the model's, named when one differs
    load_strict         check_tensors, then the tensors into a meta-device model (and finite, or refused)

Pickles are read with torch.load(weights_only=True): tensors, containers and plain values, plus the globals a
family allow-lists (Vim's argparse.Namespace, VMamba's yacs CfgNode as a plain dict); anything else is refused by
name before loading.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import CheckpointError
from .checkpoint import CONFIG_FILE, WEIGHTS_FILE

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
FILES_OF_HF = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]     # what a language checkpoint needs


# ---------------------------------------------------------------- where the files are


def looks_local(name: str) -> bool:
    """Whether a name that is not an existing path was meant as one (not a hub id owner/name)."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")
            or name.endswith(PICKLE_SUFFIXES))


def hub_download(repo: str, *, filename: str | None = None, allow_patterns=None, revision=None, cache_dir=None,
                 local_files_only=None) -> Path:
    """One file of a hub repo, or a snapshot of the files matching `allow_patterns`; CheckpointError saying what to
    do when the hub cannot give it (no network, gated, no such repo, revision or file)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    options = dict(revision=revision, cache_dir=cache_dir, local_files_only=bool(local_files_only))
    try:
        if filename:
            return Path(hf_hub_download(repo, filename, **options))
        return Path(snapshot_download(repo, allow_patterns=allow_patterns, **options))
    except HFValidationError:
        raise CheckpointError(f"{repo!r} is neither a local path nor a valid Hugging Face hub id") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"cannot fetch {repo!r} from the Hugging Face hub: it needs the network (none reachable, or "
            f"HF_HUB_OFFLINE is set) and it is not in the local cache. Download it where there is a network "
            f"(`hf download {repo}{' ' + filename if filename and filename != CONFIG_FILE else ''}`), or pass the "
            f"path of a local folder or file holding it."
        ) from None
    except GatedRepoError:
        raise CheckpointError(f"{repo!r} is gated on the hub: accept its terms and log in (`hf auth login`)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo!r} has no revision {revision!r} on the hub") from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"no repository {repo!r} on the Hugging Face hub (and no local folder of that name)") from None
    except EntryNotFoundError:
        raise CheckpointError(f"{repo!r} has no file {filename!r}; pass filename= with the checkpoint's name") from None


def local_checkpoint(name_or_path, builtin: dict[str, Path], script: str, filename=None) -> Path | None:
    """What a checkpoint name of a family with .pth releases means on this machine, or None (then it may be a hub
    id): a built-in name (its folder, which `script` builds), a file, a folder in our format, or a folder with
    exactly one pickle."""
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


# ---------------------------------------------------------------- config


def read_raw_config(folder: Path) -> tuple[dict, Path]:
    """The parsed config.json of a checkpoint folder and its path; CheckpointError if missing or not a JSON object."""
    file = Path(folder) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(
            f"no {CONFIG_FILE} in {folder}: a checkpoint folder holds config.json plus model.safetensors "
            f"(Hugging Face format) or pytorch_model.bin (mamba_ssm format)"
        )
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); the file is corrupt or truncated") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} must hold a JSON object, it holds a {type(raw).__name__}")
    return raw, file


def config_format(path) -> str | None:
    """The "format" (ours) or "model_type" (Hugging Face) a folder's config.json declares, or None: how a family
    recognises a folder without loading it."""
    try:
        raw = json.loads((Path(os.fspath(path)).expanduser() / CONFIG_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(raw, dict):
        return None
    return raw.get("format") or raw.get("model_type")


def decode_floats(obj):
    """transformers writes infinities in config.json as {"__float__": "Infinity"} (time_step_limit): read them back."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and isinstance(obj["__float__"], str):
            return float(obj["__float__"])
        return {k: decode_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_floats(v) for v in obj]
    return obj


def read_our_config(folder: Path, fmt: str, config_class, what: str):
    """The config object of one of our own folders, whose config.json carries {"format": fmt, ...}."""
    from ..errors import ConfigError
    from ..outputs import check_complete

    check_complete(Path(folder), "model folder")
    raw, file = read_raw_config(folder)
    if raw.pop("format", None) != fmt:
        raise CheckpointError(f"{file} is not a mambapeft {what} config (format {fmt!r}); load the model by its "
                              f"folder with mambapeft.load_model, which picks its family")
    try:
        return config_class.from_dict(raw)
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{file}: {err}") from None


# ---------------------------------------------------------------- weights


def load_safetensors(file: Path) -> dict:
    try:
        return load_file(str(file))
    except Exception as err:
        raise CheckpointError(f"{file} is corrupt or truncated ({err}); download or save it again") from None


def read_weights_file(folder: Path) -> dict:
    """model.safetensors of one of our own folders."""
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"no {WEIGHTS_FILE} in {folder}")
    return load_safetensors(folder / WEIGHTS_FILE)


def pickle_refusal(file: Path, err: Exception, allowed: str = "tensors and plain data") -> CheckpointError:
    """Why torch's restricted unpickler refused `file`, without passing on its advice to load the file unrestricted
    (which would run whatever code the pickle holds)."""
    text = str(err)
    asked = (re.search(r"unsupported GLOBAL (\S+)", text) or re.search(r"Unsupported global: GLOBAL (\S+)", text)
             or re.search(r"GLOBAL ([\w.]+)", text))
    if asked:
        return CheckpointError(f"{file} asks to unpickle {asked.group(1)}, which is not one of {allowed}; refusing to "
                               f"load it (nothing in it was run). If you trust the file, convert it to safetensors "
                               f"with the tool that made it.")
    if isinstance(err, pickle.UnpicklingError):
        why = "the restricted unpickler refused its contents"
    else:
        why = type(err).__name__
    return CheckpointError(f"{file} cannot be read as a PyTorch checkpoint of {allowed} ({why}); it is corrupt, "
                           f"truncated or not a PyTorch file: download or save it again")


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
    """The weights of a Hugging Face or mamba_ssm folder: model.safetensors or pytorch_model.bin, sharded or not."""
    if (folder / WEIGHTS_FILE).is_file():
        return load_safetensors(folder / WEIGHTS_FILE)
    if (folder / SAFETENSORS_INDEX).is_file():
        return _load_sharded(folder, SAFETENSORS_INDEX, load_safetensors)
    if (folder / BIN_FILE).is_file():
        return _load_bin(folder / BIN_FILE)
    if (folder / BIN_INDEX).is_file():
        return _load_sharded(folder, BIN_INDEX, _load_bin)
    raise CheckpointError(
        f"no weights in {folder}: expected {WEIGHTS_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE} or {BIN_INDEX}"
    )


def read_safe_pickle(file: Path, allowed: list, family: str, *, mmap: bool = False) -> tuple[dict, dict | None]:
    """(state dict, the whole unpickled dict or None for a bare state dict) of a released-style .pth, without running
    anything in it. `allowed`: the globals besides tensors and plain data, as torch's safe_globals takes them
    (classes, or (stand-in, "module.Name") pairs); `family` names the family in messages ("Vim")."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"no checkpoint file {file}")
    names = {entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}" for entry in allowed}
    allowed_text = f"tensors, plain data and {', '.join(sorted(names))}"
    if not hasattr(torch.serialization, "safe_globals"):
        raise CheckpointError(f"reading {file} safely (weights only, {', '.join(sorted(names))} allow-listed) needs "
                              f"torch >= 2.5; this is torch {torch.__version__}")
    try:
        asked = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(file)))
    except Exception:
        asked = set()       # not a zip checkpoint (legacy format): the restricted load below still guards it
    refused = sorted(asked - names)
    if refused:
        raise CheckpointError(
            f"{file} asks to unpickle {', '.join(refused)}, which a {family} checkpoint does not need; refusing to "
            f"load it (only "
            f"{allowed_text} are allowed). If you trust the file, convert it to a plain state dict or safetensors "
            f"first."
        )
    try:
        with torch.serialization.safe_globals(list(allowed)):
            obj = torch.load(str(file), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        if "GLOBAL" in str(err):
            raise pickle_refusal(file, err, allowed_text) from None
        why = "the restricted unpickler refused its contents" if isinstance(err, pickle.UnpicklingError) else (
            f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
        raise CheckpointError(f"{file} cannot be read as a {family} checkpoint ({why}); it is corrupt, truncated, or "
                              f"pickles objects other than {allowed_text}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state, whole = obj["model"], obj
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, whole = obj, None             # a bare state dict
    else:
        raise CheckpointError(f"{file} holds no {family} state dict: expected a dict with a 'model' state dict "
                              f"(the released layout) or a plain state dict of tensors")
    if state and all(k.startswith("module.") for k in state):      # saved from a DistributedDataParallel wrapper
        state = {k.removeprefix("module."): v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{file}: the state dict holds non-tensors under {bad[:3]}")
    return dict(state), whole


# ---------------------------------------------------------------- strict loading


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


def load_strict(model: torch.nn.Module, state: dict, source: str, *, against: str = "its config",
                implied: str = "the config implies", skip: tuple[str, ...] = ()) -> None:
    """Checks every key and shape of `state` against `model` (keys starting with a `skip` prefix aside: they keep
    the model's own values), then puts the tensors in (assign: `model` may be on the meta device)."""
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(skip or ("\0",))}
    check_tensors(expected, state, source, against=against, implied=implied)
    model.load_state_dict(state, strict=not skip, assign=True)


def ready(model: torch.nn.Module, name_or_path, *, dtype=None, device=None) -> torch.nn.Module:
    """A loaded model as every loader hands it back: in `dtype` and on `device` where given (None: as loaded),
    remembering where it came from (adapters record it), in eval mode."""
    if dtype is not None:
        model.to(dtype=dtype)
    if device is not None:
        model.to(device)
    model.name_or_path = str(name_or_path)
    return model.eval()
