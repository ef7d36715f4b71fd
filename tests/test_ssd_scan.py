"""The Mamba-2 (SSD) scan against the plain float64 recurrence: outputs, final state and every gradient."""

import math

import pytest
import torch

import mambapeft.scan.ssd as ssd
from mambapeft import ssd_scan, ssd_scan_reference

from conftest import assert_rel_close

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def make_inputs(batch=2, length=20, heads=6, head_dim=5, groups=1, d_state=7, *, softplus=True, d_per_channel=False,
                initial=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    dt = r(batch, length, heads) * 0.5 if softplus else torch.rand(batch, length, heads, generator=g, dtype=dtype) * 0.5
    inputs = {
        "x": r(batch, length, heads, head_dim),
        "dt": dt,
        "A": -torch.exp(r(heads) * 0.5),
        "B": r(batch, length, groups, d_state),
        "C": r(batch, length, groups, d_state),
        "D": r(heads, head_dim) if d_per_channel else r(heads),
        "z": r(batch, length, heads, head_dim),
        "dt_bias": r(heads) * 0.1 if softplus else torch.rand(heads, generator=g, dtype=dtype) * 0.1,
    }
    if initial:
        inputs["initial_states"] = r(batch, heads, head_dim, d_state)
    return inputs


def outputs_and_grads(fn, inputs, softplus=True, seed=1):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, last = fn(**leaves, dt_softplus=softplus, return_final_states=True)
    g = torch.Generator().manual_seed(seed)
    w_y = torch.randn(y.shape, generator=g, dtype=torch.float64)
    w_s = torch.randn(last.shape, generator=g, dtype=torch.float64)
    ((y.double() * w_y).sum() + (last.double() * w_s).sum()).backward()
    return y, last, {k: v.grad for k, v in leaves.items()}


def assert_matches_reference(inputs, softplus=True, tol=1e-5):
    y, last, grads = outputs_and_grads(ssd_scan, inputs, softplus)
    y_ref, last_ref, grads_ref = outputs_and_grads(ssd_scan_reference, inputs, softplus)
    assert y.dtype == inputs["x"].dtype and y.shape == inputs["x"].shape
    assert_rel_close(y, y_ref, tol, what="y")
    assert_rel_close(last, last_ref, tol, what="final state")
    for name in inputs:
        assert grads[name] is not None, name
        assert_rel_close(grads[name], grads_ref[name], tol, what=f"grad of {name}")


@pytest.mark.parametrize("length", [1, 2, 63, 64, 65, 257, 1000])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("initial", [True, False])
def test_matches_float64_reference(length, groups, initial):
    """H 6, P 5, N 7 (not powers of two); lengths across the 64-step chunks; G 1 and 3 (two heads per group)."""
    assert_matches_reference(make_inputs(length=length, groups=groups, initial=initial, seed=length))


@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("d_per_channel", [True, False])
def test_d_per_head_and_per_channel_and_no_softplus(softplus, d_per_channel):
    inputs = make_inputs(length=70, groups=2, softplus=softplus, d_per_channel=d_per_channel, seed=3)
    assert_matches_reference(inputs, softplus)


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_chunk_boundaries_do_not_matter(monkeypatch, chunk):
    """Chunks of 1 step, of 3 (not dividing L, so the last is padded) and of 16 give the reference result too."""
    monkeypatch.setattr(ssd, "_CHUNK", chunk)
    assert ssd.chunk_length(50) == math.ceil(50 / math.ceil(50 / chunk))
    assert_matches_reference(make_inputs(length=50, groups=3, seed=5))


def test_large_decays_keep_their_digits():
    """Steep decays (dt*A -80 per step) followed by gentle ones in the same chunk: a float32 cumulative sum
    would be ~-2400 there, and its differences would lose about 1e-4 of each gentle step's decay."""
    inputs = make_inputs(length=60, heads=4, groups=1, softplus=False, seed=7)
    inputs["A"] = torch.full((4,), -16.0)
    inputs["dt"] = torch.cat([torch.full((2, 30, 4), 5.0), torch.rand(2, 30, 4) * 0.01], dim=1)
    inputs["dt_bias"] = torch.zeros(4)
    assert_matches_reference(inputs, softplus=False)


def test_dt_limit_clamps_like_the_reference():
    inputs = make_inputs(length=33, groups=1, seed=9)
    limit = (0.3, 0.9)
    y = ssd_scan(**inputs, dt_softplus=True, dt_limit=limit)
    assert_rel_close(y, ssd_scan_reference(**inputs, dt_softplus=True, dt_limit=limit))
    assert not torch.allclose(y, ssd_scan(**inputs, dt_softplus=True), atol=1e-3)


@pytest.mark.parametrize("initial, final", [(True, True), (False, False), (True, False), (False, True)])
def test_gradcheck_float64(initial, final):
    """Finite differences on a tiny case, every input: float64 inputs run the chunked form in float64. With and
    without an initial and a final state (the chunked form then skips the first chunk's entering state, or the
    last chunk's added state)."""
    inputs = make_inputs(batch=2, length=9, heads=4, head_dim=3, groups=2, d_state=2, initial=initial,
                         dtype=torch.float64, seed=11)
    names = [k for k in NAMES if k in inputs]
    args = [inputs[k].clone().requires_grad_() for k in names]

    def scan(*a):
        return ssd_scan(**dict(zip(names, a)), dt_softplus=True, return_final_states=final)

    old = ssd._CHUNK
    try:
        ssd._CHUNK = 4       # three chunks: the hand-written state passing is in the graph
        assert torch.autograd.gradcheck(scan, args, eps=1e-6, atol=1e-7)
    finally:
        ssd._CHUNK = old


def test_state_passing_gradcheck():
    g = torch.Generator().manual_seed(13)
    added = torch.randn(2, 5, 3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    decay = torch.rand(2, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    initial = torch.randn(2, 3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(ssd.PassStates.apply, (added, decay, initial))


@pytest.mark.parametrize("length", [1, 64, 65, 200])
@pytest.mark.parametrize("initial", [True, False])
def test_output_alone_without_final_state(length, initial):
    """The training path: no final state asked for (the last chunk's added state is skipped)."""
    inputs = make_inputs(length=length, groups=3, initial=initial, seed=length + 1)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    leaves_ref = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = ssd_scan(**leaves, dt_softplus=True)
    y_ref = ssd_scan_reference(**leaves_ref, dt_softplus=True)
    w = torch.randn(y.shape, dtype=torch.float64)
    (y.double() * w).sum().backward()
    (y_ref * w).sum().backward()
    assert_rel_close(y, y_ref, what="y")
    for name in inputs:
        assert_rel_close(leaves[name].grad, leaves_ref[name].grad, what=f"grad of {name}")


def test_final_state_alone_and_partial_requires_grad():
    inputs = make_inputs(length=30, seed=15)
    x = inputs["x"].clone().requires_grad_()
    rest = {k: v for k, v in inputs.items() if k != "x"}
    _, last = ssd_scan(x, **rest, dt_softplus=True, return_final_states=True)
    last.sum().backward()
    x_ref = inputs["x"].clone().requires_grad_()
    _, last_ref = ssd_scan_reference(x_ref, **rest, dt_softplus=True, return_final_states=True)
    last_ref.sum().backward()
    assert_rel_close(x.grad, x_ref.grad)


def test_without_optional_inputs():
    inputs = make_inputs(length=40, groups=2, seed=17)
    core = {k: inputs[k] for k in ("x", "dt", "A", "B", "C")}
    assert_rel_close(ssd_scan(**core), ssd_scan_reference(**core))


def test_continuing_from_the_final_state_equals_one_pass():
    inputs = make_inputs(length=90, groups=3, initial=False, seed=19)
    whole, last = ssd_scan(**inputs, dt_softplus=True, return_final_states=True)
    split = {k: (v[:, :41], v[:, 41:]) if v.dim() >= 3 else (v, v) for k, v in inputs.items()}
    first, mid = ssd_scan(**{k: a for k, (a, _) in split.items()}, dt_softplus=True, return_final_states=True)
    second, end = ssd_scan(**{k: b for k, (_, b) in split.items()}, dt_softplus=True, initial_states=mid,
                           return_final_states=True)
    assert_rel_close(torch.cat([first, second], dim=1), whole)
    assert_rel_close(end, last)


def test_bfloat16_inputs_compute_in_float32():
    inputs = make_inputs(length=33, seed=21)
    low = {k: v.to(torch.bfloat16) for k, v in inputs.items()}
    y = ssd_scan(**low, dt_softplus=True)
    assert y.dtype == torch.bfloat16
    assert_rel_close(y.float(), ssd_scan_reference(**low, dt_softplus=True), tol=1e-2)


def test_backends_by_name_and_environment(monkeypatch):
    inputs = make_inputs(length=12, seed=23)
    expected = ssd_scan_reference(**inputs, dt_softplus=True)
    assert_rel_close(ssd_scan(**inputs, dt_softplus=True, backend="reference"), expected)
    assert ssd.choose_ssd_backend(inputs["x"], "cuda") == "chunked"       # CPU tensors: the kernel cannot take them
    monkeypatch.setenv("MAMBAPEFT_SSD_BACKEND", "reference")
    assert_rel_close(ssd_scan(**inputs, dt_softplus=True), expected)
    monkeypatch.setenv("MAMBAPEFT_SSD_BACKEND", "fastest")
    with pytest.raises(ValueError, match="unknown SSD scan backend 'fastest'"):
        ssd_scan(**inputs)


def test_empty_sequence_returns_initial_state():
    inputs = make_inputs(length=0)
    y, last = ssd_scan(**inputs, return_final_states=True)
    assert y.shape == (2, 0, 6, 5)
    assert torch.equal(last, inputs["initial_states"])


@pytest.mark.parametrize(
    "name, bad, message",
    [
        ("A", torch.zeros(5), "A must be"),
        ("B", torch.zeros(2, 10, 4, 7), "H divisible by G"),
        ("C", torch.zeros(2, 10, 1, 6), "C must have the shape of B"),
        ("dt", torch.zeros(2, 9, 6), "dt must be"),
        ("D", torch.zeros(5), "D must be"),
        ("initial_states", torch.zeros(2, 6, 5, 3), "initial_states must be"),
    ],
)
def test_wrong_shapes_are_named(name, bad, message):
    inputs = make_inputs(length=10)
    inputs[name] = bad
    with pytest.raises(ValueError, match=message):
        ssd_scan(**inputs)
