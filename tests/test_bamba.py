"""Bamba (`bamba`) against transformers' BambaForCausalLM (its CPU torch path) for the same weights: logits, loss
(with its z-loss), greedy generation with and without the cache, checkpoints both ways, its MLP roles, and every
registered method through the conformance battery. The glue is Granite 4.0-H's (tests/test_granite_hybrid.py)."""

from __future__ import annotations

import hybrid_checks as checks
import pytest
from transformers import BambaConfig, BambaForCausalLM

from mambapeft import NotApplicable
from mambapeft.model.bamba import BambaLM, load_bamba
from mambapeft.model.granitemoehybrid.loading import load_state_dict_strict

VOCAB = 43
CONFIGS = {
    # partial rotary (half of each head), GQA, the z-loss on
    "MAMA-partial-rope": dict(hidden_size=24, num_hidden_layers=4, attn_layer_indices=[1, 3], num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=10, mamba_n_heads=6, mamba_d_state=5,
                              z_loss_coefficient=0.01, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                        "partial_rotary_factor": 0.5}),
    "AMM-mqa-odd": dict(hidden_size=20, num_hidden_layers=3, attn_layer_indices=[0], num_attention_heads=5,
                        num_key_value_heads=1, intermediate_size=7, mamba_n_heads=4, mamba_n_groups=2, mamba_d_state=3,
                        mamba_d_conv=3, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
}


def config(name: str, **extra) -> BambaConfig:
    return BambaConfig(**{"vocab_size": VOCAB, "mamba_chunk_size": 8, "bos_token_id": None, "eos_token_id": None,
                          "pad_token_id": None, **CONFIGS[name], **extra})


def twins(cfg: BambaConfig, seed: int = 0, jitter: float = 0.1):
    return checks.twins(BambaForCausalLM, BambaLM, cfg, load_state_dict_strict, seed=seed, jitter=jitter)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_loss_equal_transformers(name):
    checks.assert_logits_and_loss_equal(*twins(config(name)), length=21)


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_generation_is_transformers_with_and_without_cache(name):
    checks.assert_greedy_generation_equal(*twins(config(name), jitter=0.3))


def test_checkpoints_both_ways(tmp_path):
    checks.assert_checkpoints_both_ways(*twins(config("AMM-mqa-odd")), BambaForCausalLM, load_bamba, tmp_path)


def test_mlp_roles():
    _, ours = twins(config("MAMA-partial-rope"))       # 4 gated MLPs: gate and up 24 -> 10, down 10 -> 24
    assert checks.trainable(ours, "lora_mlp:r=2") == 4 * 2 * 3 * (24 + 10)
    with pytest.raises(NotApplicable, match="no experts"):
        ours.layer_tensors("router")


def test_every_method_has_a_case_or_a_reason():
    checks.assert_every_method_has_a_case_or_a_reason(
        "bamba", {"lora_p_x", "additional_scan", "affix", "prompt", "lora_attn", "lora_mlp", "dora_mlp"})
