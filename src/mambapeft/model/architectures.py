"""The published architectures by name (sizes only, no builders): the tables every front end reads.

The Mamba-1 language sizes are those of `state-spaces/mamba-*-hf` (GPT-NeoX vocabulary padded to 50280); the Mamba-2
ones those of `state-spaces/mamba2-*` (d_state 128, head_dim 64, expand 2, one group; GPT-NeoX vocabulary padded to a
multiple of 16, 50288, as their config.json says). `tiny`, `mamba-micro` and `mamba2-tiny` are small models for tests
and quick demos. The Vision Mamba names live beside their config (vim.py, VIM_ARCHITECTURES); `model.factory`
builds any of them.
"""

from __future__ import annotations

from transformers import Mamba2Config, MambaConfig

from ..errors import ConfigError, did_you_mean

ARCHITECTURES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, vocab_size=1024),
    # sizes that are not powers of two, small enough for every check of every method in seconds
    "mamba-micro": dict(hidden_size=24, num_hidden_layers=2, vocab_size=97, state_size=5, time_step_rank=3),
    "mamba-130m": dict(hidden_size=768, num_hidden_layers=24),
    "mamba-370m": dict(hidden_size=1024, num_hidden_layers=48),
    "mamba-790m": dict(hidden_size=1536, num_hidden_layers=48),
    "mamba-1.4b": dict(hidden_size=2048, num_hidden_layers=48),
    "mamba-2.8b": dict(hidden_size=2560, num_hidden_layers=64),
}
HUB_IDS = {name: f"state-spaces/{name}-hf" for name in ARCHITECTURES if name not in ("tiny", "mamba-micro")}

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


def arch_config(name: str, **overrides) -> MambaConfig:
    """The transformers MambaConfig of a named architecture (vocab 50280, N 16, K 4, expand 2 unless overridden)."""
    key = name.lower()
    if key in MAMBA2_ARCHITECTURES:
        raise ConfigError(f"{name!r} is a Mamba-2 architecture: build it with from_config({name!r})")
    if key not in ARCHITECTURES:
        raise ConfigError(f"unknown language architecture {name!r}{did_you_mean(key, ARCHITECTURES)}; "
                          f"known: {', '.join(ARCHITECTURES)}")
    return MambaConfig(**{**ARCHITECTURES[key], **overrides})


def mamba2_config(name: str, **overrides) -> Mamba2Config:
    """The transformers Mamba2Config of a named Mamba-2 architecture ("mamba2-130m", ..., "mamba2-tiny")."""
    key = name.lower()
    if key not in MAMBA2_ARCHITECTURES:
        raise ConfigError(f"unknown Mamba-2 architecture {name!r}{did_you_mean(key, MAMBA2_ARCHITECTURES)}; "
                          f"known: {', '.join(MAMBA2_ARCHITECTURES)}")
    sizes = {**_MAMBA2_COMMON, **MAMBA2_ARCHITECTURES[key], **overrides}
    sizes.setdefault("num_heads", sizes["expand"] * sizes["hidden_size"] // sizes["head_dim"])
    return Mamba2Config(**sizes)
