"""NVIDIA Nemotron-H (`nemotron_h`): Mamba-2, attention, MLP and MoE blocks (modeling.py), its checkpoints
(loading.py)."""

from .loading import build_nemotron_h, load_nemotron_h, read_nemotron_h_config, save_nemotron_h
from .modeling import NemotronHLM

__all__ = ["NemotronHLM", "build_nemotron_h", "load_nemotron_h", "read_nemotron_h_config", "save_nemotron_h"]
