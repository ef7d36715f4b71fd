"""The mixer and its extension points, against a plainly written float64 re-statement of the block math.

The adapters here are minimal test-local stand-ins for the PEFT methods of the next layer: a module wrapped
around each projection, a parametrized delta on each tensor, soft tokens through a hook, extra state
dimensions through a hook. Each must change the output where expected, leave it exactly alone where not,
receive gradients, and work in step-by-step decoding too.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

import mambapeft
from mambapeft import MambaMixer, MixerState, PeftHook, selective_scan_reference
from mambapeft.model.mamba import DIRECTION_NAMES

from conftest import assert_rel_close

D_MODEL, N_STATE, K = 24, 6, 3


def make_mixer(bidirectional=False, seed=0, **kw):
    torch.manual_seed(seed)
    mixer = MambaMixer(D_MODEL, d_state=N_STATE, d_conv=K, bidirectional=bidirectional, **kw)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return mixer


# ---------------------------------------------------------------- the reference


def _f64(t):
    return None if t is None else t.detach().double()


def reference_direction(mixer, xz, direction, extra=None):
    """conv -> silu -> x_proj -> dt -> scan -> gate, for one direction; xz (b, L, 2E) float64 -> (b, L, E)."""
    names = DIRECTION_NAMES[direction]
    conv, x_proj, dt_proj = (getattr(mixer, names[k]) for k in ("conv1d", "x_proj", "dt_proj"))
    E, L = mixer.d_inner, xz.shape[1]
    x, z = xz[..., :E], xz[..., E:]
    x = F.conv1d(x.mT, _f64(conv.weight), _f64(conv.bias), padding=mixer.d_conv - 1, groups=E)[..., :L]
    x = F.silu(x).mT                                                             # (b, L, E)
    x_dbl = F.linear(x, _f64(x_proj.weight))
    dt_low, B, C = x_dbl.split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    dt = F.linear(dt_low, _f64(dt_proj.weight), _f64(dt_proj.bias))
    A_log = _f64(getattr(mixer, names["A_log"]))
    if extra is not None:
        A_log, B, C = extra(x, A_log, B, C)
    y = selective_scan_reference(x.mT, dt.mT, -torch.exp(A_log), B.mT, C.mT, _f64(getattr(mixer, names["D"])),
                                 z.mT, delta_softplus=True)
    return y.mT


def reference_mixer(mixer, h, prefix_xz=None, extra=None):
    xz = F.linear(_f64(h), _f64(mixer.in_proj.weight), _f64(mixer.in_proj.bias))
    n = 0
    if prefix_xz is not None:
        n = prefix_xz.shape[0]
        xz = torch.cat([_f64(prefix_xz).expand(xz.shape[0], -1, -1), xz], dim=1)
    y = reference_direction(mixer, xz, 0, extra)
    if mixer.bidirectional:
        y = (y + reference_direction(mixer, xz.flip(1), 1, extra).flip(1)) / 2
    return F.linear(y[:, n:], _f64(mixer.out_proj.weight), _f64(mixer.out_proj.bias))


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_mixer_matches_reference(bidirectional, bias):
    mixer = make_mixer(bidirectional, bias=bias)
    h = torch.randn(2, 19, D_MODEL)
    assert_rel_close(mixer(h), reference_mixer(mixer, h))


def test_bidirectional_mixer_has_per_direction_parameters_and_no_state():
    mixer = make_mixer(bidirectional=True)
    names = {n for n, _ in mixer.named_parameters()}
    assert {"conv1d_b.weight", "x_proj_b.weight", "dt_proj_b.weight", "dt_proj_b.bias", "A_b_log", "D_b"} <= names
    assert not any(n.startswith(("in_proj_b", "out_proj_b")) for n in names)     # shared
    with pytest.raises(ValueError, match="no recurrent state"):
        mixer(torch.randn(1, 3, D_MODEL), state=MixerState())


# ---------------------------------------------------------------- module wrappers: nothing bypasses them


class Shifted(nn.Module):
    """Stand-in for an adapter wrapped around a layer: the layer's output plus a trainable shift."""

    def __init__(self, base, out_features):
        super().__init__()
        self.base = base
        self.shift = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        out = self.base(x)
        return out + (self.shift[:, None] if isinstance(self.base, nn.Conv1d) else self.shift)


@pytest.mark.parametrize("target", ["in_proj", "conv1d", "x_proj", "dt_proj", "out_proj", "conv1d_b", "x_proj_b"])
def test_wrapped_projection_is_used_and_trained(target):
    mixer = make_mixer(bidirectional=target.endswith("_b"))
    base = getattr(mixer, target)
    width = base.out_channels if isinstance(base, nn.Conv1d) else base.out_features
    h = torch.randn(2, 9, D_MODEL)
    before = mixer(h).detach()
    setattr(mixer, target, Shifted(base, width))
    assert torch.equal(mixer(h), before)                          # zero shift: exactly the same
    with torch.no_grad():
        getattr(mixer, target).shift.normal_()
    out = mixer(h)
    assert not torch.allclose(out, before)
    out.square().sum().backward()
    assert getattr(mixer, target).shift.grad.abs().sum() > 0


@pytest.mark.parametrize("target", ["in_proj", "conv1d", "x_proj", "dt_proj", "out_proj"])
def test_wrapped_projection_is_used_when_decoding_step_by_step(target):
    model = mambapeft.from_config("tiny", seed=1).eval()
    for layer in model.backbone.layers:
        base = getattr(layer.mixer, target)
        width = base.out_channels if isinstance(base, nn.Conv1d) else base.out_features
        wrapped = Shifted(base, width)
        nn.init.normal_(wrapped.shift, std=0.5)
        setattr(layer.mixer, target, wrapped)
    ids = torch.randint(0, 1024, (1, 8))
    with torch.no_grad():
        full = model(ids).logits
        state = model.new_state()
        steps = torch.cat([model(ids[:, t : t + 1], state=state).logits for t in range(8)], dim=1)
    assert_rel_close(steps, full)


# ---------------------------------------------------------------- parametrized deltas on tensors


class AddDelta(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(shape))

    def forward(self, original):
        return original + self.delta


@pytest.mark.parametrize("owner, name",
                         [("", "A_log"), ("", "D"), ("conv1d", "weight"), ("dt_proj", "bias"), ("", "A_b_log")])
def test_parametrized_delta_is_used_trained_and_foldable(owner, name):
    mixer = make_mixer(bidirectional=name == "A_b_log")
    module = getattr(mixer, owner) if owner else mixer
    h = torch.randn(2, 10, D_MODEL)
    before = mixer(h).detach()
    parametrize.register_parametrization(module, name, AddDelta(getattr(module, name).shape))
    assert torch.equal(mixer(h), before)
    delta = module.parametrizations[name][0].delta
    with torch.no_grad():
        delta.normal_(std=0.1)
    out = mixer(h)
    assert not torch.allclose(out, before)
    out.square().sum().backward()
    assert delta.grad.abs().sum() > 0
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)     # "merge"
    assert_rel_close(mixer(h), out)


# ---------------------------------------------------------------- soft tokens through hooks


class SoftTokens(PeftHook):
    """Stand-in for affix/prompt tuning: n trainable tokens at `where` ("prefix" or "suffix") of `stage`."""

    def __init__(self, stage, width, n=3, where="prefix"):
        super().__init__()
        self.stage, self.where = stage, where
        self.tokens_ = nn.Parameter(torch.randn(n, width) * 0.5)

    def tokens(self, stage, direction, length, offset):
        if stage != self.stage or offset > 0:     # once per sequence, not at every generation step
            return None
        n = self.tokens_.shape[0]
        start = 0 if self.where == "prefix" else length
        return self.tokens_, torch.arange(start, start + n)


def test_prefix_tokens_after_in_proj_match_reference_and_get_gradients():
    mixer = make_mixer()
    hook = SoftTokens("after_in_proj", 2 * mixer.d_inner)
    mixer.hooks.append(hook)
    h = torch.randn(2, 11, D_MODEL)
    out = mixer(h)
    assert out.shape == h.shape                                   # inserted positions dropped again, in order
    assert_rel_close(out, reference_mixer(mixer, h, prefix_xz=hook.tokens_))
    out.square().sum().backward()
    assert hook.tokens_.grad[:, : mixer.d_inner].abs().min() > 0   # the X half feeds the scan


def test_per_direction_tokens_in_a_bidirectional_mixer():
    mixer = make_mixer(bidirectional=True)
    mixer.hooks.append(SoftTokens("after_in_proj", 2 * mixer.d_inner))
    h = torch.randn(1, 7, D_MODEL)
    out = mixer(h)
    assert out.shape == h.shape
    out.sum().backward()
    assert mixer.hooks[0].tokens_.grad.abs().sum() > 0


def test_suffix_tokens_leave_causal_outputs_alone():
    mixer = make_mixer()
    h = torch.randn(2, 8, D_MODEL)
    before = mixer(h)
    mixer.hooks.append(SoftTokens("after_in_proj", 2 * mixer.d_inner, where="suffix"))
    assert_rel_close(mixer(h), before)


def test_tokens_before_in_proj():
    mixer = make_mixer()
    hook = SoftTokens("before_in_proj", D_MODEL, n=2)
    mixer.hooks.append(hook)
    h = torch.randn(2, 6, D_MODEL)
    out = mixer(h)
    # reference: the tokens go through in_proj like any input, and are cut just before out_proj
    prefix_xz = F.linear(hook.tokens_.detach(), mixer.in_proj.weight)
    assert_rel_close(out, reference_mixer(mixer, h, prefix_xz=prefix_xz))
    out.sum().backward()
    assert hook.tokens_.grad.abs().sum() > 0


def test_prompt_tokens_at_the_model_level():
    model = mambapeft.from_config("tiny", seed=2)
    hook = SoftTokens("embeddings", 64, n=4)
    model.hooks.append(hook)
    ids = torch.randint(0, 1024, (2, 9))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 9, 1024)
    embeds = torch.cat([hook.tokens_.expand(2, -1, -1), model.backbone.embeddings(ids)], dim=1)
    model.hooks = nn.ModuleList()
    reference = model(inputs_embeds=embeds).logits[:, 4:]
    assert_rel_close(out.logits, reference)
    out.loss.backward()
    assert hook.tokens_.grad.abs().sum() > 0


def test_soft_tokens_enter_the_recurrent_state_once():
    model = mambapeft.from_config("tiny", seed=3).eval()
    for layer in model.backbone.layers:
        layer.mixer.hooks.append(SoftTokens("after_in_proj", 256))
    model.hooks.append(SoftTokens("embeddings", 64, n=2))
    ids = torch.randint(0, 1024, (1, 10))
    with torch.no_grad():
        full = model(ids).logits
        state = model.new_state()
        steps = [model(ids[:, :3], state=state).logits]
        steps += [model(ids[:, t : t + 1], state=state).logits for t in range(3, 10)]
    assert_rel_close(torch.cat(steps, dim=1), full)
    generated = model.generate(ids, 5, eos_token_id=None)
    expected = ids
    with torch.no_grad():
        for _ in range(5):
            expected = torch.cat([expected, model(expected).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, expected)


def test_bad_token_positions_are_reported():
    class Bad(PeftHook):
        def tokens(self, stage, direction, length, offset):
            return (torch.zeros(2, 2 * 48), torch.tensor([0, 0])) if stage == "after_in_proj" else None

    mixer = make_mixer()
    mixer.hooks.append(Bad())
    with pytest.raises(ValueError, match="must be distinct"):
        mixer(torch.randn(1, 4, D_MODEL))


# ---------------------------------------------------------------- extra state dimensions through hooks


class ExtraStates(PeftHook):
    """Stand-in for additional scan: n more states, with their own A columns and B, C rows from x."""

    def __init__(self, mixer, n=4):
        super().__init__()
        self.A_log = nn.Parameter(torch.log(torch.arange(1.0, n + 1)).repeat(mixer.d_inner, 1))
        self.bc = nn.Linear(mixer.d_inner, 2 * n, bias=False)
        nn.init.zeros_(self.bc.weight)

    def extend_state(self, direction, x, A_log, B, C):
        B_new, C_new = self.bc(x).chunk(2, dim=-1)
        return torch.cat([A_log, self.A_log], 1), torch.cat([B, B_new], -1), torch.cat([C, C_new], -1)

    def reference(self, x, A_log, B, C):
        B_new, C_new = F.linear(x, _f64(self.bc.weight)).chunk(2, dim=-1)
        return torch.cat([A_log, _f64(self.A_log)], 1), torch.cat([B, B_new], -1), torch.cat([C, C_new], -1)


def test_extra_states_start_as_identity_then_match_reference():
    mixer = make_mixer()
    h = torch.randn(2, 12, D_MODEL)
    before = mixer(h).detach()
    hook = ExtraStates(mixer)
    mixer.hooks.append(hook)
    assert_rel_close(mixer(h), before, tol=1e-6)                  # zero B, C rows: the original states untouched
    with torch.no_grad():
        hook.bc.weight.normal_(std=0.3)
    out = mixer(h)
    assert not torch.allclose(out, before, atol=1e-4)
    assert_rel_close(out, reference_mixer(mixer, h, extra=hook.reference))
    out.sum().backward()
    assert hook.bc.weight.grad.abs().sum() > 0 and hook.A_log.grad.abs().sum() > 0


def test_extra_states_in_the_recurrent_state():
    model = mambapeft.from_config("tiny", seed=4).eval()
    for layer in model.backbone.layers:
        hook = ExtraStates(layer.mixer, n=5)
        nn.init.normal_(hook.bc.weight, std=0.3)
        layer.mixer.hooks.append(hook)
    ids = torch.randint(0, 1024, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        state = model.new_state()
        steps = torch.cat([model(ids[:, t : t + 1], state=state).logits for t in range(9)], dim=1)
    assert state.layers[0].ssm.shape == (2, 128, 16 + 5)
    assert_rel_close(steps, full)
