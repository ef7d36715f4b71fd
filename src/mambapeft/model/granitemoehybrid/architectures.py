"""Named Granite 4.0-H sizes, for `from_config` on the meta device (parameter counts without weights).

granite-4.0-h-350m: the published config's sizes (ibm-granite/granite-4.0-h-350m: 32 layers, attention at 10, 13,
17 and 27, NoPE, dense MLP, tied head), as a third-party test of that config.json lists them; not yet checked
against the hub file here (no network), so `test_granite_hybrid` checks the count by hand arithmetic only.
"""

from __future__ import annotations

from transformers import GraniteMoeHybridConfig

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


def granite_hybrid_config(name: str) -> GraniteMoeHybridConfig:
    return GraniteMoeHybridConfig(**GRANITE_HYBRID_ARCHITECTURES[name.lower()])
