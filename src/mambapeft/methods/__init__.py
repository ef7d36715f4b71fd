"""PEFT methods: one file per family, each method registered under its id in REGISTRY.

Adding a method: write its file (see base.py) and add its module to the import line below.
"""

from .base import REGISTRY, AdaptedLayer, Method, MethodConfig, register

from . import lora, partial, adapter, dora, additional_scan, prompt, affix, sdt, baselines, vision  # noqa: E402,F401  (one line: the method families)

__all__ = ["REGISTRY", "AdaptedLayer", "Method", "MethodConfig", "register"]
