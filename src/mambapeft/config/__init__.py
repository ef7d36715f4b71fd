"""Configs and presets: which methods to attach, with which hyperparameters."""

from .presets import all_presets, size_lr
from .spec import MethodSpec, PeftConfig, expand_preset, fill_size_rates

__all__ = ["MethodSpec", "PeftConfig", "all_presets", "expand_preset", "fill_size_rates", "size_lr"]
