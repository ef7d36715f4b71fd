"""The published Mamba-1 and Mamba-2 architectures by name, buildable with random weights and without any download.

The Mamba-1 language sizes are those of `state-spaces/mamba-*-hf` (GPT-NeoX vocabulary padded to 50280); the
Mamba-2 ones those of `state-spaces/mamba2-*` (d_state 128, head_dim 64, expand 2, one group; GPT-NeoX vocabulary
padded to a multiple of 16, 50288, as their config.json says). `tiny` and `mamba2-tiny` are small models for tests
and quick demos. `device="meta"` builds any of them in milliseconds, shapes only, for counting parameters.
"""

from __future__ import annotations

import torch
from transformers import Mamba2Config, MambaConfig

from ..errors import ConfigError
from .lm import MambaLM
from .mamba2 import Mamba2LM
from .vim import VIM_ARCHITECTURES, VimConfig, VisionMamba, build_vim

ARCHITECTURES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, vocab_size=1024),
    "mamba-130m": dict(hidden_size=768, num_hidden_layers=24),
    "mamba-370m": dict(hidden_size=1024, num_hidden_layers=48),
    "mamba-790m": dict(hidden_size=1536, num_hidden_layers=48),
    "mamba-1.4b": dict(hidden_size=2048, num_hidden_layers=48),
    "mamba-2.8b": dict(hidden_size=2560, num_hidden_layers=64),
}
HUB_IDS = {name: f"state-spaces/{name}-hf" for name in ARCHITECTURES if name != "tiny"}

_MAMBA2_COMMON = dict(state_size=128, head_dim=64, expand=2, n_groups=1, conv_kernel=4, vocab_size=50288,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
MAMBA2_ARCHITECTURES: dict[str, dict] = {
    "mamba2-tiny": dict(hidden_size=64, num_hidden_layers=2, vocab_size=1024, state_size=16, head_dim=16),
    "mamba2-130m": dict(hidden_size=768, num_hidden_layers=24),
    "mamba2-370m": dict(hidden_size=1024, num_hidden_layers=48),
    "mamba2-780m": dict(hidden_size=1536, num_hidden_layers=48),
    "mamba2-1.3b": dict(hidden_size=2048, num_hidden_layers=48),
    "mamba2-2.7b": dict(hidden_size=2560, num_hidden_layers=64),
}
# the original checkpoints are in mamba_ssm's format (there are no "-hf" copies); from_pretrained reads it
HUB_IDS.update({name: f"state-spaces/{name}" for name in MAMBA2_ARCHITECTURES if name != "mamba2-tiny"})
# every name from_config builds: the language ones above and the Vision Mamba ones of vim.py
ALL_ARCHITECTURES = [*ARCHITECTURES, *MAMBA2_ARCHITECTURES, *VIM_ARCHITECTURES]


def arch_config(name: str, **overrides) -> MambaConfig:
    """The transformers MambaConfig of a named architecture (vocab 50280, N 16, K 4, expand 2 unless overridden)."""
    key = name.lower()
    if key not in ARCHITECTURES:
        import difflib

        close = difflib.get_close_matches(key, ARCHITECTURES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if key in VIM_ARCHITECTURES:
            raise ConfigError(f"{name!r} is a Vision Mamba architecture: build it with from_config({name!r})")
        if key in MAMBA2_ARCHITECTURES:
            raise ConfigError(f"{name!r} is a Mamba-2 architecture: build it with from_config({name!r})")
        raise ConfigError(f"unknown architecture {name!r}{hint}; known: {', '.join(ALL_ARCHITECTURES)}")
    return MambaConfig(**{**ARCHITECTURES[key], **overrides})


def mamba2_config(name: str, **overrides) -> Mamba2Config:
    """The transformers Mamba2Config of a named Mamba-2 architecture ("mamba2-130m", ..., "mamba2-tiny")."""
    key = name.lower()
    if key not in MAMBA2_ARCHITECTURES:
        raise ConfigError(f"unknown Mamba-2 architecture {name!r}; known: {', '.join(MAMBA2_ARCHITECTURES)}")
    sizes = {**_MAMBA2_COMMON, **MAMBA2_ARCHITECTURES[key], **overrides}
    sizes.setdefault("num_heads", sizes["expand"] * sizes["hidden_size"] // sizes["head_dim"])
    return Mamba2Config(**sizes)


def from_config(config, *, device=None, dtype=None, seed: int | None = None) -> MambaLM | Mamba2LM | VisionMamba:
    """A randomly initialised model from an architecture name ("mamba-130m", "mamba2-130m", "tiny", "vim-small",
    ...) or a MambaConfig, Mamba2Config or VimConfig.

    device="meta" allocates nothing (shapes only), which makes even mamba-2.8b instant to build for counting.
    """
    if isinstance(config, VimConfig) or (isinstance(config, str) and config.lower() in VIM_ARCHITECTURES):
        return build_vim(config, device=device, dtype=dtype, seed=seed)
    if isinstance(config, str) and config.lower() in MAMBA2_ARCHITECTURES:
        config = mamba2_config(config)
    if isinstance(config, Mamba2Config):
        if seed is not None and str(device) != "meta":
            torch.manual_seed(seed)
        return Mamba2LM(config, device=device, dtype=dtype)
    if isinstance(config, str):
        config = arch_config(config)
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    return MambaLM(config, device=device, dtype=dtype)
