"""Writing a model's folder: config.json + model.safetensors, in the Hugging Face format for the language families
(`write_hf_checkpoint`) and in our own format for the vision families (`write_model_folder`).

Refused while PEFT parts are attached: the state dict would then hold keys the family's loader does not know (save
the adapter with its own API, or merge first).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def plain_state(model) -> dict:
    """The model's state dict, refused while it holds keys a fresh model of its family lacks (PEFT parts)."""
    state = model.state_dict()
    with torch.device("meta"):
        plain = set(type(model)(model.config).state_dict())      # the same family, without adapters
    if set(state) != plain:
        extra = sorted(set(state) - plain)[:4]
        raise CheckpointError(f"the model carries PEFT adapters ({', '.join(extra)}, ...); save them with the adapter "
                              f"API or merge them into the weights first")
    return state


def write_weights(state: dict, folder: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / WEIGHTS_FILE),
              metadata={"format": "pt"})


def write_hf_checkpoint(model, folder) -> None:
    """`model.config` as config.json and its weights as model.safetensors (a tied head written once)."""
    state = plain_state(model)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    write_weights(state, folder)


def write_model_folder(model, folder, config: dict) -> None:
    """`config` as config.json and the weights as model.safetensors: our own format (Vim, VMamba)."""
    state = plain_state(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    write_weights(state, folder)
