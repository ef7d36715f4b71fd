"""The model layer: one folder per model family (mamba, mamba2, vim, vmamba, s4d; the hybrids granitemoehybrid,
nemotron_h, bamba, falcon_h1, jamba, and the Gated DeltaNet hybrids qwen3_next, qwen3_5), each registering itself with
the family registry (registry.py); the PEFT interface every family implements (interface.py) and the hook
plumbing methods use (hooks.py); reading and writing checkpoint files (files.py, checkpoint.py); building and
loading any model by name (factory.py).

Adding a family: a folder model/<name>/ with its config, modeling and loading code and a `ModelFamily` registered
with `@register_family`, and one import line below.
"""

from .bamba import BambaLM, load_bamba
from .factory import from_config, from_pretrained, load_model, shapes_model
from .falcon_h1 import FalconH1LM, load_falcon_h1
from .granitemoehybrid import GraniteHybridLM, load_granite_hybrid, save_granite_hybrid
from .hooks import PeftHook
from .interface import PeftMixerInterface, PeftModelInterface, Projection, TensorSlot
from .jamba import JambaLM, load_jamba

# the families: importing each registers it
from .mamba import (  # noqa: I001
    ARCHITECTURES,
    HUB_IDS,
    MambaBlock,
    MambaLM,
    MambaLMOutput,
    MambaMixer,
    MambaState,
    MixerState,
    RMSNorm,
    arch_config,
)
from .mamba2 import MAMBA2_ARCHITECTURES, Mamba2LM, Mamba2Mixer, Mamba2MixerState, mamba2_config
from .nemotron_h import NemotronHLM, load_nemotron_h, save_nemotron_h
from .qwen3_5 import Qwen3_5LM, load_qwen3_5
from .qwen3_next import Qwen3NextLM, load_qwen3_next
from .registry import FAMILIES, ModelFamily, family_of, register_family
from .s4d import S4D_ARCHITECTURES, DeepS4D, S4DConfig, S4DLayer, build_s4d, load_s4d, save_s4d
from .vim import VIM_ARCHITECTURES, VimConfig, VimOutput, VisionMamba, build_vim, load_vim, save_vim, vim_config
from .vmamba import VMAMBA_ARCHITECTURES, VMamba, VMambaConfig, build_vmamba, load_vmamba, save_vmamba, vmamba_config


def save_pretrained(model, folder) -> None:
    """A model's folder in its family's format (Hugging Face for language models), which `from_pretrained` reads."""
    from .registry import family_of_model

    family_of_model(model).save(model, folder)


__all__ = [
    "from_config", "from_pretrained", "load_model", "shapes_model", "save_pretrained",
    "PeftHook", "PeftMixerInterface", "PeftModelInterface", "Projection", "TensorSlot",
    "FAMILIES", "ModelFamily", "family_of", "register_family",
    "ARCHITECTURES", "HUB_IDS", "arch_config", "MambaBlock", "MambaLM", "MambaLMOutput", "MambaMixer", "MambaState",
    "MixerState", "RMSNorm",
    "MAMBA2_ARCHITECTURES", "mamba2_config", "Mamba2LM", "Mamba2Mixer", "Mamba2MixerState",
    "VIM_ARCHITECTURES", "VimConfig", "VimOutput", "VisionMamba", "build_vim", "vim_config", "load_vim", "save_vim",
    "VMAMBA_ARCHITECTURES", "VMamba", "VMambaConfig", "build_vmamba", "vmamba_config", "load_vmamba", "save_vmamba",
    "S4D_ARCHITECTURES", "DeepS4D", "S4DConfig", "S4DLayer", "build_s4d", "load_s4d", "save_s4d",
    "GraniteHybridLM", "load_granite_hybrid", "save_granite_hybrid", "NemotronHLM", "load_nemotron_h",
    "save_nemotron_h", "BambaLM", "load_bamba", "FalconH1LM", "load_falcon_h1", "JambaLM", "load_jamba",
    "Qwen3NextLM", "load_qwen3_next", "Qwen3_5LM", "load_qwen3_5",
]
