"""IBM Bamba (`bamba`): Mamba-2 and attention layers, each followed by a gated MLP (modeling.py), its checkpoints
(loading.py)."""

from .loading import load_bamba, read_bamba_config
from .modeling import BambaLM

__all__ = ["BambaLM", "load_bamba", "read_bamba_config"]
