"""The published Mamba-1 architectures by name, buildable with random weights and without any download.

The language sizes are those of `state-spaces/mamba-*-hf` (GPT-NeoX vocabulary padded to 50280); `tiny` is a
small model for tests and quick demos. `device="meta"` builds any of them in milliseconds, shapes only, for
counting parameters.
"""

from __future__ import annotations

import torch
from transformers import MambaConfig

from ..errors import ConfigError
from .lm import MambaLM
from .vim import VIM_ARCHITECTURES, VimConfig, VisionMamba, build_vim
from .vmamba import VMAMBA_ARCHITECTURES, VMamba, VMambaConfig, build_vmamba

ARCHITECTURES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, vocab_size=1024),
    "mamba-130m": dict(hidden_size=768, num_hidden_layers=24),
    "mamba-370m": dict(hidden_size=1024, num_hidden_layers=48),
    "mamba-790m": dict(hidden_size=1536, num_hidden_layers=48),
    "mamba-1.4b": dict(hidden_size=2048, num_hidden_layers=48),
    "mamba-2.8b": dict(hidden_size=2560, num_hidden_layers=64),
}
HUB_IDS = {name: f"state-spaces/{name}-hf" for name in ARCHITECTURES if name != "tiny"}
# every name from_config builds: the language ones above, the Vision Mamba (vim.py) and VMamba (vmamba.py) ones
ALL_ARCHITECTURES = [*ARCHITECTURES, *VIM_ARCHITECTURES, *VMAMBA_ARCHITECTURES]


def arch_config(name: str, **overrides) -> MambaConfig:
    """The transformers MambaConfig of a named architecture (vocab 50280, N 16, K 4, expand 2 unless overridden)."""
    key = name.lower()
    if key not in ARCHITECTURES:
        import difflib

        close = difflib.get_close_matches(key, ARCHITECTURES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if key in VIM_ARCHITECTURES or key in VMAMBA_ARCHITECTURES:
            raise ConfigError(f"{name!r} is a vision architecture: build it with from_config({name!r})")
        raise ConfigError(f"unknown architecture {name!r}{hint}; known: {', '.join(ALL_ARCHITECTURES)}")
    return MambaConfig(**{**ARCHITECTURES[key], **overrides})


def from_config(config, *, device=None, dtype=None, seed: int | None = None) -> MambaLM | VisionMamba | VMamba:
    """A randomly initialised model from an architecture name ("mamba-130m", "tiny", "vim-small", "vmamba-small",
    ...) or a MambaConfig, VimConfig or VMambaConfig.

    device="meta" allocates nothing (shapes only), which makes even mamba-2.8b instant to build for counting.
    """
    if isinstance(config, VimConfig) or (isinstance(config, str) and config.lower() in VIM_ARCHITECTURES):
        return build_vim(config, device=device, dtype=dtype, seed=seed)
    if isinstance(config, VMambaConfig) or (isinstance(config, str) and config.lower() in VMAMBA_ARCHITECTURES):
        return build_vmamba(config, device=device, dtype=dtype, seed=seed)
    if isinstance(config, str):
        config = arch_config(config)
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    return MambaLM(config, device=device, dtype=dtype)
