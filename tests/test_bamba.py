"""Bamba (`bamba`) against transformers' BambaForCausalLM (its CPU torch path) for the same weights: logits, loss
(with its z-loss), greedy generation with and without the cache, checkpoints both ways, its MLP roles, and every
registered method through the conformance battery. The glue is Granite 4.0-H's (tests/test_granite_hybrid.py)."""

from __future__ import annotations

import pytest
import test_conformance as conformance
import torch
from transformers import BambaConfig, BambaForCausalLM

from mambapeft import NotApplicable, get_peft_model
from mambapeft.model.bamba import BambaLM, load_bamba
from mambapeft.model.granitemoehybrid.loading import load_state_dict_strict

from conftest import assert_rel_close

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
    torch.manual_seed(seed)
    hf = BambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * jitter)
    ours = BambaLM(cfg).eval()
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


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_generation_is_transformers_with_and_without_cache(name):
    hf, ours = twins(config(name), jitter=0.3)
    prompt = torch.randint(0, VOCAB, (2, 7))
    ours_tokens = ours.generate(prompt, max_new_tokens=8)
    for use_cache in (True, False):
        assert torch.equal(ours_tokens, hf.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=use_cache))


def test_checkpoints_both_ways(tmp_path):
    hf, ours = twins(config("AMM-mqa-odd"))
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        expected = hf(ids, use_cache=False).logits
    ours.save_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        back = BambaForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert_rel_close(back(ids, use_cache=False).logits, expected, tol=1e-5, what="ours saved, transformers loads")
        assert_rel_close(load_bamba(tmp_path / "hf")(ids).logits, expected, tol=1e-5, what="transformers saved")


def test_mlp_roles():
    _, ours = twins(config("MAMA-partial-rope"))       # 4 gated MLPs: gate and up 24 -> 10, down 10 -> 24
    assert get_peft_model(ours, ["lora_mlp:r=2"]).parameter_counts()["trainable"] == 4 * 2 * 3 * (24 + 10)
    with pytest.raises(NotApplicable, match="no experts"):
        ours.layer_tensors("router")


FAMILY = "bamba"


def test_every_method_has_a_case_or_a_reason():
    covered = {method for method, _, _ in conformance.cases(FAMILY)}
    for name, reason in conformance.applicability(FAMILY).items():
        if reason is None:
            assert name in covered, name
        else:
            assert reason.startswith(f"{name} does not apply to {FAMILY} models: ") and len(reason) > 50, reason
    assert {"lora_p_x", "additional_scan", "affix", "prompt", "lora_attn", "lora_mlp", "dora_mlp"} <= covered


