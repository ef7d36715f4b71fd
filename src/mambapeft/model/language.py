"""What every Hugging Face-format language family shares (Mamba-1, Mamba-2, and the hybrids to come): where its
folders come from (local, built in, or the hub), strict loading into our model, saving in the format transformers
loads, and the tokenizer beside the weights. A family states only how to read its config and rename its keys."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CheckpointError
from .checkpoint import write_hf_checkpoint
from .files import FILES_OF_HF, hub_download, looks_local, read_state_dict, ready
from .registry import FILES, ModelFamily, known_names_hint


class HFLanguageFamily(ModelFamily):
    """A causal language family in Hugging Face format (config.json + model.safetensors, a tokenizer beside)."""

    tasks = ("language",)
    has_tokenizer = True
    embedding_key = "backbone.embeddings.weight"      # the token table a tied head shares
    transformers_class: str | None = None            # transformers' class of the same weights (peft export)

    # ------------------------------------------------------------ what a family states

    def read_config(self, folder: Path):
        """(transformers config, format "hf" or "mamba_ssm") of a checkpoint folder of this family."""
        raise NotImplementedError

    def claims_config(self, raw: dict) -> bool:
        """Whether a parsed config.json is one of this family's."""
        raise NotImplementedError

    def normalise_keys(self, state: dict) -> dict:
        """Checkpoint key names -> ours (another format's names); by default as they are."""
        return state

    # ------------------------------------------------------------ shared

    def claim(self, name_or_path) -> int:
        if self.owns_name(name_or_path):
            return super().claim(name_or_path)
        from .files import read_raw_config

        path = Path(os.fspath(name_or_path)).expanduser()
        if not (path / "config.json").is_file():
            return 0
        try:
            raw, _ = read_raw_config(path)
        except CheckpointError:
            return 0
        return FILES if self.claims_config(raw) else 0

    def resolve_folder(self, name_or_path, *, revision=None, cache_dir=None, local_files_only=None) -> Path:
        """A local folder as is; a built-in model's packaged folder; an architecture name's official hub id, or any
        hub id, downloaded (or found in the cache)."""
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            from ..outputs import check_complete

            check_complete(path, "model folder")
            return path
        name = str(name_or_path)
        if name.lower() in self.builtins:
            return self.builtins[name.lower()]
        if path.exists():
            raise CheckpointError(f"{name} is a file; pass the folder that holds config.json and the weights")
        if looks_local(name):
            raise CheckpointError(f"no folder {name}: pass an existing checkpoint folder or a Hugging Face hub id")
        name = self.hub_ids.get(name.lower(), name)
        if "/" not in name:
            raise CheckpointError(f"{name!r} is not a folder, a known architecture or a hub id of the form "
                                  f"owner/name{known_names_hint(name)}")
        return hub_download(name, allow_patterns=FILES_OF_HF, revision=revision, cache_dir=cache_dir,
                            local_files_only=local_files_only)

    def load(self, name_or_path, *, dtype: torch.dtype | str | None = torch.float32, device=None,
             revision: str | None = None, cache_dir=None, local_files_only: bool | None = None):
        """Every key and shape checked. dtype: float32 by default (the CPU's fast type); "auto" keeps the
        checkpoint's."""
        folder = self.resolve_folder(name_or_path, revision=revision, cache_dir=cache_dir,
                                     local_files_only=local_files_only)
        config, _ = self.read_config(folder)
        state = read_state_dict(folder)
        with torch.device("meta"):
            model = self.model_class(config)
        self.load_state(model, state, str(folder))
        return ready(model, name_or_path, dtype=None if dtype == "auto" else dtype, device=device)

    def load_state(self, model, state: dict, source: str) -> None:
        """`state` into the meta-device `model`, every key and shape checked; a tied head is the embedding."""
        from .files import check_tensors

        state = self.normalise_keys(dict(state))
        expected = {k: v.shape for k, v in model.state_dict().items()}
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        if tied:
            expected.pop("lm_head.weight", None)
            state.pop("lm_head.weight", None)      # a tied head is the embedding; transformers ignores it too
        check_tensors(expected, state, source)
        if tied:
            state["lm_head.weight"] = state[self.embedding_key]
        model.load_state_dict(state, strict=True, assign=True)
        if tied:
            model.tie_weights()

    def read_shapes(self, name_or_path):
        folder = self.resolve_folder(name_or_path)
        config, _ = self.read_config(folder)
        with torch.device("meta"):
            return self.model_class(config)

    def source(self, name_or_path) -> str:
        folder = self.resolve_folder(name_or_path)
        _, fmt = self.read_config(folder)
        return f"checkpoint, {'Hugging Face' if fmt == 'hf' else 'mamba_ssm'} format, {folder}"

    def save(self, model, folder) -> None:
        """config.json + model.safetensors, which transformers' ...ForCausalLM and `load` both read."""
        write_hf_checkpoint(model, folder)


def language_folder(name_or_path) -> Path:
    """The folder behind a language model's name (for its tokenizer): a local folder as is, a built-in model's or an
    architecture's folder as its family resolves it, any other hub id downloaded (a tokenizer-only repo works)."""
    from .registry import FAMILIES

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    for family in FAMILIES.values():
        if isinstance(family, HFLanguageFamily) and family.owns_name(name_or_path):
            return family.resolve_folder(name_or_path)
    name = str(name_or_path)
    if path.exists() or looks_local(name) or "/" not in name:
        raise CheckpointError(f"no tokenizer folder {name}: pass a local folder, a language model's name or a hub "
                              f"id owner/name{known_names_hint(name)}")
    return hub_download(name, allow_patterns=FILES_OF_HF)
