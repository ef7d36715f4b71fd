"""IBM Bamba (`bamba`): Mamba-2 and attention layers, each followed by a gated MLP (modeling.py), its checkpoints
(loading.py)."""

from __future__ import annotations

from pathlib import Path

from transformers import BambaConfig

from ..granitemoehybrid import HybridFamily
from ..registry import register_family
from .loading import load_bamba, read_bamba_config
from .modeling import BambaLM

# partial rotary, GQA and the z-loss at odd small sizes: what checks build (`mambapeft methods`, the battery)
BAMBA_ARCHITECTURES = {
    "bamba-micro": dict(
        vocab_size=43, hidden_size=24, num_hidden_layers=4, attn_layer_indices=[1, 3], num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=10, mamba_n_heads=6, mamba_d_state=8, mamba_chunk_size=8,
        z_loss_coefficient=0.01, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
}


@register_family
class BambaFamily(HybridFamily):
    name = "bamba"
    title = "Bamba"
    model_class = BambaLM
    config_class = BambaConfig
    architectures = BAMBA_ARCHITECTURES
    check_architecture = "bamba-micro"
    transformers_class = "BambaForCausalLM"

    def config(self, name: str, **overrides):
        return BambaConfig(**{**self.architectures[name.lower()], **overrides})

    def read_config(self, folder: Path):
        return read_bamba_config(folder), "hf"

    def claims_config(self, raw: dict) -> bool:
        return raw.get("model_type") == "bamba"


__all__ = ["BambaLM", "load_bamba", "read_bamba_config", "BambaFamily", "BAMBA_ARCHITECTURES"]
