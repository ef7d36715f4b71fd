"""NVIDIA Nemotron-H (`nemotron_h`): Mamba-2, attention, MLP and MoE blocks (modeling.py), its checkpoints
(loading.py)."""

from __future__ import annotations

from pathlib import Path

from transformers import NemotronHConfig

from ..granitemoehybrid import HybridFamily
from ..registry import register_family
from .loading import (
    MODEL_TYPE,
    build_nemotron_h,
    from_published,
    load_nemotron_h,
    read_nemotron_h_config,
    save_nemotron_h,
)
from .modeling import NemotronHLM

# every block kind at odd small sizes: what checks build (`mambapeft methods`, the conformance battery)
NEMOTRON_H_ARCHITECTURES = {
    "nemotron-h-micro": dict(
        vocab_size=47, hidden_size=24, num_hidden_layers=5, layers_block_type=["mamba", "moe", "attention", "mlp",
                                                                               "mamba"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=6, intermediate_size=10, mamba_num_heads=5,
        mamba_head_dim=7, ssm_state_size=8, n_groups=1, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=8, moe_shared_expert_intermediate_size=8, chunk_size=8, bos_token_id=None,
        eos_token_id=None, pad_token_id=None),
}


@register_family
class NemotronHFamily(HybridFamily):
    name = "nemotron_h"
    title = "Nemotron-H"
    model_class = NemotronHLM
    config_class = NemotronHConfig
    architectures = NEMOTRON_H_ARCHITECTURES
    check_architecture = "nemotron-h-micro"
    transformers_class = "NemotronHForCausalLM"
    embedding_key = "model.embeddings.weight"

    def config(self, name: str, **overrides):
        return NemotronHConfig(**{**self.architectures[name.lower()], **overrides})

    def read_config(self, folder: Path):
        return read_nemotron_h_config(folder), "hf"

    def claims_config(self, raw: dict) -> bool:
        return raw.get("model_type") == MODEL_TYPE

    def normalise_keys(self, state: dict) -> dict:
        return from_published(state)

    def save(self, model, folder) -> None:
        save_nemotron_h(model, folder)


__all__ = ["NemotronHLM", "build_nemotron_h", "load_nemotron_h", "read_nemotron_h_config", "save_nemotron_h",
           "NemotronHFamily", "NEMOTRON_H_ARCHITECTURES"]
