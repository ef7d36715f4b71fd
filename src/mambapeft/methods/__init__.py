"""PEFT methods: one file per kind of method, each method registered under its id in REGISTRY.

Adding a method: write its file (see base.py) and add its module to the import line below.
"""

from . import adapter, additional_scan, affix, baselines, dora, lora, partial, prompt, sdt, state  # noqa: E402,F401,I001  (the method files)
from . import lora_ssm  # noqa: E402,F401,I001  (S4D's methods; SDT on S4D is sdt_s4d.py, which sdt.py uses)
from . import layer_lora  # noqa: E402,F401,I001  (hybrid models: attention, MLP and expert layers)
from . import memba, prodial  # noqa: E402,F401,I001  (issue 29: methods published after MambaPEFT)
from . import mamba_adaptor, svp  # noqa: E402,F401,I001  (vision-only methods published after MambaPEFT)
from .base import REGISTRY, AdaptedLayer, Example, Method, MethodConfig, register

__all__ = ["REGISTRY", "AdaptedLayer", "Example", "Method", "MethodConfig", "register"]
