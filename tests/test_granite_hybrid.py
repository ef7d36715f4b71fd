"""Granite 4.0-H (`granitemoehybrid`) against transformers' GraniteMoeHybridForCausalLM (its CPU torch path) for the
same weights: logits, loss, gradients, padding, greedy generation with and without the cache, checkpoints both ways;
the roles of the layers beside the Mamba mixers; every registered method through the conformance battery.

transformers picks its grouped-matmul experts path on CPU, which refuses widths whose rows are not a multiple of 16
bytes; the tests with odd widths run its own loop over the experts instead (`_experts_implementation = "eager"`,
what our model uses too), the same math expert by expert.
"""

from __future__ import annotations

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
    torch.manual_seed(seed)
    hf = GraniteMoeHybridForCausalLM(cfg).eval()
    cfg._experts_implementation = "eager"
    with torch.no_grad():
        for p in hf.parameters():      # no parameter left at a constant init (norms 1, D 1, ...)
            p.add_(torch.randn_like(p) * jitter)
    ours = GraniteHybridLM(cfg).eval()
    load_state_dict_strict(ours, hf.state_dict(), "test")
    return hf, ours


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_loss_equal_transformers(name):
    hf, ours = twins(config(name))
    ids = torch.randint(0, VOCAB, (3, 21))            # odd length, across transformers' chunks of 8
    with torch.no_grad():
        expected = hf(ids, labels=ids, use_cache=False)     # (transformers 5.25 fails to mask an all-Mamba cache)
        got = ours(ids, labels=ids)
    assert_rel_close(got.logits, expected.logits, tol=1e-4, what="logits")
    assert_rel_close(got.loss, expected.loss, tol=1e-4, what="loss")


@pytest.mark.parametrize("name", ["MAM-rope-moe-gqa", "AMMA-nope-dense-tied"])
def test_left_padded_batch_equals_transformers_at_real_positions(name):
    hf, ours = twins(config(name))
    ids = torch.randint(0, VOCAB, (3, 15))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    mask[2, :1] = 0
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert_rel_close(got[real], expected[real], tol=1e-4, what="logits")
    assert torch.isfinite(got).all()


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
    hf, ours = twins(config(name))
    hf.train(), ours.train()
    ids = torch.randint(0, VOCAB, (2, 17))
    hf(ids, labels=ids).loss.backward()
    ours(ids, labels=ids).loss.backward()
    hf_params = dict(hf.named_parameters())
    assert {n for n, _ in ours.named_parameters()} == set(hf_params)
    for n, p in ours.named_parameters():
        if hf_params[n].grad is None:       # an expert no token was routed to
            assert p.grad is None or not p.grad.any(), n
            continue
        assert_rel_close(p.grad, hf_params[n].grad, tol=1e-4, what=n)


@pytest.mark.parametrize("name", ["MAM-rope-moe-gqa", "AMMA-nope-dense-tied", "MMMA-rope-mqa-biases"])
def test_greedy_generation_is_transformers_with_and_without_cache(name):
    hf, ours = twins(config(name), jitter=0.3)
    prompt = torch.randint(0, VOCAB, (2, 7))
    ours_tokens = ours.generate(prompt, max_new_tokens=8)
    for use_cache in (True, False):
        expected = hf.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=use_cache)
        assert torch.equal(ours_tokens, expected), use_cache


@pytest.mark.parametrize("name", ["MAM-rope-moe-gqa", "AMMA-nope-dense-tied"])
def test_state_continuation_equals_the_full_forward(name):
    """The prompt through the state, then three single tokens and a chunk of four: the logits and the KV cache of a
    full forward over the whole sequence."""
    _, ours = twins(config(name))
    ids = torch.randint(0, VOCAB, (2, 14))
    with torch.no_grad():
        full = ours(ids).logits
        state = ours.new_state()
        parts = [ours(ids[:, :7], state=state).logits]
        parts += [ours(ids[:, i : i + 1], state=state).logits for i in range(7, 10)]
        parts.append(ours(ids[:, 10:], state=state).logits)
    assert_rel_close(torch.cat(parts, dim=1), full, tol=1e-5)
    attention = [s for s in state.layers if hasattr(s, "key")]
    assert attention and all(s.key.shape[2] == 14 and s.offset == 14 for s in attention)


def test_padded_generation_equals_each_prompt_alone():
    _, ours = twins(config("MAM-rope-moe-gqa"), jitter=0.3)
    a, b = torch.randint(1, VOCAB, (1, 9)), torch.randint(1, VOCAB, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    together = ours.generate(batch, max_new_tokens=5, attention_mask=mask)
    assert torch.equal(together[0, 9:], ours.generate(a, max_new_tokens=5)[0, 9:])
    assert torch.equal(together[1, 9:], ours.generate(b, max_new_tokens=5)[0, 5:])


@pytest.mark.parametrize("name", ["MAM-rope-moe-gqa", "AMMA-nope-dense-tied"])
def test_checkpoints_both_ways(name, tmp_path):
    hf, ours = twins(config(name))
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        expected = hf(ids).logits
    ours.save_pretrained(tmp_path / "ours")
    back = GraniteMoeHybridForCausalLM.from_pretrained(tmp_path / "ours").eval()
    back.config._experts_implementation = "eager"
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_granite_hybrid(tmp_path / "hf")
    with torch.no_grad():
        assert_rel_close(back(ids).logits, expected, tol=1e-5, what="ours saved, transformers loads")
        assert_rel_close(loaded(ids).logits, expected, tol=1e-5, what="transformers saved, ours loads")


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
    peft = get_peft_model(ours, ["lora_attn:r=2"])
    # r (in + out) per projection: q 30 -> 30, k and v 30 -> 10, o 30 -> 30
    assert peft.parameter_counts()["trainable"] == 2 * ((30 + 30) + 2 * (30 + 10) + (30 + 30))
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
    per_expert = get_peft_model(ours, ["lora_experts:r=2"]).parameter_counts()["trainable"]
    assert per_expert == 3 * 3 * 2 * ((20 + 24) + (24 + 10))
    _, ours = twins(config("MAM-rope-moe-gqa"))
    shared = get_peft_model(ours, ["lora_experts:r=2,per_expert=false"]).parameter_counts()["trainable"]
    assert shared == 3 * 2 * ((20 + 24) + (24 + 10))


def test_lora_on_every_non_ssm_role_merges_into_a_checkpoint_transformers_loads(tmp_path):
    hf, ours = twins(config("MAM-rope-moe-gqa"))
    peft = get_peft_model(ours, ["lora_attn:r=2", "lora_mlp:r=3", "lora_experts:r=2", "lora_router:r=1",
                                 "lora_p_x:r=2"]).eval()
    conformance.randomize_adapter(peft)
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        adapted = peft(ids).logits
        assert (adapted - hf(ids).logits).abs().max() > 1e-3
    merged = peft.merge_and_unload()
    merged.save_pretrained(tmp_path)
    back = GraniteMoeHybridForCausalLM.from_pretrained(tmp_path).eval()
    back.config._experts_implementation = "eager"
    with torch.no_grad():
        assert_rel_close(back(ids).logits, adapted, tol=1e-4, what="merged, in transformers")


# ------------------------------------------------------------------ every method, through the conformance battery


FAMILY = "granitemoehybrid"


def test_every_method_has_a_case_or_a_reason():
    covered = {method for method, _, _ in conformance.cases(FAMILY)}
    for name, reason in conformance.applicability(FAMILY).items():
        if reason is None:
            assert name in covered, name
        else:
            assert reason.startswith(f"{name} does not apply to {FAMILY} models: ") and len(reason) > 50, reason
    expected = {"lora_p_x", "lora_in_proj", "lora_out_proj", "additional_scan", "affix", "prompt",
                "initial_state", "state_offset", "partial_norm", "lora_attn", "lora_mlp", "dora_attn", "lora_experts",
                "lora_router"}
    assert expected <= covered




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
