"""The model layer: the PEFT-ready mixers (Mamba-1, Mamba-2), the language models around them, loading, generation."""

from .architectures import ARCHITECTURES, HUB_IDS, MAMBA2_ARCHITECTURES, arch_config, from_config, mamba2_config
from .lm import MambaBlock, MambaLM, MambaLMOutput, MambaState, RMSNorm
from .loading import from_pretrained, save_pretrained
from .mamba2 import Mamba2LM, Mamba2Mixer, Mamba2MixerState
from .mixer import DIRECTION_NAMES, MambaMixer, MixerState, PeftHook
from .vim import VIM_ARCHITECTURES, VimConfig, VimOutput, VisionMamba, build_vim, vim_config
from .vim_loading import load_vim, save_vim

__all__ = [
    "ARCHITECTURES", "HUB_IDS", "arch_config", "from_config", "MambaBlock", "MambaLM", "MambaLMOutput",
    "MambaState", "RMSNorm", "from_pretrained", "save_pretrained", "DIRECTION_NAMES", "MambaMixer",
    "MixerState", "PeftHook",
    "MAMBA2_ARCHITECTURES", "mamba2_config", "Mamba2LM", "Mamba2Mixer", "Mamba2MixerState",
    "VIM_ARCHITECTURES", "VimConfig", "VimOutput", "VisionMamba", "build_vim", "vim_config", "load_vim", "save_vim",
]
