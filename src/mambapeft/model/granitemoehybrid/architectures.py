"""Named Granite 4.0-H sizes, for `from_config` on the meta device (parameter counts without weights).

granite-4.0-h-350m: the published config's sizes (ibm-granite/granite-4.0-h-350m: 32 layers, attention at 10, 13,
17 and 27, NoPE, dense MLP, tied head), as a third-party test of that config.json lists them; not yet checked
against the hub file here (no network), so `test_granite_hybrid` checks the count by hand arithmetic only.
"""

from __future__ import annotations

from transformers import GraniteMoeHybridConfig

from ...errors import ConfigError, did_you_mean

_ATTENTION_350M = (10, 13, 17, 27)

GRANITE_HYBRID_ARCHITECTURES = {
    "granite-4.0-h-350m": dict(
        vocab_size=100352, hidden_size=768, num_hidden_layers=32,
        layer_types=["attention" if i in _ATTENTION_350M else "mamba" for i in range(32)],
        num_attention_heads=12, num_key_value_heads=4, intermediate_size=2048, shared_intermediate_size=2048,
        num_local_experts=0, num_experts_per_tok=0, position_embedding_type="nope", mamba_n_heads=48,
        mamba_d_head=32, mamba_d_state=128, mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, mamba_conv_bias=True,
        mamba_proj_bias=False, attention_bias=False, rms_norm_eps=1e-5, tie_word_embeddings=True,
        embedding_multiplier=12.0, attention_multiplier=0.015625, residual_multiplier=0.246, logits_scaling=3.0,
        max_position_embeddings=32768, eos_token_id=100257,
    ),
}


# every part at odd small sizes (two Mamba-2 layers around a RoPE GQA attention layer, experts and the shared MLP,
# Granite's multipliers far from 1): what checks build (`mambapeft methods`, the conformance battery)
GRANITE_HYBRID_ARCHITECTURES["granite-hybrid-micro"] = dict(
    vocab_size=53, hidden_size=24, num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
    num_attention_heads=6, num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2, intermediate_size=8,
    shared_intermediate_size=14, mamba_n_heads=6, mamba_d_state=8, mamba_chunk_size=8, position_embedding_type="rope",
    tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None, embedding_multiplier=3.0,
    residual_multiplier=0.6, attention_multiplier=0.2, logits_scaling=2.5,
)


def granite_hybrid_config(name: str, **overrides) -> GraniteMoeHybridConfig:
    key = name.lower()
    if key not in GRANITE_HYBRID_ARCHITECTURES:
        known = GRANITE_HYBRID_ARCHITECTURES
        raise ConfigError(f"unknown Granite 4.0-H architecture {name!r}{did_you_mean(key, known)}; "
                          f"known: {', '.join(known)}")
    return GraniteMoeHybridConfig(**{**GRANITE_HYBRID_ARCHITECTURES[key], **overrides})
