"""Generation with our own recurrent state: step decoding, greedy, sampling, against full forwards and transformers."""

import copy

import pytest
import torch
from transformers import FalconMambaConfig, MambaConfig

import mambapeft
from mambapeft.model.mamba import mixer as mixer_module

from conftest import assert_rel_close, twin_models

GEN_CONFIGS = {
    "K4": dict(hidden_size=48, num_hidden_layers=2, vocab_size=97, state_size=16),
    "K2-N5": dict(hidden_size=40, num_hidden_layers=3, vocab_size=64, state_size=5, conv_kernel=2, use_bias=True),
}


def models(name, varied=True):
    # varied: larger random weights keep a random model from echoing its last token forever
    config = MambaConfig(**GEN_CONFIGS[name], eos_token_id=None)
    return twin_models(config, jitter=0.5, embed_std=1.0) if varied else twin_models(config)


@pytest.mark.parametrize("name", GEN_CONFIGS)
@pytest.mark.parametrize("split", [1, 4, 11])
def test_step_by_step_logits_equal_full_forward(name, split):
    _, ours = models(name, varied=False)
    ids = torch.randint(0, ours.config.vocab_size, (2, 16))
    with torch.no_grad():
        full = ours(ids).logits
        state = ours.new_state()
        parts = [ours(ids[:, :split], state=state).logits]
        for t in range(split, 16):
            parts.append(ours(ids[:, t : t + 1], state=state).logits)
    assert state.offset == 16
    assert_rel_close(torch.cat(parts, dim=1), full, tol=1e-5)


@pytest.mark.parametrize("name", GEN_CONFIGS)
def test_greedy_equals_argmax_of_full_forward_and_transformers(name):
    hf, ours = models(name)
    ids = torch.randint(0, ours.config.vocab_size, (2, 7))
    generated = ours.generate(ids, max_new_tokens=15)
    assert generated.shape == (2, 22) and torch.equal(generated[:, :7], ids)
    assert min(row.unique().numel() for row in generated[:, 7:]) >= 6     # a varied sequence: the test means something

    expected = ids
    with torch.no_grad():
        for _ in range(15):
            next_token = ours(expected).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, next_token], dim=1)
    assert torch.equal(generated, expected)

    hf_generated = hf.generate(ids, max_new_tokens=15, do_sample=False)
    assert torch.equal(generated, hf_generated)


STEP_CONFIGS = {
    **{name: MambaConfig(**kw, eos_token_id=None) for name, kw in GEN_CONFIGS.items()},
    "falcon": FalconMambaConfig(hidden_size=40, num_hidden_layers=2, vocab_size=80, state_size=8),   # B/C/dt norms
}


@pytest.mark.parametrize("name", STEP_CONFIGS)
def test_one_token_step_equals_the_full_forward(name, monkeypatch):
    """A length-1 input that continues a state takes `step` (outside autograd); with autograd on it takes the
    full path. Both give the same logits and leave the same state, padded rows included."""
    _, ours = twin_models(STEP_CONFIGS[name])
    steps = []
    real_step = mixer_module.MambaMixer.step

    def counted_step(self, *args, **kwargs):
        steps.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(mixer_module.MambaMixer, "step", counted_step)
    ids = torch.randint(0, ours.config.vocab_size, (2, 10))
    with torch.no_grad():
        by_step = ours.new_state()
        ours(ids[:, :8], state=by_step)
    by_forward = copy.deepcopy(by_step)
    assert not steps
    for t, mask in ((8, None), (9, torch.tensor([[1], [0]]))):
        with torch.no_grad():
            stepped = ours(ids[:, t : t + 1], attention_mask=mask, state=by_step).logits
        assert len(steps) == ours.config.num_hidden_layers
        full = ours(ids[:, t : t + 1], attention_mask=mask, state=by_forward).logits     # autograd on: full path
        assert len(steps) == ours.config.num_hidden_layers
        steps.clear()
        assert_rel_close(stepped, full, tol=1e-5, what=f"logits after token {t}")
        for a, b in zip(by_step.layers, by_forward.layers):
            assert a.offset == b.offset == t + 1
            assert_rel_close(a.conv, b.conv, tol=1e-6, what="conv state")
            assert_rel_close(a.ssm, b.ssm, tol=1e-5, what="scan state")


def test_decoding_does_not_rerun_the_prompt(monkeypatch):
    """The prompt runs once (one scan per layer); every new token is one length-1 step, with no scan call."""
    _, ours = models("K4")
    lengths = []                                                          # sequence lengths layer 0's in_proj sees
    in_proj = ours.backbone.layers[0].mixer.in_proj
    in_proj.register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
    scans = []                                                            # lengths of every scan call
    real_scan = mixer_module.selective_scan

    def counted_scan(u, *args, **kwargs):
        scans.append(u.shape[-1])
        return real_scan(u, *args, **kwargs)

    monkeypatch.setattr(mixer_module, "selective_scan", counted_scan)
    ids = torch.randint(0, 97, (2, 7))
    generated = ours.generate(ids, max_new_tokens=6)
    assert generated.shape == (2, 13)
    assert lengths == [7, 1, 1, 1, 1, 1]                 # the prompt, then each new token but the last once
    assert scans == [7, 7]                               # one scan per layer, over the prompt


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    _, ours = models("K4")
    ids = torch.randint(0, 97, (2, 5))
    run = lambda seed, **kw: ours.generate(ids, 12, do_sample=True, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(1, temperature=0.8, top_p=0.9), run(1, temperature=0.8, top_p=0.9))
    assert not torch.equal(run(1, temperature=2.0), run(2, temperature=2.0))
    assert torch.equal(run(3, top_k=1), ours.generate(ids, 12))


def test_eos_stops_and_pads_finished_rows():
    _, ours = models("K4")
    ids = torch.randint(0, 97, (2, 5))
    free = ours.generate(ids, 10, eos_token_id=None)
    eos = int(free[0, 7])                     # the token row 0 produces third
    stopped = ours.generate(ids, 10, eos_token_id=eos, pad_token_id=96)
    row0 = stopped[0, 5:].tolist()
    assert row0[:3] == free[0, 5:8].tolist() and all(t == 96 for t in row0[3:])
    if (free[1, 5:] == eos).any():
        return
    assert stopped.shape[1] == free.shape[1] and torch.equal(stopped[1], free[1])


def test_left_padded_batch_generates_like_single_prompts():
    _, ours = models("K4")
    short = torch.randint(1, 97, (1, 4))
    long = torch.randint(1, 97, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    together = ours.generate(batch, 8, attention_mask=mask)
    assert torch.equal(together[0, 5:], ours.generate(short, 8)[0])
    assert torch.equal(together[1], ours.generate(long, 8)[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
        (dict(do_sample=True, top_k=0), "top_k must be >= 1"),
        (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    ],
)
def test_bad_generation_options(kwargs, message):
    model = mambapeft.from_config("tiny")
    with pytest.raises(ValueError, match=message):
        model.generate(torch.zeros(1, 3, dtype=torch.long), **{"max_new_tokens": 2, **kwargs})


def test_generate_restores_training_mode():
    model = mambapeft.from_config("tiny").train()
    model.generate(torch.zeros(1, 3, dtype=torch.long), 2)
    assert model.training
