"""IBM Granite 4.0-H (`granitemoehybrid`): Mamba-2 and attention layers with MLPs and experts (modeling.py), its
checkpoints (loading.py) and named sizes (architectures.py)."""

from .architectures import GRANITE_HYBRID_ARCHITECTURES, granite_hybrid_config
from .loading import build_granite_hybrid, load_granite_hybrid, read_granite_hybrid_config, save_granite_hybrid
from .modeling import AttentionState, GraniteHybridLM

__all__ = ["GRANITE_HYBRID_ARCHITECTURES", "granite_hybrid_config", "AttentionState", "GraniteHybridLM",
           "build_granite_hybrid", "load_granite_hybrid", "read_granite_hybrid_config", "save_granite_hybrid"]
