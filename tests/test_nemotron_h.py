"""Nemotron-H (`nemotron_h`) against transformers' NemotronHForCausalLM (its CPU torch path) for the same weights:
logits, loss, gradients, padding, greedy generation with and without the cache, checkpoints in the published
layout both ways; its roles; every registered method through the conformance battery (tests/test_conformance.py).
The glue is Granite 4.0-H's (tests/test_granite_hybrid.py checks it more widely)."""

from __future__ import annotations

import hybrid_checks as checks
import pytest
from transformers import NemotronHConfig, NemotronHForCausalLM

from mambapeft import NotApplicable
from mambapeft.model.nemotron_h import NemotronHLM, load_nemotron_h
from mambapeft.model.nemotron_h.loading import load_state_dict_strict

VOCAB = 47
CONFIGS = {
    # inner width 5 x 7 = 35, not expand x d = 48; GQA 4 over 2; MoE of 4 experts, top 2, one group
    "M-E-A-P-M": dict(hidden_size=24, layers_block_type=["mamba", "moe", "attention", "mlp", "mamba"],
                      num_attention_heads=4, num_key_value_heads=2, head_dim=6, intermediate_size=10,
                      mamba_num_heads=5, mamba_head_dim=7, ssm_state_size=5, n_groups=1, n_routed_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=6, moe_shared_expert_intermediate_size=8),
    # MQA, two groups of B and C, grouped routing (2 groups of 3 experts, top group 1), biases, K=3
    "A-M-E-M-odd": dict(hidden_size=18, layers_block_type=["attention", "mamba", "moe", "mamba"],
                        num_attention_heads=3, num_key_value_heads=1, head_dim=5, intermediate_size=7,
                        mamba_num_heads=4, mamba_head_dim=5, ssm_state_size=3, n_groups=2, conv_kernel=3,
                        use_bias=True, use_conv_bias=False, n_routed_experts=6, n_group=2, topk_group=1,
                        num_experts_per_tok=2, moe_intermediate_size=5, moe_shared_expert_intermediate_size=3,
                        routed_scaling_factor=1.7),
}


def config(name: str, **extra) -> NemotronHConfig:
    fields = {"vocab_size": VOCAB, "num_hidden_layers": len(CONFIGS[name]["layers_block_type"]), "chunk_size": 8,
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **CONFIGS[name], **extra}
    return NemotronHConfig(**fields)


def move_router_bias(hf):
    """The router's correction bias is a buffer (the jitter moves parameters): move it too."""
    for layer in hf.model.layers:
        if hasattr(layer.mixer, "gate"):
            layer.mixer.gate.e_score_correction_bias.normal_(std=0.1)


def twins(cfg: NemotronHConfig, seed: int = 0, jitter: float = 0.1):
    return checks.twins(NemotronHForCausalLM, NemotronHLM, cfg, load_state_dict_strict, seed=seed, jitter=jitter,
                        eager_experts=True, perturb=move_router_bias)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_loss_equal_transformers(name):
    checks.assert_logits_and_loss_equal(*twins(config(name)), length=21)


def test_left_padded_batch_equals_transformers_at_real_positions():
    checks.assert_left_padding_equal(*twins(config("M-E-A-P-M")), (3, 15), {0: 6})


def test_every_gradient_equals_transformers():
    checks.assert_gradients_equal(*twins(config("M-E-A-P-M")))


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_generation_is_transformers_with_and_without_cache(name):
    checks.assert_greedy_generation_equal(*twins(config(name), jitter=0.3))


def test_checkpoints_both_ways_in_the_published_layout(tmp_path):
    keys = set(checks.assert_checkpoints_both_ways(*twins(config("M-E-A-P-M")), NemotronHForCausalLM,
                                                   load_nemotron_h, tmp_path))
    assert "backbone.layers.1.mixer.experts.3.up_proj.weight" in keys and not any(k.startswith("model.") for k in keys)


def test_roles_and_layer_types():
    _, ours = twins(config("M-E-A-P-M"))
    assert ours.layer_types() == ["mamba", "moe", "attention", "mlp", "mamba"]
    assert ours.part_types()["model.layers.1.mixer"] == "moe"
    # lora_mlp: the MLP block (24 -> 10 -> 24) and the MoE's shared expert (24 -> 8 -> 24), r (in + out) each
    assert checks.trainable(ours, "lora_mlp:r=2") == 2 * ((24 + 10) + (10 + 24) + (24 + 8) + (8 + 24))
    with pytest.raises(NotApplicable, match="no gate"):
        ours.layer_projections("gate_proj")


# ------------------------------------------------------------------ every method, through the conformance battery


def test_every_method_has_a_case_or_a_reason():
    checks.assert_every_method_has_a_case_or_a_reason(
        "nemotron_h", {"lora_p_x", "additional_scan", "affix", "prompt", "state_offset", "lora_attn", "lora_mlp",
                       "lora_experts", "lora_router"})
