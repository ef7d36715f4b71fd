"""Writing a language model in the Hugging Face format (config.json + model.safetensors), for every family that has one.

Refused while PEFT parts are attached: the state dict would then hold keys transformers does not know (save the
adapter with its own API, or merge first).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError

WEIGHTS_FILE = "model.safetensors"


def write_hf_checkpoint(model, folder) -> None:
    """`model.config` as config.json and its weights as model.safetensors (a tied head written once)."""
    state = model.state_dict()
    with torch.device("meta"):
        plain = set(type(model)(model.config).state_dict())      # the same family, without adapters
    if set(state) != plain:
        extra = sorted(set(state) - plain)[:4]
        raise CheckpointError(f"the model carries PEFT adapters ({', '.join(extra)}, ...); save them with the adapter "
                              f"API or merge them into the weights first")
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / WEIGHTS_FILE),
              metadata={"format": "pt"})
