"""The gated delta rule (scan/gated_delta.py) against its float64 recurrence and transformers' two torch functions, and
the Gated DeltaNet mixer (model/gated_deltanet.py) against transformers' Qwen3_5GatedDeltaNet and
Qwen3NextGatedDeltaNet with the same weights: forward, gradients, cached decoding; our step against our forward; the
PEFT interface (roles, refusals, initial state and offsets, soft tokens, padding)."""

from __future__ import annotations

import pytest
import torch

from mambapeft.errors import NotApplicable
from mambapeft.model.gated_deltanet import GatedDeltaNetMixer, GatedDeltaNetState, mixer_from_config
from mambapeft.model.hooks import PeftHook
from mambapeft.scan.gated_delta import gated_delta_rule, gated_delta_step
from mambapeft.scan.gated_delta_reference import gated_delta_rule_reference, l2_normalize

pytestmark = pytest.mark.filterwarnings("ignore")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    b = b.detach().double()
    return ((a.detach().double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def inputs(batch=2, length=37, key_heads=2, heads=4, d_k=8, d_v=6, dtype=torch.float64, seed=0, initial=True):
    """Random q, k, v, decays g <= 0 (some strong), beta in (0, 1), and an initial state (or None)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    g = -torch.nn.functional.softplus(r(batch, length, heads) * 2)
    beta = torch.rand(batch, length, heads, generator=gen, dtype=dtype)
    s0 = r(batch, heads, d_k, d_v) if initial else None
    return dict(q=r(batch, length, key_heads, d_k), k=r(batch, length, key_heads, d_k), v=r(batch, length, heads, d_v),
                g=g, beta=beta, initial_state=s0)


def outputs_and_grads(fn, args: dict, seed=1, **kwargs):
    """o, the final state, and the gradients of a random weighting of both with respect to every tensor input."""
    leaves = {name: t.clone().requires_grad_() for name, t in args.items() if t is not None}
    o, last = fn(**{**args, **leaves}, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)).sum()
    loss = loss + (last * torch.randn(last.shape, generator=gen, dtype=torch.float64).to(last.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o, last, dict(zip(leaves, grads))


# ------------------------------------------------------------------ the scan


@pytest.mark.parametrize("length", [1, 5, 64, 130])
@pytest.mark.parametrize("initial", [True, False])
@pytest.mark.parametrize("l2norm", [True, False])
def test_chunked_equals_reference_float64(length, initial, l2norm):
    """Outputs, final state and the gradients of q, k, v, g, beta and the initial state, to float64 rounding; lengths
    below, at and not a multiple of the chunk; grouped heads (4 value heads on 2 key heads)."""
    args = inputs(length=length, initial=initial)
    o, last, grads = outputs_and_grads(gated_delta_rule, args, use_qk_l2norm=l2norm)
    o_ref, last_ref, grads_ref = outputs_and_grads(gated_delta_rule_reference, args, use_qk_l2norm=l2norm)
    assert o.dtype == last.dtype == torch.float64
    assert rel(o, o_ref) < 1e-11 and rel(last, last_ref) < 1e-11
    assert set(grads) == set(grads_ref) == {"q", "k", "v", "g", "beta"} | ({"initial_state"} if initial else set())
    for name in grads:
        assert rel(grads[name], grads_ref[name]) < 1e-10, name


def test_chunked_float32_close_to_reference():
    """float32 inputs on a long sequence with strong decays (float64 cumulative sums inside)."""
    args = inputs(batch=1, length=300, heads=2, key_heads=2, d_k=16, d_v=16, dtype=torch.float32, seed=3)
    o, last, grads = outputs_and_grads(gated_delta_rule, args, use_qk_l2norm=True)
    o_ref, last_ref, grads_ref = outputs_and_grads(gated_delta_rule_reference, args, use_qk_l2norm=True)
    assert o.dtype == torch.float32 and last.dtype == torch.float32
    assert rel(o, o_ref) < 1e-5 and rel(last, last_ref) < 1e-5
    for name in grads:
        assert rel(grads[name], grads_ref[name]) < 1e-4, name


def test_chunked_empty_sequence_and_shapes():
    args = inputs(length=0)
    o, last = gated_delta_rule(**args, output_final_state=True)
    assert o.shape == args["v"].shape and torch.equal(last, args["initial_state"])
    assert gated_delta_rule(**{**args, "initial_state": None})[1] is None
    with pytest.raises(ValueError, match="v must be"):
        gated_delta_rule(args["q"], args["k"], args["v"][:, :, :3], args["g"], args["beta"])


@pytest.mark.parametrize("grouped", [False, True])
def test_matches_transformers_torch_functions(grouped):
    """transformers' torch_chunk_gated_delta_rule and torch_recurrent_gated_delta_rule (the paths Qwen3.5 and
    Qwen3-Next run without flash-linear-attention), same float32 inputs: outputs, final states, and gradients
    against the chunked one."""
    from transformers.models.qwen3_next.modeling_qwen3_next import (
        torch_chunk_gated_delta_rule,
        torch_recurrent_gated_delta_rule,
    )

    args = inputs(batch=2, length=75, key_heads=2 if grouped else 4, heads=4, d_k=8, d_v=12, dtype=torch.float32)

    def hf(fn):
        return lambda q, k, v, g, beta, initial_state, output_final_state: fn(
            q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=True)

    o, last, grads = outputs_and_grads(gated_delta_rule, args, use_qk_l2norm=True)
    o_c, last_c, grads_c = outputs_and_grads(hf(torch_chunk_gated_delta_rule), args)
    o_r, last_r = hf(torch_recurrent_gated_delta_rule)(**args, output_final_state=True)
    for other, other_last in ((o_c, last_c), (o_r, last_r)):
        assert rel(o, other) < 1e-5 and rel(last, other_last) < 1e-5
    for name in grads:
        assert rel(grads[name], grads_c[name]) < 1e-4, name


def test_step_equals_forward():
    """gated_delta_step token by token == gated_delta_rule over the sequence (outputs and final state)."""
    args = inputs(length=21)
    o, last = gated_delta_rule(**args, output_final_state=True, use_qk_l2norm=True)
    state, steps = args["initial_state"], []
    for t in range(21):
        o_t, state = gated_delta_step(args["q"][:, t], args["k"][:, t], args["v"][:, t], args["g"][:, t],
                                      args["beta"][:, t], state, use_qk_l2norm=True)
        steps.append(o_t)
    assert rel(torch.stack(steps, 1), o) < 1e-12 and rel(state, last) < 1e-12


# ------------------------------------------------------------------ the mixer

CONFIG = dict(hidden_size=20, linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=8,
              linear_value_head_dim=6, linear_conv_kernel_dim=3, num_hidden_layers=1, rms_norm_eps=1e-6,
              layer_types=["linear_attention"])


def transformers_pair(layout: str, seed=0):
    """transformers' module for `layout` with random weights (norm and dt_bias too), and our mixer loaded from its
    state dict."""
    if layout == "qwen3_5":
        from transformers import Qwen3_5TextConfig as Config
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet as Module
    else:
        from transformers import Qwen3NextConfig as Config
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet as Module
    config = Config(**CONFIG)
    torch.manual_seed(seed)
    theirs = Module(config, 0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ours = mixer_from_config(config)
    ours.load_state_dict(theirs.state_dict())
    assert ours.layout == layout
    return config, theirs, ours


@pytest.mark.parametrize("layout", ["qwen3_5", "qwen3_next"])
def test_mixer_matches_transformers(layout):
    """Same weights, same input (length 70: two chunks, the second short): outputs and every parameter's gradient."""
    _, theirs, ours = transformers_pair(layout)
    h = torch.randn(2, 70, CONFIG["hidden_size"], generator=torch.Generator().manual_seed(1))
    weight = torch.randn(2, 70, CONFIG["hidden_size"], generator=torch.Generator().manual_seed(2))
    out_theirs, out_ours = theirs(h), ours(h)
    assert rel(out_ours, out_theirs) < 1e-5
    (out_theirs * weight).sum().backward()
    (out_ours * weight).sum().backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert rel(p.grad, theirs_grads[name].grad) < 1e-4, name


@pytest.mark.parametrize("layout", ["qwen3_5", "qwen3_next"])
def test_mixer_decoding_matches_transformers_cache(layout):
    """A prompt, then token by token: our state against transformers' DynamicCache (outputs, recurrent state, the
    conv inputs); and our step path against our own full forward."""
    from transformers import DynamicCache

    config, theirs, ours = transformers_pair(layout)
    h = torch.randn(2, 12, CONFIG["hidden_size"], generator=torch.Generator().manual_seed(3))
    cache, state = DynamicCache(config=config), GatedDeltaNetState()
    with torch.no_grad():
        full = ours(h)
        theirs_out = [theirs(h[:, :5], cache=cache)] + [theirs(h[:, t: t + 1], cache=cache) for t in range(5, 12)]
        ours_out = [ours(h[:, :5], state=state)] + [ours(h[:, t: t + 1], state=state) for t in range(5, 12)]
    assert rel(torch.cat(ours_out, 1), torch.cat(theirs_out, 1)) < 1e-5
    assert rel(torch.cat(ours_out, 1), full) < 1e-5
    assert rel(state.ssm, cache.get_recurrent_state(0)) < 1e-5
    conv = cache.get_conv_state(0)
    assert torch.allclose(state.conv, conv[..., conv.shape[-1] - state.conv.shape[-1]:], atol=1e-6)
    assert state.offset == 12


def test_mixer_continues_a_state_across_segments():
    """Forward over [0, 30) then [30, 75) with a state == one forward over [0, 75) (the chunked path both times)."""
    _, _, ours = transformers_pair("qwen3_5")
    h = torch.randn(1, 75, CONFIG["hidden_size"])
    state = GatedDeltaNetState()
    with torch.no_grad():
        parts = torch.cat([ours(h[:, :30], state=state), ours(h[:, 30:], state=state)], 1)
        assert rel(parts, ours(h)) < 1e-5


def state_hook(mixer, role: str, value: torch.Tensor):
    """methods/state.py's hook for `role` ("initial", "h" or "y") on this mixer, holding `value`."""
    from mambapeft.methods.state import StateTensors

    shape = mixer.channel_shape if role == "y" else mixer.state_shape
    hook = StateTensors(mixer, shape, role)
    with torch.no_grad():
        hook.values[0].copy_(value)
    return hook


def test_mixer_initial_state_and_offsets():
    """A learned initial state enters the scan (gradient included) and lives on through step; the offsets h' (read by
    the normalised, scaled query) and y' are added before the gated norm, in forward and in step alike."""
    _, _, mixer = transformers_pair("qwen3_5")
    H, d_k, d_v = mixer.state_shape
    gen = torch.Generator().manual_seed(4)
    h0, h_off, y_off = (torch.randn(*s, generator=gen) * 0.5 for s in ((H, d_k, d_v), (H, d_k, d_v), (H, d_v)))
    x = torch.randn(2, 9, CONFIG["hidden_size"], generator=gen)

    # the pre-norm output o, by our own chain of parts with the reference scan
    captured = {}
    mixer.norm.register_forward_hook(lambda module, args, out: captured.__setitem__("o", args[0]))
    mixer(x)
    o_plain = captured["o"]
    qkv, _, b, a = mixer._project(x)
    q, k, v = mixer._split_heads(torch.nn.functional.silu(mixer._causal_conv(qkv, None)))
    g, beta = mixer._gates(b, a, None)
    o_h0, _ = gated_delta_rule_reference(q, k, v, g, beta, initial_state=h0.expand(2, H, d_k, d_v),
                                         use_qk_l2norm=True)
    read = (l2_normalize(q) * d_k**-0.5).repeat_interleave(H // mixer.num_key_heads, dim=2)

    mixer.hooks.append(state_hook(mixer, "initial", h0))
    out = mixer(x)
    assert rel(captured["o"], o_h0) < 1e-5
    out.sum().backward()
    assert mixer.hooks[0].values[0].grad.abs().sum() > 0

    mixer.hooks[0] = state_hook(mixer, "h", h_off)
    mixer(x)
    assert rel(captured["o"], o_plain + torch.einsum("blhk,hkv->blhv", read, h_off)) < 1e-5
    mixer.hooks[0] = state_hook(mixer, "y", y_off)
    mixer(x)
    assert rel(captured["o"], o_plain + y_off) < 1e-5

    mixer.hooks[0] = state_hook(mixer, "initial", h0)          # step == forward with both
    mixer.hooks.append(state_hook(mixer, "h", h_off))
    state = GatedDeltaNetState()
    with torch.no_grad():
        full = mixer(x)
        steps = [mixer(x[:, :1], state=state)]                 # a fresh state: the chunked path, from h0
        steps += [mixer(x[:, t: t + 1], state=state) for t in range(1, 9)]
    assert rel(torch.cat(steps, 1), full) < 1e-5


def test_mixer_left_padding():
    """Left padding (mask 0) leaves the real tokens' outputs as without it, with and without an initial state."""
    _, _, mixer = transformers_pair("qwen3_5")
    x = torch.randn(1, 10, CONFIG["hidden_size"])
    padded = torch.cat([torch.randn(1, 4, CONFIG["hidden_size"]), x], 1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 10)], 1)
    with torch.no_grad():
        assert rel(mixer(padded, mask=mask)[:, 4:], mixer(x)) < 1e-5
        mixer.hooks.append(state_hook(mixer, "initial", torch.randn(mixer.state_shape)))
        assert rel(mixer(padded, mask=mask)[:, 4:], mixer(x)) < 1e-5


def test_mixer_peft_roles():
    """Roles of both layouts: layers, row blocks, Mamba's names for the same parts; tensors; refusals with reasons."""
    mixer = GatedDeltaNetMixer(16, num_key_heads=2, num_value_heads=4, key_head_dim=4, value_head_dim=3, d_conv=3)
    K, V = 8, 12
    assert [p.attr for p in mixer.projections("in_proj")] == ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"]
    assert mixer.projections("q")[0].rows == mixer.projections("C")[0].rows == (0, K)
    assert mixer.projections("k")[0].rows == mixer.projections("B")[0].rows == (K, 2 * K)
    assert mixer.projections("v")[0].rows == mixer.projections("X")[0].rows == (2 * K, 2 * K + V)
    assert mixer.projections("Z")[0].attr == "in_proj_z" and mixer.projections("dt")[0].attr == "in_proj_a"
    assert mixer.projections("out_proj")[0].layer is mixer.out_proj
    for role in ("A_log", "dt_bias", "conv", "norm"):
        assert mixer.tensors(role)[0].value.shape == {"A_log": (4,), "dt_bias": (4,), "conv": (2 * K + V, 1, 3),
                                                      "norm": (3,)}[role]
    assert mixer.state_shape == (4, 4, 3) and mixer.channel_shape == (4, 3)
    with pytest.raises(NotApplicable, match="no x_proj"):
        mixer.projections("x_proj")
    with pytest.raises(NotApplicable, match="skip"):
        mixer.tensors("D")
    with pytest.raises(NotApplicable, match="delta rule"):
        mixer.require_stage("extend_state", "additional_scan")
    mixer.require_stage("initial_state", "initial_state")
    mixer.require_stage("state_offset", "state_offset")

    fused = GatedDeltaNetMixer(16, num_key_heads=2, num_value_heads=4, key_head_dim=4, value_head_dim=3,
                               layout="qwen3_next")
    assert [p.attr for p in fused.projections("in_proj")] == ["in_proj_qkvz", "in_proj_ba"]
    for role in ("q", "X", "dt"):
        with pytest.raises(NotApplicable, match="interleave"):
            fused.projections(role)


class PrefixTokens(PeftHook):
    """Fixed soft tokens (n, width) at the start of a fresh sequence, at one stage."""

    def __init__(self, stage: str, tokens: torch.Tensor):
        super().__init__()
        self.stage, self.prefix = stage, tokens

    def tokens(self, stage, direction, length, offset):
        if stage != self.stage or offset > 0:
            return None
        return self.prefix, torch.arange(self.prefix.shape[0])


@pytest.mark.parametrize("layout", ["qwen3_5", "qwen3_next"])
def test_soft_tokens_before_and_after_the_input_projections(layout):
    """Tokens p inserted before the projections = the mixer run on [p, h] with p's outputs dropped; their projections
    [q | k | v | z | b | a] inserted after the projections = the same; a state continued token by token sees them
    once (the prefix is not inserted again at offset > 0)."""
    _, _, ours = transformers_pair(layout)
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(2, 11, CONFIG["hidden_size"], generator=gen)
    p = torch.randn(3, CONFIG["hidden_size"], generator=gen)
    with torch.no_grad():
        expected = ours(torch.cat([p.expand(2, -1, -1), h], dim=1))[:, 3:]
        qkv, z, b, a = ours._project(p[None])
        projected = torch.cat([qkv, z.flatten(-2), b, a], dim=-1)[0]                   # (3, in_proj_width)
    assert projected.shape[-1] == ours.soft_token_width("after_in_proj")
    for stage, tokens in (("before_in_proj", p), ("after_in_proj", projected)):
        ours.hooks.append(PrefixTokens(stage, tokens))
        with torch.no_grad():
            assert rel(ours(h), expected) < 1e-5, stage
            state = GatedDeltaNetState()
            parts = [ours(h[:, :6], state=state)] + [ours(h[:, i : i + 1], state=state) for i in range(6, 11)]
        assert rel(torch.cat(parts, dim=1), expected) < 1e-5, stage
        assert state.offset == 11
        ours.hooks.pop(-1)
