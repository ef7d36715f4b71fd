"""Configs and presets: which methods to attach, with which hyperparameters."""

from .presets import PRESETS, expand_preset
from .spec import MethodSpec, PeftConfig

__all__ = ["MethodSpec", "PeftConfig", "PRESETS", "expand_preset"]
