"""Jamba (`jamba`) against transformers' JambaForCausalLM (its CPU torch path) for the same weights: logits and loss
with MoE on and off and several layer patterns, left padding, greedy generation with and without the cache,
checkpoints in the published layout (one module per expert) both ways; its Mamba-1 mixers with the dt/B/C norms
taking the MambaPEFT Mamba-1 methods (x_proj, dt_proj, the dt/B/C rows); every registered method through the
conformance battery (tests/test_conformance.py). The glue is Granite 4.0-H's (tests/test_granite_hybrid.py)."""

from __future__ import annotations

import hybrid_checks as checks
import pytest
import test_conformance as conformance
import torch
from transformers import JambaConfig, JambaForCausalLM

from mambapeft import NotApplicable, get_peft_model
from mambapeft.model.jamba import JambaLM, load_jamba
from mambapeft.model.jamba.loading import load_state_dict_strict

from conftest import assert_rel_close

VOCAB = 41
CONFIGS = {
    # M A M A, experts (3, top 2) at the odd layers, GQA 4 over 2, dt rank 3
    "MAMA-moe": dict(hidden_size=20, num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1,
                     intermediate_size=9, num_attention_heads=4, num_key_value_heads=2, num_experts=3,
                     num_experts_per_tok=2, mamba_d_state=5, mamba_dt_rank=3, mamba_d_conv=3),
    # A M M, dense MLPs only (num_experts 1), MQA, biases on in_proj / out_proj, no conv bias, odd widths
    "AMM-dense-mqa": dict(hidden_size=18, num_hidden_layers=3, attn_layer_period=3, attn_layer_offset=0,
                          intermediate_size=7, num_attention_heads=3, num_key_value_heads=1, num_experts=1,
                          mamba_d_state=3, mamba_dt_rank=2, mamba_proj_bias=True, mamba_conv_bias=False,
                          tie_word_embeddings=True),
    # M M M A M, experts (4, top 1) at layers 0, 3 (period 3), expand 3
    "MMMAM-moe-top1": dict(hidden_size=12, num_hidden_layers=5, attn_layer_period=4, attn_layer_offset=3,
                           intermediate_size=11, num_attention_heads=2, num_key_value_heads=2, num_experts=4,
                           num_experts_per_tok=1, expert_layer_period=3, expert_layer_offset=0, mamba_expand=3,
                           mamba_d_state=4, mamba_dt_rank=5),
}


def config(name: str, **extra) -> JambaConfig:
    cfg = JambaConfig(**{"vocab_size": VOCAB, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
                         "use_mamba_kernels": False, **CONFIGS[name], **extra})
    cfg._experts_implementation = "eager"     # transformers' own loop (its grouped matmul refuses odd widths on CPU)
    return cfg


def twins(cfg: JambaConfig, seed: int = 0, jitter: float = 0.1):
    return checks.twins(JambaForCausalLM, JambaLM, cfg, load_state_dict_strict, seed=seed, jitter=jitter)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_loss_equal_transformers(name):
    checks.assert_logits_and_loss_equal(*twins(config(name)), length=17)


def test_layer_pattern_and_parts_are_transformers():
    _, ours = twins(config("MMMAM-moe-top1"))
    assert ours.layer_types() == ["mamba", "mamba", "mamba", "attention", "mamba"]
    parts = ours.part_types()
    assert [parts[f"model.layers.{i}.feed_forward"] for i in range(5)] == ["moe", "mlp", "mlp", "moe", "mlp"]


def test_left_padded_batch_equals_transformers_at_real_positions():
    checks.assert_left_padding_equal(*twins(config("MAMA-moe")), (3, 13), {0: 5})


@pytest.mark.parametrize("name", ["MAMA-moe", "AMM-dense-mqa"])
def test_greedy_generation_is_transformers_with_and_without_cache(name):
    checks.assert_greedy_generation_equal(*twins(config(name), jitter=0.3))


def test_checkpoints_both_ways_in_the_published_layout(tmp_path):
    keys = set(checks.assert_checkpoints_both_ways(*twins(config("MAMA-moe")), JambaForCausalLM, load_jamba, tmp_path))
    assert {"model.layers.1.feed_forward.experts.2.up_proj.weight", "model.layers.0.mamba.dt_layernorm.weight"} <= keys
    assert not any(k.endswith("gate_up_proj") for k in keys)


def test_mamba1_methods_reach_x_proj_dt_proj_and_the_rows_before_the_norms():
    _, ours = twins(config("MAMA-moe"))       # 2 Mamba layers: d 20, E 40, R 3, N 5
    E, R, N, r = 40, 3, 5, 2
    counts = {"lora_x_proj:r=2": 2 * r * (E + R + 2 * N), "lora_dt_proj:r=2": 2 * r * (R + E),
              "lora_p_b:r=2": 2 * r * (E + N), "lora_p_dt:r=2": 2 * r * (E + R)}
    for spec, expected in counts.items():
        assert checks.trainable(twins(config("MAMA-moe"))[1], spec) == expected, spec
    # the norms on dt, B and C sit between x_proj and the scan: a LoRA on x_proj changes what they normalise
    peft = get_peft_model(ours, ["lora_x_proj:r=2"])
    with torch.no_grad():
        for p in peft.base_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, VOCAB, (1, 9))
    merged = peft.merge_and_unload()
    assert_rel_close(merged(ids).logits, peft(ids).logits, tol=1e-5, what="merged x_proj LoRA")


def test_roles():
    _, ours = twins(config("MAMA-moe"))       # dense MLPs at layers 0 and 2 (20 -> 9 -> 20), gated
    assert checks.trainable(ours, "lora_mlp:r=2") == 2 * 2 * 3 * (20 + 9)
    _, dense = twins(config("AMM-dense-mqa"))
    with pytest.raises(NotApplicable, match="no experts"):
        dense.layer_tensors("router")


def test_every_method_has_a_case_or_a_reason():
    checks.assert_every_method_has_a_case_or_a_reason(
        "jamba", {"lora_p_x", "lora_p_dt", "lora_x_proj", "lora_dt_proj", "affix", "prompt", "sdt", "initial_state",
                  "state_offset", "lora_attn", "lora_mlp", "lora_experts", "lora_router"})
    # the one Mamba-1 method a merge could not keep exact through Jamba's norms on B and C
    assert "b_layernorm" in conformance.applicability("jamba")["additional_scan"]


def test_mambapeft_methods_lists_jamba_with_the_mamba1_methods():
    from mambapeft.cli.methods import applicability

    table = applicability()
    for name in ("lora_x_proj", "lora_dt_proj", "dora_x_proj", "lora_p_b", "sdt", "lora_experts", "lora_attn"):
        assert table[name]["jamba"] is None, name
    assert "b_layernorm" in table["additional_scan"]["jamba"]
    assert table["lora_x_proj"]["falcon_h1"] is not None        # Mamba-2: no x_proj
