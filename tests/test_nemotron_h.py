"""Nemotron-H (`nemotron_h`) against transformers' NemotronHForCausalLM (its CPU torch path) for the same weights:
logits, loss, gradients, padding, greedy generation with and without the cache, checkpoints in the published
layout both ways; its roles; every registered method through the conformance battery (tests/test_conformance.py).
The glue is Granite 4.0-H's (tests/test_granite_hybrid.py checks it more widely)."""

from __future__ import annotations

import pytest
import test_conformance as conformance
import torch
from transformers import NemotronHConfig, NemotronHForCausalLM

from mambapeft import NotApplicable, get_peft_model
from mambapeft.model.nemotron_h import NemotronHLM, load_nemotron_h
from mambapeft.model.nemotron_h.loading import load_state_dict_strict

from conftest import assert_rel_close

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


def twins(cfg: NemotronHConfig, seed: int = 0, jitter: float = 0.1):
    torch.manual_seed(seed)
    hf = NemotronHForCausalLM(cfg).eval()
    cfg._experts_implementation = "eager"     # transformers' own loop (its grouped matmul refuses odd widths on CPU)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * jitter)
        for layer in hf.model.layers:         # the router's correction bias is a buffer: move it too
            if hasattr(layer.mixer, "gate"):
                layer.mixer.gate.e_score_correction_bias.normal_(std=0.1)
    ours = NemotronHLM(cfg).eval()
    load_state_dict_strict(ours, hf.state_dict(), "test")
    return hf, ours


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_loss_equal_transformers(name):
    hf, ours = twins(config(name))
    ids = torch.randint(0, VOCAB, (3, 21))
    with torch.no_grad():
        expected = hf(ids, labels=ids, use_cache=False)
        got = ours(ids, labels=ids)
    assert_rel_close(got.logits, expected.logits, tol=1e-4, what="logits")
    assert_rel_close(got.loss, expected.loss, tol=1e-4, what="loss")


def test_left_padded_batch_equals_transformers_at_real_positions():
    hf, ours = twins(config("M-E-A-P-M"))
    ids = torch.randint(0, VOCAB, (3, 15))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, use_cache=False).logits
        got = ours(ids, attention_mask=mask).logits
    assert_rel_close(got[mask.bool()], expected[mask.bool()], tol=1e-4, what="logits")


def test_every_gradient_equals_transformers():
    hf, ours = twins(config("M-E-A-P-M"))
    hf.train(), ours.train()
    ids = torch.randint(0, VOCAB, (2, 17))
    hf(ids, labels=ids, use_cache=False).loss.backward()
    ours(ids, labels=ids).loss.backward()
    hf_params = dict(hf.named_parameters())
    assert {n for n, _ in ours.named_parameters()} == set(hf_params)
    for n, p in ours.named_parameters():
        if hf_params[n].grad is None:
            assert p.grad is None or not p.grad.any(), n
            continue
        assert_rel_close(p.grad, hf_params[n].grad, tol=1e-4, what=n)


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_generation_is_transformers_with_and_without_cache(name):
    hf, ours = twins(config(name), jitter=0.3)
    prompt = torch.randint(0, VOCAB, (2, 7))
    ours_tokens = ours.generate(prompt, max_new_tokens=8)
    for use_cache in (True, False):
        expected = hf.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=use_cache)
        assert torch.equal(ours_tokens, expected), use_cache


def test_checkpoints_both_ways_in_the_published_layout(tmp_path):
    from safetensors.torch import load_file

    hf, ours = twins(config("M-E-A-P-M"))
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        expected = hf(ids, use_cache=False).logits
    ours.save_pretrained(tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / "model.safetensors"))
    assert "backbone.layers.1.mixer.experts.3.up_proj.weight" in keys and not any(k.startswith("model.") for k in keys)
    back = NemotronHForCausalLM.from_pretrained(tmp_path / "ours").eval()
    back.config._experts_implementation = "eager"
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_nemotron_h(tmp_path / "hf")
    with torch.no_grad():
        assert_rel_close(back(ids, use_cache=False).logits, expected, tol=1e-5, what="ours saved, transformers loads")
        assert_rel_close(loaded(ids).logits, expected, tol=1e-5, what="transformers saved, ours loads")


def test_roles_and_layer_types():
    _, ours = twins(config("M-E-A-P-M"))
    assert ours.layer_types() == ["mamba", "moe", "attention", "mlp", "mamba"]
    assert ours.part_types()["model.layers.1.mixer"] == "moe"
    # lora_mlp: the MLP block (24 -> 10 -> 24) and the MoE's shared expert (24 -> 8 -> 24), r (in + out) each
    peft = get_peft_model(ours, ["lora_mlp:r=2"])
    assert peft.parameter_counts()["trainable"] == 2 * ((24 + 10) + (10 + 24) + (24 + 8) + (8 + 24))
    with pytest.raises(NotApplicable, match="no gate"):
        ours.layer_projections("gate_proj")


# ------------------------------------------------------------------ every method, through the conformance battery


FAMILY = "nemotron_h"


def test_every_method_has_a_case_or_a_reason():
    covered = {method for method, _, _ in conformance.cases(FAMILY)}
    for name, reason in conformance.applicability(FAMILY).items():
        if reason is None:
            assert name in covered, name
        else:
            assert reason.startswith(f"{name} does not apply to {FAMILY} models: ") and len(reason) > 50, reason
    assert {"lora_p_x", "additional_scan", "affix", "prompt", "state_offset", "lora_attn", "lora_mlp",
            "lora_experts", "lora_router"} <= covered


