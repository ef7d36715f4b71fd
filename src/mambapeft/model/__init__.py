"""The model layer: the PEFT-ready mixer, the language model around it, loading and generation."""

from .architectures import ARCHITECTURES, HUB_IDS, arch_config, from_config
from .lm import MambaBlock, MambaLM, MambaLMOutput, MambaState, RMSNorm
from .loading import from_pretrained, save_pretrained
from .mixer import DIRECTION_NAMES, MambaMixer, MixerState, PeftHook
from .vim import VIM_ARCHITECTURES, VimConfig, VimOutput, VisionMamba, build_vim, vim_config
from .vim_loading import load_vim, save_vim
from .vmamba import VMAMBA_ARCHITECTURES, VMamba, VMambaConfig, build_vmamba, vmamba_config
from .vmamba_loading import load_vmamba, save_vmamba

__all__ = [
    "ARCHITECTURES", "HUB_IDS", "arch_config", "from_config", "MambaBlock", "MambaLM", "MambaLMOutput",
    "MambaState", "RMSNorm", "from_pretrained", "save_pretrained", "DIRECTION_NAMES", "MambaMixer",
    "MixerState", "PeftHook",
    "VIM_ARCHITECTURES", "VimConfig", "VimOutput", "VisionMamba", "build_vim", "vim_config", "load_vim", "save_vim",
    "VMAMBA_ARCHITECTURES", "VMamba", "VMambaConfig", "build_vmamba", "vmamba_config", "load_vmamba", "save_vmamba",
]
