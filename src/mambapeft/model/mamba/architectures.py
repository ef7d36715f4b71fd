"""The published Mamba-1 architectures by name (sizes only): those of `state-spaces/mamba-*-hf` (GPT-NeoX vocabulary
padded to 50280). `tiny` and `mamba-micro` are small models for tests and quick demos."""

from __future__ import annotations

from transformers import MambaConfig

from ...errors import ConfigError, did_you_mean

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


def arch_config(name: str, **overrides) -> MambaConfig:
    """The transformers MambaConfig of a named architecture (vocab 50280, N 16, K 4, expand 2 unless overridden)."""
    key = name.lower()
    if key not in ARCHITECTURES:
        from ..registry import FAMILIES

        other = next((family for family in FAMILIES.values() if key in family.architectures), None)
        if other is not None:
            raise ConfigError(f"{name!r} is a {other.title} architecture: build it with from_config({name!r})")
        raise ConfigError(f"unknown language architecture {name!r}{did_you_mean(key, ARCHITECTURES)}; "
                          f"known: {', '.join(ARCHITECTURES)}")
    return MambaConfig(**{**ARCHITECTURES[key], **overrides})
