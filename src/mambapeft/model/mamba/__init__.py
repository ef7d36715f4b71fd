"""Mamba-1 language models (Hugging Face `MambaForCausalLM` / `FalconMambaForCausalLM` and mamba_ssm checkpoints).

    mixer.py          the Mamba-1 block's mixer: the math, every PEFT hook stage (Vim reuses it, bidirectional)
    lm.py             the language model around it, with transformers' module names
    loading.py        reading Hugging Face and mamba_ssm configs; key renaming
    architectures.py  the published sizes by name
"""

from __future__ import annotations

from pathlib import Path

from transformers import FalconMambaConfig, MambaConfig

from ...assets import BUILTIN_MODEL
from ..language import HFLanguageFamily
from ..registry import register_family
from ..summary import language_summary, language_summary_lines
from .architectures import ARCHITECTURES, HUB_IDS, arch_config
from .lm import MambaBlock, MambaLM, MambaLMOutput, MambaState, RMSNorm, drop_path
from .loading import is_mamba1_config, normalise_keys, read_config
from .mixer import DIRECTION_NAMES, MambaMixer, MixerState


@register_family
class MambaFamily(HFLanguageFamily):
    name = "mamba"
    title = "Mamba-1"
    model_class = MambaLM
    config_class = (MambaConfig, FalconMambaConfig)
    architectures = ARCHITECTURES
    hub_ids = HUB_IDS
    builtins = {"builtin": BUILTIN_MODEL, "tiny-mamba": BUILTIN_MODEL}
    check_architecture = "mamba-micro"
    transformers_class = "MambaForCausalLM"

    def config(self, name: str, **overrides):
        return arch_config(name, **overrides)

    def read_config(self, folder: Path):
        return read_config(folder)

    def claims_config(self, raw: dict) -> bool:
        return is_mamba1_config(raw)

    def normalise_keys(self, state: dict) -> dict:
        return normalise_keys(state)

    def summary(self, model) -> dict:
        mixer = model.backbone.layers[0].mixer
        sizes = {"d_inner": mixer.d_inner, "d_state": mixer.d_state, "dt_rank": mixer.dt_rank, "d_conv": mixer.d_conv}
        return language_summary(model, ("in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj"), sizes)

    def summary_lines(self, summary: dict) -> list[str]:
        return language_summary_lines(
            summary, f"d_inner (E) {summary['d_inner']}   d_state (N) {summary['d_state']}   dt_rank (R) "
                     f"{summary['dt_rank']}   d_conv (K) {summary['d_conv']}")


__all__ = ["ARCHITECTURES", "HUB_IDS", "arch_config", "MambaBlock", "MambaLM", "MambaLMOutput", "MambaState",
           "RMSNorm", "drop_path", "normalise_keys", "read_config", "DIRECTION_NAMES", "MambaMixer", "MixerState",
           "MambaFamily"]
