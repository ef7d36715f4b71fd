"""Falcon-H1 (`falcon_h1`) against transformers' FalconH1ForCausalLM (its CPU torch path) for the same weights, on
configs whose µP multipliers are all far from 1 (each in_proj block its own factor): logits and loss, left padding,
greedy generation with and without the cache, checkpoints both ways; a merged model (LoRA on in_proj's blocks,
whose delta lands before the µP vector, and partial A_log / D tuning) saved and loaded by transformers equals the
adapted model; every registered method through the conformance battery (tests/test_conformance.py)."""

from __future__ import annotations

import hybrid_checks as checks
import pytest
import torch
from transformers import FalconH1Config, FalconH1ForCausalLM

from mambapeft import NotApplicable, get_peft_model
from mambapeft.model.falcon_h1 import FalconH1LM, load_falcon_h1
from mambapeft.model.falcon_h1.loading import load_state_dict_strict

from conftest import assert_rel_close

VOCAB = 37
MULTIPLIERS = dict(embedding_multiplier=2.5, lm_head_multiplier=0.3, key_multiplier=0.6, attention_in_multiplier=1.7,
                   attention_out_multiplier=0.4, ssm_in_multiplier=1.5, ssm_out_multiplier=0.35,
                   mlp_multipliers=[0.7, 1.8], ssm_multipliers=[0.3, 2.5, 0.6, 1.9, 0.45])
CONFIGS = {
    # the grouped gated norm after the gate (mamba_ssm's), 2 groups, GQA 4 over 2, inner width 20 (not 2 x 16)
    "gated-norm-groups": dict(hidden_size=16, num_hidden_layers=2, intermediate_size=10, num_attention_heads=4,
                              num_key_value_heads=2, mamba_d_ssm=20, mamba_n_heads=4, mamba_d_head=5,
                              mamba_d_state=6, mamba_n_groups=2, mamba_d_conv=3, mamba_rms_norm=True,
                              mamba_norm_before_gate=False, **MULTIPLIERS),
    # the norm before the gate, MQA, biases everywhere they may be, a tied head, other multipliers
    "norm-before-gate-mqa-bias": dict(hidden_size=18, num_hidden_layers=3, intermediate_size=7, num_attention_heads=3,
                                      num_key_value_heads=1, mamba_d_ssm=24, mamba_n_heads=3, mamba_d_head=8,
                                      mamba_d_state=5, mamba_rms_norm=True, mamba_norm_before_gate=True,
                                      mamba_proj_bias=True, projectors_bias=True, attention_bias=True, mlp_bias=True,
                                      tie_word_embeddings=True, **{**MULTIPLIERS, "ssm_multipliers":
                                                                   [2.2, 0.35, 1.6, 0.5, 3.0], "key_multiplier": 2.5}),
    # no norm (y * silu(z) alone, as the published 0.5B), one layer
    "no-norm": dict(hidden_size=12, num_hidden_layers=1, intermediate_size=9, num_attention_heads=2,
                    num_key_value_heads=2, mamba_d_ssm=12, mamba_n_heads=2, mamba_d_head=6, mamba_d_state=4,
                    mamba_rms_norm=False, **MULTIPLIERS),
}


def config(name: str, **extra) -> FalconH1Config:
    return FalconH1Config(**{"vocab_size": VOCAB, "mamba_chunk_size": 8, "bos_token_id": None, "eos_token_id": None,
                             "pad_token_id": None, **CONFIGS[name], **extra})


def twins(cfg: FalconH1Config, seed: int = 0, jitter: float = 0.1):
    return checks.twins(FalconH1ForCausalLM, FalconH1LM, cfg, load_state_dict_strict, seed=seed, jitter=jitter)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_loss_equal_transformers(name):
    checks.assert_logits_and_loss_equal(*twins(config(name)), length=19)


def test_every_multiplier_is_honoured():
    """Each multiplier moved alone changes the logits, and ours follow transformers' for it (none is ignored)."""
    ids = torch.randint(0, VOCAB, (1, 6))
    before = twins(config("no-norm"))[1](ids).logits.detach()
    changes = {"embedding_multiplier": 1.3, "lm_head_multiplier": 0.9, "key_multiplier": 1.4,
               "attention_in_multiplier": 0.8, "attention_out_multiplier": 1.1, "ssm_in_multiplier": 0.7,
               "ssm_out_multiplier": 1.2, "mlp_multipliers": [1.3, 0.6], "ssm_multipliers": [1.1, 0.9, 1.7, 0.5, 4.0]}
    for key, value in changes.items():
        hf, ours = twins(config("no-norm", **{key: value}))
        with torch.no_grad():
            got, expected = ours(ids).logits, hf(ids, use_cache=False).logits
        assert not torch.allclose(got, before, atol=1e-5), key
        assert_rel_close(got, expected, tol=1e-4, what=key)


def test_left_padded_batch_equals_transformers_at_real_positions():
    checks.assert_left_padding_equal(*twins(config("gated-norm-groups")), (3, 13), {0: 5})


@pytest.mark.parametrize("name", ["gated-norm-groups", "no-norm"])
def test_greedy_generation_is_transformers_with_and_without_cache(name):
    checks.assert_greedy_generation_equal(*twins(config(name), jitter=0.3))


def test_checkpoints_both_ways(tmp_path):
    checks.assert_checkpoints_both_ways(*twins(config("norm-before-gate-mqa-bias")), FalconH1ForCausalLM,
                                        load_falcon_h1, tmp_path)


def test_merge_through_the_mup_vector_loads_in_transformers(tmp_path):
    """LoRA on every in_proj block (its delta is scaled by the µP vector, as the pretrained rows are) and partial
    A_log / D tuning, merged, saved, loaded by transformers: the adapted model's logits (the multipliers far from 1:
    a merge that ignored them, or put the delta after them, would be off by the factors)."""
    _, ours = twins(config("gated-norm-groups"))
    peft = get_peft_model(ours, ["lora_p_z:r=2", "lora_p_x:r=2", "lora_p_b:r=2", "lora_p_c:r=2", "lora_p_dt:r=2",
                                 "partial_a", "partial_d"]).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in peft.base_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        adapted = peft(ids).logits
        assert not torch.allclose(adapted, twins(config("gated-norm-groups"))[1](ids).logits, atol=1e-3)
    checks.assert_merged_loads_in_transformers(peft, adapted, FalconH1ForCausalLM, ids, tmp_path)


def test_roles_and_parts():
    _, ours = twins(config("gated-norm-groups"))
    assert ours.layer_types() == ["parallel", "parallel"]
    assert {ours.part_types()[f"model.layers.0.{p}"] for p in ("mamba", "self_attn", "feed_forward")} == {
        "mamba", "attention", "mlp"}
    # lora_mlp: 2 gated MLPs, gate and up 16 -> 10, down 10 -> 16
    assert checks.trainable(ours, "lora_mlp:r=2") == 2 * 2 * 3 * (16 + 10)
    with pytest.raises(NotApplicable, match="no experts"):
        ours.layer_tensors("router")
    _, plain = twins(config("no-norm"))
    with pytest.raises(NotApplicable, match="no norm weight"):
        get_peft_model(plain, ["partial_norm"])


def test_every_method_has_a_case_or_a_reason():
    checks.assert_every_method_has_a_case_or_a_reason(
        "falcon_h1", {"lora_p_x", "lora_p_dt", "lora_in_proj", "additional_scan", "affix", "prompt", "state_offset",
                      "initial_state", "partial_a", "partial_norm", "lora_attn", "lora_mlp", "dora_mlp"})


def test_mambapeft_methods_lists_falcon_h1():
    from mambapeft.cli.methods import applicability

    table = applicability()
    for name in ("lora_in_proj", "lora_p_dt", "additional_scan", "state_offset", "lora_attn", "dora_mlp",
                 "partial_norm"):
        assert table[name]["falcon_h1"] is None, name
    for name in ("lora_x_proj", "lora_dt_proj", "lora_experts", "lora_router"):
        assert table[name]["falcon_h1"] is not None, name
