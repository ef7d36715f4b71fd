"""Qwen3-Next (`qwen3_next`) against transformers' Qwen3NextForCausalLM for the same weights: logits and loss,
greedy generation with and without the cache, checkpoints both ways, its experts and shared experts as roles, and
every registered method through the conformance battery. The glue is shared with Qwen3.5 (tests/test_qwen3_5.py);
transformers runs its torch Gated DeltaNet path on CPU (see there)."""

from __future__ import annotations

import hybrid_checks as checks
import pytest
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

from mambapeft import NotApplicable
from mambapeft.errors import ConfigError
from mambapeft.model.qwen3_next import Qwen3NextLM, load_qwen3_next
from mambapeft.model.registry import get_family

VOCAB = 41
CONFIGS = {
    # experts with a shared expert on layers 0 and 2, a dense MLP on the attention layer (mlp_only_layers), value
    # heads 3 per key head, GQA, a quarter of each head rotated
    "LAL-moe-mlp": dict(hidden_size=20, num_hidden_layers=3, intermediate_size=9, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8,
                        layer_types=["linear_attention", "full_attention", "linear_attention"],
                        linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=4,
                        linear_value_head_dim=3, linear_conv_kernel_dim=3, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=5, shared_expert_intermediate_size=7, mlp_only_layers=[1]),
    # experts every second layer (decoder_sparse_step 2), no top-k renormalisation, MQA with biases, tied head
    "LLAL-sparse-step": dict(hidden_size=18, num_hidden_layers=4, intermediate_size=7, num_attention_heads=3,
                             num_key_value_heads=1, head_dim=6, attention_bias=True, tie_word_embeddings=True,
                             layer_types=["linear_attention", "linear_attention", "full_attention",
                                          "linear_attention"],
                             linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=5,
                             linear_value_head_dim=4, linear_conv_kernel_dim=4, num_experts=3, num_experts_per_tok=2,
                             norm_topk_prob=False, moe_intermediate_size=4, shared_expert_intermediate_size=6,
                             decoder_sparse_step=2,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
}

NAMES = list(CONFIGS)


def config(name: str, **extra) -> Qwen3NextConfig:
    cfg = Qwen3NextConfig(**{"vocab_size": VOCAB, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
                             **CONFIGS[name], **extra})
    cfg._experts_implementation = "eager"     # transformers' own loop (its grouped matmul refuses odd widths on CPU)
    return cfg


def twins(cfg, seed: int = 0, jitter: float = 0.1):
    return checks.twins(Qwen3NextForCausalLM, Qwen3NextLM, cfg, get_family("qwen3_next").load_state, seed=seed,
                        jitter=jitter)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_loss_equal_transformers(name):
    checks.assert_logits_and_loss_equal(*twins(config(name)), length=70)     # two of transformers' 64-token chunks


@pytest.mark.parametrize("name", CONFIGS)
def test_every_gradient_equals_transformers(name):
    checks.assert_gradients_equal(*twins(config(name)))


def test_state_continuation_equals_the_full_forward():
    checks.assert_state_continuation_equals_full_forward(twins(config(NAMES[0]))[1])


def test_padded_generation_equals_each_prompt_alone():
    checks.assert_padded_generation_equals_each_prompt_alone(twins(config(NAMES[0]), jitter=0.3)[1])


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_generation_is_transformers_with_and_without_cache(name):
    checks.assert_greedy_generation_equal(*twins(config(name), jitter=0.3), prompt_length=6, new_tokens=6)


def test_checkpoints_both_ways(tmp_path):
    written = checks.assert_checkpoints_both_ways(*twins(config("LLAL-sparse-step")), Qwen3NextForCausalLM,
                                                  load_qwen3_next, tmp_path)
    assert written["model.layers.1.mlp.experts.2.up_proj.weight"].shape == (4, 18)   # the published per-expert layout


def test_layer_parts_and_expert_roles_counted_by_hand():
    _, ours = twins(config("LAL-moe-mlp"))
    assert ours.layer_types() == ["mamba", "attention", "mamba"]
    assert ours.part_types() == {"model.layers.0.linear_attn": "mamba", "model.layers.0.mlp": "moe",
                                 "model.layers.1.self_attn": "attention", "model.layers.1.mlp": "mlp",
                                 "model.layers.2.linear_attn": "mamba", "model.layers.2.mlp": "moe"}

    def trainable(spec):
        return checks.trainable(ours, spec)

    d = 20
    # the dense MLP (20 -> 9 -> 20) and the two shared experts (20 -> 7 -> 20): gate, up and down each
    assert trainable("lora_mlp:r=2") == 2 * 3 * (d + 9) + 2 * 2 * 3 * (d + 7)
    # 4 experts per MoE layer, gate_up (10, 20) and down (20, 5), each its own pair
    assert trainable("lora_experts:r=1") == 2 * 4 * ((10 + d) + (d + 5))
    assert trainable("lora_router:r=1") == 2 * (4 + d)
    assert trainable("initial_state") == 2 * 6 * 4 * 3


def test_what_is_refused():
    _, ours = twins(config("LAL-moe-mlp"))
    for role in ("X", "B", "q"):                   # fused, interleaved per key head: no block of rows is one part
        with pytest.raises(NotApplicable, match="interleave"):
            ours.peft_mixers()[0].projections(role)
    with pytest.raises(ValueError, match="output_router_logits"):
        Qwen3NextLM(config("LAL-moe-mlp", output_router_logits=True), device="meta")
    cfg = config("LAL-moe-mlp", output_router_logits=True)
    from mambapeft.model.qwen3_next.loading import check_hybrid_config
    with pytest.raises(ConfigError, match="output_router_logits"):
        check_hybrid_config(cfg, "config.json")


def test_published_80b_a3b_builds_on_meta():
    from mambapeft.model import from_config

    model = from_config("qwen3-next-80b-a3b", device="meta")
    assert model.layer_types().count("attention") == 12 and len(model.peft_mixers()) == 36
    total = sum(p.numel() for p in model.parameters())
    assert 79e9 < total < 82e9                     # "80B"


def test_every_method_has_a_case_or_a_reason():
    checks.assert_every_method_has_a_case_or_a_reason(
        "qwen3_next", {"initial_state", "state_offset", "lora_in_proj", "lora_out_proj", "prompt", "lora_attn",
                       "lora_mlp", "lora_experts", "lora_router"})
