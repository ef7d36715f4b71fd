"""The model layer: the PEFT interface of a family (interface.py), the Mamba-1 mixer, the language model and Vision
Mamba around it, loading, generation, and building models by name (factory.py)."""

from .architectures import ARCHITECTURES, HUB_IDS, MAMBA2_ARCHITECTURES, arch_config, mamba2_config
from .factory import ALL_ARCHITECTURES, from_config, from_pretrained, shapes_model
from .interface import PeftMixerInterface, PeftModelInterface, Projection, TensorSlot
from .lm import MambaBlock, MambaLM, MambaLMOutput, MambaState, RMSNorm
from .loading import save_pretrained
from .mamba2 import Mamba2LM, Mamba2Mixer, Mamba2MixerState
from .mixer import DIRECTION_NAMES, MambaMixer, MixerState, PeftHook
from .s4d import S4D_ARCHITECTURES, DeepS4D, S4DConfig, S4DLayer, build_s4d
from .vim import VIM_ARCHITECTURES, VimConfig, VimOutput, VisionMamba, build_vim, vim_config
from .vim_loading import load_vim, save_vim
from .vmamba import VMAMBA_ARCHITECTURES, VMamba, VMambaConfig, build_vmamba, vmamba_config
from .vmamba_loading import load_vmamba, save_vmamba

__all__ = [
    "ARCHITECTURES", "ALL_ARCHITECTURES", "HUB_IDS", "arch_config", "from_config", "shapes_model",
    "PeftMixerInterface", "PeftModelInterface", "Projection", "TensorSlot",
    "MambaBlock", "MambaLM", "MambaLMOutput", "MambaState", "RMSNorm", "from_pretrained", "save_pretrained",
    "DIRECTION_NAMES", "MambaMixer", "MixerState", "PeftHook",
    "MAMBA2_ARCHITECTURES", "mamba2_config", "Mamba2LM", "Mamba2Mixer", "Mamba2MixerState",
    "VIM_ARCHITECTURES", "VimConfig", "VimOutput", "VisionMamba", "build_vim", "vim_config", "load_vim", "save_vim",
    "VMAMBA_ARCHITECTURES", "VMamba", "VMambaConfig", "build_vmamba", "vmamba_config", "load_vmamba", "save_vmamba",
]
__all__ += ["S4D_ARCHITECTURES", "DeepS4D", "S4DConfig", "S4DLayer", "build_s4d"]
