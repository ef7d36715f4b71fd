"""The CPU scan against the plain float64 recurrence: outputs, last state and every gradient."""

import pytest
import torch

import mambapeft.scan.sequential as sequential
from mambapeft import selective_scan, selective_scan_reference

from conftest import assert_rel_close

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(batch, d_inner, length, d_state, softplus, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    if softplus:
        delta = r(batch, d_inner, length) * 0.5
    else:
        delta = torch.rand(batch, d_inner, length, generator=g, dtype=dtype) * 0.5
    return {
        "u": r(batch, d_inner, length),
        "delta": delta,
        "A": -torch.exp(r(d_inner, d_state) * 0.5),
        "B": r(batch, d_state, length),
        "C": r(batch, d_state, length),
        "D": r(d_inner),
        "z": r(batch, d_inner, length),
        "delta_bias": r(d_inner) * 0.1 if softplus else torch.rand(d_inner, generator=g, dtype=dtype) * 0.1,
        "initial_state": r(batch, d_inner, d_state),
    }


def outputs_and_grads(fn, inputs, softplus, seed=1):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, last = fn(**leaves, delta_softplus=softplus, return_last_state=True)
    g = torch.Generator().manual_seed(seed)
    w_y = torch.randn(y.shape, generator=g, dtype=torch.float64)
    w_s = torch.randn(last.shape, generator=g, dtype=torch.float64)
    ((y.double() * w_y).sum() + (last.double() * w_s).sum()).backward()
    return y, last, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("length", [1, 2, 63, 257, 1000])
@pytest.mark.parametrize("d_state", [1, 16, 22])
def test_matches_float64_reference(d_state, length, softplus):
    inputs = make_inputs(2, 6, length, d_state, softplus)
    y, last, grads = outputs_and_grads(selective_scan, inputs, softplus)
    y_ref, last_ref, grads_ref = outputs_and_grads(selective_scan_reference, inputs, softplus)
    assert y.dtype == torch.float32 and y.shape == (2, 6, length)
    assert_rel_close(y, y_ref, what="y")
    assert_rel_close(last, last_ref, what="last state")
    for name in NAMES:
        assert grads[name] is not None, name
        assert_rel_close(grads[name], grads_ref[name], what=f"grad of {name}")


@pytest.mark.parametrize("chunk_elements", [1, 3 * 16 * 5 * 2])
def test_chunk_boundaries_do_not_matter(monkeypatch, chunk_elements):
    """Chunks of 1 step and of 3 steps (not dividing L) give the reference result too."""
    monkeypatch.setattr(sequential, "_CHUNK_ELEMENTS", chunk_elements)
    assert sequential.chunk_length(2, 16, 5) == max(1, chunk_elements // 160)
    inputs = make_inputs(2, 5, 50, 16, True, seed=3)
    y, last, grads = outputs_and_grads(selective_scan, inputs, True)
    y_ref, last_ref, grads_ref = outputs_and_grads(selective_scan_reference, inputs, True)
    assert_rel_close(y, y_ref)
    assert_rel_close(last, last_ref)
    for name in NAMES:
        assert_rel_close(grads[name], grads_ref[name], what=name)


def test_gradcheck_float64():
    """The hand-written backward against finite differences, in float64."""
    inputs = make_inputs(2, 3, 9, 4, True, dtype=torch.float64, seed=5)
    args = [inputs[k].clone().requires_grad_() for k in ("u", "delta", "A", "B", "C", "initial_state")]
    assert torch.autograd.gradcheck(lambda *a: sequential.SequentialScan.apply(*a), args, eps=1e-6, atol=1e-7)


def test_gradient_of_last_state_alone_and_partial_requires_grad():
    inputs = make_inputs(1, 4, 30, 16, True, seed=7)
    u = inputs["u"].clone().requires_grad_()
    rest = {k: v for k, v in inputs.items() if k != "u"}
    _, last = selective_scan(u, **rest, delta_softplus=True, return_last_state=True)
    last.sum().backward()
    u_ref = inputs["u"].clone().requires_grad_()
    _, last_ref = selective_scan_reference(u_ref, **rest, delta_softplus=True, return_last_state=True)
    last_ref.sum().backward()
    assert_rel_close(u.grad, u_ref.grad)


def test_without_optional_inputs():
    inputs = make_inputs(2, 4, 40, 16, True, seed=9)
    core = {k: inputs[k] for k in ("u", "delta", "A", "B", "C")}
    assert_rel_close(selective_scan(**core), selective_scan_reference(**core))


def test_bfloat16_inputs_compute_in_float32():
    inputs = make_inputs(2, 4, 33, 16, True, seed=11)
    low = {k: v.to(torch.bfloat16) for k, v in inputs.items()}
    y = selective_scan(**low, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    assert_rel_close(y.float(), selective_scan_reference(**low, delta_softplus=True), tol=1e-2)


def test_reference_backend_by_name_and_environment(monkeypatch):
    inputs = make_inputs(1, 3, 12, 16, True, seed=13)
    expected = selective_scan_reference(**inputs, delta_softplus=True)
    assert_rel_close(selective_scan(**inputs, delta_softplus=True, backend="reference"), expected)
    monkeypatch.setenv("MAMBAPEFT_SCAN_BACKEND", "reference")
    assert_rel_close(selective_scan(**inputs, delta_softplus=True), expected)
    monkeypatch.setenv("MAMBAPEFT_SCAN_BACKEND", "fastest")
    with pytest.raises(ValueError, match="unknown scan backend 'fastest'"):
        selective_scan(**inputs)


def test_empty_sequence_returns_initial_state():
    inputs = make_inputs(2, 3, 0, 5, True)
    y, last = selective_scan(**inputs, return_last_state=True)
    assert y.shape == (2, 3, 0)
    assert torch.equal(last, inputs["initial_state"])


@pytest.mark.parametrize(
    "name, bad, message",
    [
        ("A", torch.zeros(5, 16), "A must be"),
        ("B", torch.zeros(2, 15, 10), "B must be"),
        ("delta", torch.zeros(2, 4, 9), "delta must have the shape of u"),
        ("initial_state", torch.zeros(2, 4, 3), "initial_state must be"),
        ("D", torch.zeros(3), "D must be"),
    ],
)
def test_wrong_shapes_are_named(name, bad, message):
    inputs = make_inputs(2, 4, 10, 16, True)
    inputs[name] = bad
    with pytest.raises(ValueError, match=message):
        selective_scan(**inputs)
