"""Granite 4.0-H (`granitemoehybrid`) against transformers' GraniteMoeHybridForCausalLM (its CPU torch path) for the
same weights: logits, loss, gradients, padding, greedy generation with and without the cache, checkpoints both ways;
the roles of the layers beside the Mamba mixers; every registered method through the conformance battery.

transformers picks its grouped-matmul experts path on CPU, which refuses widths whose rows are not a multiple of 16
bytes; the tests with odd widths run its own loop over the experts instead (`_experts_implementation = "eager"`,
what our model uses too), the same math expert by expert.
"""

from __future__ import annotations

import hybrid_checks as checks
import pytest
import test_conformance as conformance
import torch
from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

from mambapeft import NotApplicable, get_peft_model
from mambapeft.model.granitemoehybrid import GraniteHybridLM, load_granite_hybrid
from mambapeft.model.granitemoehybrid.loading import load_state_dict_strict

from conftest import assert_rel_close

VOCAB = 53
M, A = "mamba", "attention"
# odd widths, GQA down to one KV head, MoE on and off, RoPE and NoPE, several layer patterns, Granite's multipliers
CONFIGS = {
    "MAM-rope-moe-gqa": dict(hidden_size=24, layer_types=[M, A, M], num_attention_heads=6, num_key_value_heads=2,
                             num_local_experts=3, num_experts_per_tok=2, intermediate_size=10,
                             shared_intermediate_size=14, mamba_n_heads=6, mamba_d_state=5,
                             position_embedding_type="rope"),
    "AMMA-nope-dense-tied": dict(hidden_size=20, layer_types=[A, M, M, A], num_attention_heads=5, num_key_value_heads=5,
                                 num_local_experts=0, shared_intermediate_size=13, mamba_n_heads=4, mamba_n_groups=2,
                                 mamba_d_state=7, mamba_d_conv=3, tie_word_embeddings=True),
    "MMMA-rope-mqa-biases": dict(hidden_size=30, layer_types=[M, M, M, A], num_attention_heads=3, num_key_value_heads=1,
                                 num_local_experts=4, num_experts_per_tok=1, intermediate_size=7,
                                 shared_intermediate_size=9, mamba_expand=1, mamba_n_heads=5, mamba_n_groups=5,
                                 mamba_d_state=3, mamba_proj_bias=True, mamba_conv_bias=False, attention_bias=True,
                                 position_embedding_type="rope"),
    "MM-moe-top3": dict(hidden_size=16, layer_types=[M, M], num_attention_heads=4, num_local_experts=5,
                        num_experts_per_tok=3, intermediate_size=6, shared_intermediate_size=5, mamba_n_heads=2,
                        mamba_d_state=9),
    "AA-rope-gqa": dict(hidden_size=28, layer_types=[A, A], num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                        num_local_experts=0, shared_intermediate_size=11, position_embedding_type="rope",
                        mamba_n_heads=2),
}
MULTIPLIERS = dict(embedding_multiplier=3.0, residual_multiplier=0.6, attention_multiplier=0.2, logits_scaling=2.5)


def config(name: str, **extra) -> GraniteMoeHybridConfig:
    fields = {"vocab_size": VOCAB, "num_hidden_layers": len(CONFIGS[name]["layer_types"]), "mamba_chunk_size": 8,
              "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
              **MULTIPLIERS, **CONFIGS[name], **extra}
    return GraniteMoeHybridConfig(**fields)


def twins(cfg: GraniteMoeHybridConfig, seed: int = 0, jitter: float = 0.1):
    """transformers' model with perturbed random weights, and ours with the same weights."""
    return checks.twins(GraniteMoeHybridForCausalLM, GraniteHybridLM, cfg, load_state_dict_strict, seed=seed,
                        jitter=jitter, eager_experts=True)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_loss_equal_transformers(name):
    checks.assert_logits_and_loss_equal(*twins(config(name)), length=21)     # odd, across transformers' chunks of 8


@pytest.mark.parametrize("name", ["MAM-rope-moe-gqa", "AMMA-nope-dense-tied"])
def test_left_padded_batch_equals_transformers_at_real_positions(name):
    checks.assert_left_padding_equal(*twins(config(name)), (3, 15), {0: 6, 2: 1})


def test_left_padding_does_not_leak_into_real_tokens():
    _, ours = twins(config("MAM-rope-moe-gqa"))
    ids = torch.randint(1, VOCAB, (1, 12))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = ours(ids).logits
        in_batch = ours(padded, attention_mask=mask).logits[:, 5:]
    assert_rel_close(in_batch, alone, tol=1e-5)


@pytest.mark.parametrize("name", ["MAM-rope-moe-gqa", "MMMA-rope-mqa-biases"])
def test_every_gradient_equals_transformers(name):
    checks.assert_gradients_equal(*twins(config(name)))


@pytest.mark.parametrize("name", ["MAM-rope-moe-gqa", "AMMA-nope-dense-tied", "MMMA-rope-mqa-biases"])
def test_greedy_generation_is_transformers_with_and_without_cache(name):
    checks.assert_greedy_generation_equal(*twins(config(name), jitter=0.3))


@pytest.mark.parametrize("name", ["MAM-rope-moe-gqa", "AMMA-nope-dense-tied"])
def test_state_continuation_equals_the_full_forward(name):
    """The logits and the KV cache of a full forward over the whole sequence (hybrid_checks)."""
    checks.assert_state_continuation_equals_full_forward(twins(config(name))[1], need_attention=True)


def test_padded_generation_equals_each_prompt_alone():
    checks.assert_padded_generation_equals_each_prompt_alone(twins(config("MAM-rope-moe-gqa"), jitter=0.3)[1])


@pytest.mark.parametrize("name", ["MAM-rope-moe-gqa", "AMMA-nope-dense-tied"])
def test_checkpoints_both_ways(name, tmp_path):
    checks.assert_checkpoints_both_ways(*twins(config(name)), GraniteMoeHybridForCausalLM, load_granite_hybrid,
                                        tmp_path)


def test_meta_device_build_and_load_from_meta(tmp_path):
    cfg = config("MAM-rope-moe-gqa")
    model = GraniteHybridLM(cfg, device="meta")
    assert model.lm_head.weight.is_meta
    assert set(model.state_dict()) == set(GraniteMoeHybridForCausalLM(cfg).state_dict())


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    from mambapeft.errors import CheckpointError

    hf, ours = twins(config("MAM-rope-moe-gqa"))
    state = hf.state_dict()
    state.pop("model.layers.1.self_attn.k_proj.weight")
    with pytest.raises(CheckpointError, match="k_proj"):
        load_state_dict_strict(GraniteHybridLM(config("MAM-rope-moe-gqa")), state, "test")


# ------------------------------------------------------------------ roles of the layers beside the mixers


def test_layer_types_and_parts():
    _, ours = twins(config("MMMA-rope-mqa-biases"))
    assert ours.layer_types() == ["mamba", "mamba", "mamba", "attention"]
    assert len(ours.peft_mixers()) == 3
    parts = ours.part_types()
    assert parts["model.layers.3.self_attn"] == "attention" and parts["model.layers.0.mamba"] == "mamba"
    assert parts["model.layers.2.block_sparse_moe"] == "moe" and parts["model.layers.1.shared_mlp"] == "mlp"


def test_attention_lora_is_counted_by_hand_and_refused_by_pure_ssm_models():
    _, ours = twins(config("MMMA-rope-mqa-biases"))      # one attention layer: d 30, 3 heads of 10, 1 KV head
    # r (in + out) per projection: q 30 -> 30, k and v 30 -> 10, o 30 -> 30
    assert checks.trainable(ours, "lora_attn:r=2") == 2 * ((30 + 30) + 2 * (30 + 10) + (30 + 30))
    pure = GraniteHybridLM(config("MM-moe-top3"))
    with pytest.raises(NotApplicable, match="lora_attn does not apply to granitemoehybrid models: .*no attention"):
        get_peft_model(pure, ["lora_attn"])
    import mambapeft

    with pytest.raises(NotApplicable, match="lora_q_proj does not apply to mamba2 models"):
        get_peft_model(mambapeft.from_config("mamba2-tiny"), ["lora_q_proj"])
    dense = GraniteHybridLM(config("AMMA-nope-dense-tied"))
    with pytest.raises(NotApplicable, match="no experts"):
        get_peft_model(dense, ["lora_experts"])


def test_expert_lora_per_expert_and_shared_counts():
    _, ours = twins(config("MAM-rope-moe-gqa"))    # 3 MoE layers, 3 experts: gate_up (3, 20, 24), down (3, 24, 10)
    assert checks.trainable(ours, "lora_experts:r=2") == 3 * 3 * 2 * ((20 + 24) + (24 + 10))
    _, ours = twins(config("MAM-rope-moe-gqa"))
    assert checks.trainable(ours, "lora_experts:r=2,per_expert=false") == 3 * 2 * ((20 + 24) + (24 + 10))


def test_lora_on_every_non_ssm_role_merges_into_a_checkpoint_transformers_loads(tmp_path):
    hf, ours = twins(config("MAM-rope-moe-gqa"))
    peft = get_peft_model(ours, ["lora_attn:r=2", "lora_mlp:r=3", "lora_experts:r=2", "lora_router:r=1",
                                 "lora_p_x:r=2"]).eval()
    conformance.randomize_adapter(peft)
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        adapted = peft(ids).logits
        assert (adapted - hf(ids).logits).abs().max() > 1e-3
    checks.assert_merged_loads_in_transformers(peft, adapted, GraniteMoeHybridForCausalLM, ids, tmp_path)


# ------------------------------------------------------------------ every method, through the conformance battery


def test_every_method_has_a_case_or_a_reason():
    checks.assert_every_method_has_a_case_or_a_reason(
        "granitemoehybrid", {"lora_p_x", "lora_in_proj", "lora_out_proj", "additional_scan", "affix", "prompt",
                             "initial_state", "state_offset", "partial_norm", "lora_attn", "lora_mlp", "dora_attn",
                             "lora_experts", "lora_router"})


# ------------------------------------------------------------------ sizes and reports


def test_granite_350m_on_meta_counts_by_hand():
    from mambapeft.model.granitemoehybrid import build_granite_hybrid, granite_hybrid_config

    model = build_granite_hybrid(granite_hybrid_config("granite-4.0-h-350m"), device="meta")
    assert model.layer_types().count("attention") == 4 and len(model.peft_mixers()) == 28
    d, E, H, N = 768, 1536, 48, 128
    conv = E + 2 * N                                                   # x, B, C through the conv
    mamba = d * (2 * E + 2 * N + H) + conv * 5 + 3 * H + E + E * d     # in_proj, conv, A_log D dt_bias, norm, out
    attention = d * d + 2 * d * (4 * 64) + d * d                       # q, k and v (4 KV heads of 64), o
    mlp = d * 2 * 2048 + 2048 * d                                      # input_linear (gate | up), output_linear
    total = 100352 * d + 28 * mamba + 4 * attention + 32 * (mlp + 2 * d) + d
    assert sum(p.numel() for p in model.parameters()) == total       # the tied head counted once
    assert 330e6 < total < 360e6


def test_trainable_counts_per_layer_type():
    from mambapeft.peft import trainable_by_layer_type

    _, ours = twins(config("MMMA-rope-mqa-biases"))
    peft = get_peft_model(ours, ["lora_attn:r=2", "lora_p_x:r=2", "lora_experts:r=1"])
    counts = trainable_by_layer_type(peft.base_model)
    assert counts["attention"] == {"trainable": 2 * (60 + 2 * 40 + 60), "layers": 1, "of": 1}
    assert counts["mamba"] == {"trainable": 3 * 2 * (30 + 30), "layers": 3, "of": 3}    # X rows: E = 30
    assert counts["moe"]["layers"] == 4 and counts["mlp"] == {"trainable": 0, "layers": 0, "of": 4}
    assert "other" not in counts


def test_shared_context_scoring_equals_per_pair_with_rope_and_soft_tokens():
    """Multiple-choice scoring joins the states of contexts of different lengths (model/lm.py cat_rows): the KV
    caches are left-padded and each row keeps its own RoPE positions, so the scores equal per-pair scoring."""
    from test_eval import assert_same_scores, random_requests
    from transformers import AutoTokenizer

    from mambapeft.assets import BUILTIN_MODEL
    from mambapeft.evaluation import multiple_choice as mc

    tokenizer = AutoTokenizer.from_pretrained(str(BUILTIN_MODEL))
    _, model = twins(config("MAM-rope-moe-gqa", vocab_size=len(tokenizer)), jitter=0.3)
    peft = get_peft_model(model, ["prompt:n=2", "lora_attn:r=2", "lora_p_x:r=2"], seed=0).eval()
    conformance.randomize_adapter(peft)
    requests = random_requests(tokenizer, peft)
    reference = mc.loglikelihoods_per_pair(peft, tokenizer, requests, batch_size=5)
    assert_same_scores(mc.loglikelihoods(peft, tokenizer, requests, batch_size=5), reference, "hybrid")


def test_params_prints_trainable_counts_per_layer_type(capsys):
    """`mambapeft params` on a hybrid's published size (the meta device: no weights)."""
    from mambapeft.cli.main import main

    assert main(["params", "--arch", "granite-4.0-h-350m", "-m", "lora_attn:r=8"]) == 0
    out = capsys.readouterr().out
    # q 768 -> 768, k and v 768 -> 256, o 768 -> 768: r (in + out) each, in 4 attention layers
    per_layer = 8 * ((768 + 768) + 2 * (768 + 256) + (768 + 768))
    assert f"{4 * per_layer:,}" in out
    assert "[attention]" in out and "in 4 of 4 attention parts" in out and "in 0 of 28 mamba parts" in out
