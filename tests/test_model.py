"""Our language model against transformers' MambaForCausalLM (its CPU path) for the same weights."""

import pytest
import torch
from transformers import FalconMambaConfig, MambaConfig

import mambapeft

from conftest import assert_rel_close, twin_models

CONFIGS = {
    "d40": dict(hidden_size=40, num_hidden_layers=2, vocab_size=101),
    "d36-N7-K3-bias-noconvbias-R5": dict(hidden_size=36, num_hidden_layers=3, vocab_size=64, state_size=7,
                                          conv_kernel=3, use_bias=True, use_conv_bias=False, time_step_rank=5),
    "d24-N22-K2-bias-expand3": dict(hidden_size=24, num_hidden_layers=2, vocab_size=50, state_size=22,
                                    conv_kernel=2, use_bias=True, expand=3),
    "d50-N1-K4-untied": dict(hidden_size=50, num_hidden_layers=1, vocab_size=77, state_size=1,
                             use_conv_bias=False, tie_word_embeddings=False),
    "d64-N16-K5-residual-not-fp32": dict(hidden_size=64, num_hidden_layers=2, vocab_size=90, conv_kernel=5,
                                         residual_in_fp32=False),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_loss_equal_transformers(name):
    hf, ours = twin_models(MambaConfig(**CONFIGS[name]))
    ids = torch.randint(0, hf.config.vocab_size, (3, 29))
    with torch.no_grad():
        expected = hf(ids, labels=ids)
        got = ours(ids, labels=ids)
    assert_rel_close(got.logits, expected.logits, tol=1e-4, what="logits")
    assert_rel_close(got.loss, expected.loss, tol=1e-4, what="loss")


@pytest.mark.parametrize("name", CONFIGS)
def test_attention_mask_equals_transformers(name):
    hf, ours = twin_models(MambaConfig(**CONFIGS[name]))
    ids = torch.randint(0, hf.config.vocab_size, (3, 17))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    mask[2, :1] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, labels=labels)
        got = ours(ids, attention_mask=mask, labels=labels)
    assert_rel_close(got.logits, expected.logits, tol=1e-4, what="logits")
    assert_rel_close(got.loss, expected.loss, tol=1e-4, what="loss")


def test_left_padding_does_not_leak_into_real_tokens():
    """With the checkpoints' layout (no in_proj bias), a left-padded row gives the unpadded row's logits."""
    _, ours = twin_models(MambaConfig(**CONFIGS["d40"]))
    ids = torch.randint(1, 101, (1, 12))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = ours(ids).logits
        in_batch = ours(padded, attention_mask=mask).logits[:, 5:]
    assert_rel_close(in_batch, alone, tol=1e-5)


def test_gradients_equal_transformers():
    hf, ours = twin_models(MambaConfig(**CONFIGS["d36-N7-K3-bias-noconvbias-R5"]))
    hf.train(), ours.train()
    ids = torch.randint(0, 64, (2, 21))
    hf(ids, labels=ids).loss.backward()
    ours(ids, labels=ids).loss.backward()
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert_rel_close(p.grad, hf_grads[name].grad, tol=1e-4, what=name)


def test_falcon_mamba_equals_transformers():
    config = FalconMambaConfig(hidden_size=40, num_hidden_layers=2, vocab_size=80, state_size=8)
    hf, ours = twin_models(config)
    assert ours.backbone.layers[0].mixer.bcdt_rms_eps == config.mixer_rms_eps
    ids = torch.randint(0, 80, (2, 15))
    with torch.no_grad():
        assert_rel_close(ours(ids, labels=ids).logits, hf(ids, labels=ids).logits, tol=1e-4)


def test_named_architectures_and_hand_counted_sizes():
    counts = {name: sum(p.numel() for p in mambapeft.from_config(name, device="meta").parameters())
              for name in ("mamba-130m", "mamba-1.4b", "tiny")}
    # mamba-130m: embedding 50280*768 + 24 layers of (in_proj 768*3072 + conv 1536*(4+1) + x_proj 1536*80
    #   + dt_proj 48*1536+1536 + A_log 1536*16 + D 1536 + out_proj 1536*768 + norm 768) + norm_f 768
    layer_130m = 768 * 3072 + 1536 * 5 + 1536 * 80 + 48 * 1536 + 1536 + 1536 * 16 + 1536 + 1536 * 768 + 768
    assert counts["mamba-130m"] == 50280 * 768 + 24 * layer_130m + 768 == 129_135_360
    layer_14b = 2048 * 8192 + 4096 * 5 + 4096 * 160 + 128 * 4096 + 4096 + 4096 * 16 + 4096 + 4096 * 2048 + 2048
    assert counts["mamba-1.4b"] == 50280 * 2048 + 48 * layer_14b + 2048
    layer_tiny = 64 * 256 + 128 * 5 + 128 * 36 + 4 * 128 + 128 + 128 * 16 + 128 + 128 * 64 + 64
    assert counts["tiny"] == 1024 * 64 + 2 * layer_tiny + 64


def test_large_architectures_build_instantly_on_meta():
    import time

    start = time.perf_counter()
    model = mambapeft.from_config("mamba-2.8b", device="meta")
    assert time.perf_counter() - start < 5
    assert model.lm_head.weight is model.backbone.embeddings.weight
    assert model.backbone.layers[0].mixer.d_inner == 5120


def test_unknown_architecture_suggests_a_close_name():
    with pytest.raises(mambapeft.ConfigError, match="did you mean 'mamba-130m'"):
        mambapeft.from_config("mamba-130")


def test_random_init_is_reproducible_and_sane():
    a = mambapeft.from_config("tiny", seed=3)
    b = mambapeft.from_config("tiny", seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    mixer = a.backbone.layers[0].mixer
    assert torch.allclose(-torch.exp(mixer.A_log[0]), -torch.arange(1, 17, dtype=torch.float32))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6


def test_input_validation():
    model = mambapeft.from_config("tiny")
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


def test_inputs_embeds_equal_input_ids():
    model = mambapeft.from_config("tiny")
    ids = torch.randint(0, 1024, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(inputs_embeds=model.backbone.embeddings(ids)).logits)


def test_logits_to_keep_gives_the_last_positions_only():
    model = mambapeft.from_config("tiny", seed=0).eval()
    ids = torch.randint(0, 1024, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        assert torch.equal(model(ids, logits_to_keep=0).logits, full)
        assert_rel_close(model(ids, logits_to_keep=3).logits, full[:, -3:], tol=1e-6)
        assert model(ids, logits_to_keep=3).logits.shape == (2, 3, 1024)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)
