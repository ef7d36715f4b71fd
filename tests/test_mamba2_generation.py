"""Mamba-2 generation with our own recurrent state: the single-token step against full forwards and transformers."""

import pytest
import torch
from transformers import Mamba2Config

import mambapeft.model.mamba2.modeling as mamba2

from conftest import assert_rel_close, twin_models

GEN_CONFIGS = {
    "G1-K4": dict(hidden_size=32, num_heads=4, head_dim=16, n_groups=1, state_size=16),
    "G2-K3-P6-N5-bias": dict(hidden_size=24, num_heads=8, head_dim=6, n_groups=2, state_size=5, conv_kernel=3,
                             use_bias=True),
}


def models(name, varied=True):
    # varied: larger random weights keep a random model from echoing its last token forever
    config = Mamba2Config(**GEN_CONFIGS[name], num_hidden_layers=2, vocab_size=97, eos_token_id=None,
                          tie_word_embeddings=True, chunk_size=8)
    return twin_models(config, jitter=1.0, embed_std=1.0) if varied else twin_models(config)


@pytest.fixture
def no_chunked_scan(monkeypatch):
    """Makes any call of the chunked scan fail: what runs while it is set must be the step path."""
    def refuse(*args, **kwargs):
        raise AssertionError("the chunked scan ran for a single token with a state")

    def set_():
        monkeypatch.setattr(mamba2, "ssd_scan", refuse)

    return set_


@pytest.mark.parametrize("name", GEN_CONFIGS)
@pytest.mark.parametrize("split", [1, 4, 11])
def test_step_by_step_logits_equal_full_forward(name, split, no_chunked_scan):
    _, ours = models(name, varied=False)
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        full = ours(ids).logits
        state = ours.new_state()
        parts = [ours(ids[:, :split], state=state).logits]
        no_chunked_scan()
        for t in range(split, 16):
            parts.append(ours(ids[:, t : t + 1], state=state).logits)
    assert state.offset == 16
    layer = state.layers[0]
    mixer = ours.backbone.layers[0].mixer
    assert layer.conv.shape == (2, mixer.conv_dim, mixer.d_conv - 1)
    assert layer.ssm.shape == (2, mixer.num_heads, mixer.head_dim, mixer.d_state)
    assert_rel_close(torch.cat(parts, dim=1), full, tol=1e-5)


@pytest.mark.parametrize("name", GEN_CONFIGS)
def test_first_token_from_a_fresh_state_takes_the_step_path(name, no_chunked_scan):
    _, ours = models(name, varied=False)
    ids = torch.randint(0, 97, (3, 6))
    with torch.no_grad():
        full = ours(ids).logits
        no_chunked_scan()
        state = ours.new_state()
        steps = torch.cat([ours(ids[:, t : t + 1], state=state).logits for t in range(6)], dim=1)
    assert_rel_close(steps, full, tol=1e-5)


@pytest.mark.parametrize("name", GEN_CONFIGS)
def test_continued_state_equals_full_forward(name):
    """A prompt, then a chunk of several tokens from its state (the chunked scan with an initial state)."""
    _, ours = models(name, varied=False)
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = ours(ids).logits
        state = ours.new_state()
        first = ours(ids[:, :10], state=state).logits
        second = ours(ids[:, 10:27], state=state).logits
        third = ours(ids[:, 27:], state=state).logits
    assert_rel_close(torch.cat([first, second, third], dim=1), full, tol=1e-5)


@pytest.mark.parametrize("name", GEN_CONFIGS)
def test_greedy_equals_argmax_of_full_forward_and_transformers(name):
    hf, ours = models(name)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    generated = ours.generate(ids, max_new_tokens=15)
    assert generated.shape == (2, 22) and torch.equal(generated[:, :7], ids)
    assert min(row.unique().numel() for row in generated[:, 7:]) >= 6    # a varied sequence: the test means something

    expected = ids
    with torch.no_grad():
        for _ in range(15):
            next_token = ours(expected).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, next_token], dim=1)
    assert torch.equal(generated, expected)

    # an explicit mask: Mamba2Config's pad_token_id is 1, and transformers would take a prompt's 1s for padding
    hf_generated = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=15, do_sample=False)
    assert torch.equal(generated, hf_generated)


def test_left_padded_batch_generates_like_single_prompts():
    _, ours = models("G2-K3-P6-N5-bias")
    ours.backbone.layers[0].mixer.in_proj.bias.data.zero_()    # a bias would let padding reach the state
    ours.backbone.layers[1].mixer.in_proj.bias.data.zero_()
    short = torch.randint(1, 97, (1, 4))
    long = torch.randint(1, 97, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    together = ours.generate(batch, 8, attention_mask=mask)
    assert torch.equal(together[0, 5:], ours.generate(short, 8)[0])
    assert torch.equal(together[1], ours.generate(long, 8)[0])


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    _, ours = models("G1-K4")
    ids = torch.randint(0, 97, (2, 5))
    run = lambda seed, **kw: ours.generate(ids, 12, do_sample=True, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(1, temperature=0.8, top_p=0.9), run(1, temperature=0.8, top_p=0.9))
    assert not torch.equal(run(1, temperature=2.0), run(2, temperature=2.0))
    assert torch.equal(run(3, top_k=1), ours.generate(ids, 12))


def test_state_can_be_differentiated_through():
    """The step path replaces the state's tensors instead of writing them in place, so a loss on a step's output
    reaches the parameters through the prompt's state (what state-based methods train through)."""
    _, ours = models("G1-K4", varied=False)
    ids = torch.randint(0, 97, (1, 8))
    state = ours.new_state()
    ours(ids[:, :7], state=state)
    ours(ids[:, 7:], state=state).logits.sum().backward()
    grad = ours.backbone.layers[0].mixer.A_log.grad
    assert grad is not None and grad.abs().sum() > 0
