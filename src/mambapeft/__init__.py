"""mambapeft: parameter-efficient fine-tuning of Mamba state-space models (MambaPEFT, ICLR 2025)."""

from .errors import CheckpointError, ConfigError, MambaPeftError, NotApplicable
from .model import (
    ARCHITECTURES,
    Mamba2LM,
    MambaLM,
    MambaMixer,
    MambaState,
    MixerState,
    PeftHook,
    VisionMamba,
    from_config,
    from_pretrained,
    load_vim,
    save_pretrained,
    save_vim,
)
from .scan import selective_scan, selective_scan_reference, ssd_scan, ssd_scan_reference
from .version import __version__

__all__ = [
    "ARCHITECTURES", "MambaLM", "MambaMixer", "MambaState", "MixerState", "PeftHook", "from_config",
    "from_pretrained", "save_pretrained", "selective_scan", "selective_scan_reference",
    "CheckpointError", "ConfigError", "MambaPeftError", "NotApplicable", "__version__",
    "VisionMamba", "load_vim", "save_vim", "Mamba2LM", "ssd_scan", "ssd_scan_reference",
]

from .config import MethodSpec, PeftConfig  # noqa: E402
from .peft import PeftModel, get_peft_model  # noqa: E402

__all__ += ["MethodSpec", "PeftConfig", "PeftModel", "get_peft_model"]
