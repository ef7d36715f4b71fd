"""The published Mamba-2 architectures by name (sizes only): those of `state-spaces/mamba2-*` (d_state 128, head_dim
64, expand 2, one group; GPT-NeoX vocabulary padded to a multiple of 16, 50288, as their config.json says).
`mamba2-tiny` is a small model for tests."""

from __future__ import annotations

from transformers import Mamba2Config

from ...errors import ConfigError, did_you_mean

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
# the original checkpoints are in mamba_ssm's format (there are no "-hf" copies); the family reads it
HUB_IDS = {name: f"state-spaces/{name}" for name in MAMBA2_ARCHITECTURES if name != "mamba2-tiny"}


def mamba2_config(name: str, **overrides) -> Mamba2Config:
    """The transformers Mamba2Config of a named Mamba-2 architecture ("mamba2-130m", ..., "mamba2-tiny")."""
    key = name.lower()
    if key not in MAMBA2_ARCHITECTURES:
        raise ConfigError(f"unknown Mamba-2 architecture {name!r}{did_you_mean(key, MAMBA2_ARCHITECTURES)}; "
                          f"known: {', '.join(MAMBA2_ARCHITECTURES)}")
    sizes = {**_MAMBA2_COMMON, **MAMBA2_ARCHITECTURES[key], **overrides}
    sizes.setdefault("num_heads", sizes["expand"] * sizes["hidden_size"] // sizes["head_dim"])
    return Mamba2Config(**sizes)
