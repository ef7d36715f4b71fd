"""The grouped scan (B and C per group of channels: VMamba's four directions) against the float64 recurrence."""

import pytest
import torch

import mambapeft.scan.grouped as grouped
from mambapeft import selective_scan, selective_scan_reference
from mambapeft.scan import selective_scan_grouped

from conftest import assert_rel_close

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(batch, groups, per_group, length, d_state, dtype=torch.float32, seed=0):
    """mamba_ssm's layout: u, delta, z (b, G E, L); A (G E, N); B, C (b, G, N, L); D, bias (G E,)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    E = groups * per_group
    return {
        "u": r(batch, E, length),
        "delta": r(batch, E, length) * 0.5,
        "A": -torch.exp(r(E, d_state) * 0.5),
        "B": r(batch, groups, d_state, length),
        "C": r(batch, groups, d_state, length),
        "D": r(E),
        "z": r(batch, E, length),
        "delta_bias": r(E) * 0.1,
        "initial_state": r(batch, E, d_state),
    }


def outputs_and_grads(fn, inputs, seed=1, **kwargs):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, last = fn(**leaves, delta_softplus=True, return_last_state=True, **kwargs)
    g = torch.Generator().manual_seed(seed)
    w_y = torch.randn(y.shape, generator=g, dtype=torch.float64)
    w_s = torch.randn(last.shape, generator=g, dtype=torch.float64)
    ((y.double() * w_y).sum() + (last.double() * w_s).sum()).backward()
    return y, last, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("length", [1, 2, 63, 257, 1000])
@pytest.mark.parametrize("d_state", [1, 3])
def test_grouped_matches_float64_reference(d_state, length):
    inputs = make_inputs(2, 4, 5, length, d_state)
    y, last, grads = outputs_and_grads(selective_scan, inputs)
    y_ref, last_ref, grads_ref = outputs_and_grads(selective_scan_reference, inputs)
    assert y.dtype == torch.float32 and y.shape == (2, 20, length)
    assert_rel_close(y, y_ref, what="y")
    assert_rel_close(last, last_ref, what="last state")
    for name in NAMES:
        assert grads[name] is not None, name
        assert_rel_close(grads[name], grads_ref[name], what=f"grad of {name}")


def test_stage_zero_length_with_one_state():
    """VMamba-S stage 0 at 224 px: 3,136 steps, N = 1 (few channels, to keep the float64 loop short)."""
    inputs = make_inputs(1, 4, 3, 3136, 1, seed=2)
    y, last, grads = outputs_and_grads(selective_scan, inputs)
    y_ref, last_ref, grads_ref = outputs_and_grads(selective_scan_reference, inputs)
    assert_rel_close(y, y_ref, what="y")
    assert_rel_close(last, last_ref, what="last state")
    for name in NAMES:
        assert_rel_close(grads[name], grads_ref[name], tol=2e-5, what=f"grad of {name}")


@pytest.mark.parametrize("chunk_elements", [1, 4 * 2 * 5 * 3])
def test_chunk_boundaries_do_not_matter(monkeypatch, chunk_elements):
    """Chunks of 1 step and of 3 steps (not dividing L) give the reference result too."""
    monkeypatch.setattr(grouped, "_CHUNK_ELEMENTS", chunk_elements)
    assert grouped.chunk_length(2, 4, 1, 5) == max(1, chunk_elements // 40)
    inputs = make_inputs(2, 4, 5, 50, 1, seed=3)
    y, last, grads = outputs_and_grads(selective_scan, inputs)
    y_ref, last_ref, grads_ref = outputs_and_grads(selective_scan_reference, inputs)
    assert_rel_close(y, y_ref)
    assert_rel_close(last, last_ref)
    for name in NAMES:
        assert_rel_close(grads[name], grads_ref[name], what=name)


@pytest.mark.parametrize("d_state", [1, 2])
def test_gradcheck_float64(d_state):
    """The hand-written backward against finite differences, in float64 (D, bias, softplus, initial state)."""
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    b, G, L, E, N = 2, 3, 7, 4, d_state
    args = [r(b, G, L, E), r(b, G, L, E) * 0.5, -torch.exp(r(G, N, E) * 0.5), r(b, G, L, N), r(b, G, L, N), r(G, E),
            r(G, E) * 0.1, r(b, G, N, E)]
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda *a: grouped.GroupedScan.apply(*a, True), args, eps=1e-6, atol=1e-7)


def test_channel_last_entry_point_matches_the_reference():
    """selective_scan_grouped (b, G, L, E) against the float64 reference called on mamba_ssm's layout by hand."""
    b, G, L, E, N = 2, 4, 40, 6, 1
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ins = {"u": r(b, G, L, E), "delta": r(b, G, L, E) * 0.5, "A": -torch.exp(r(G, E, N) * 0.5),
           "B": r(b, G, L, N), "C": r(b, G, L, N), "D": r(G, E), "delta_bias": r(G, E) * 0.1}

    def by_hand(u, delta, A, B, C, D, delta_bias):
        flat = lambda t: t.permute(0, 1, 3, 2).reshape(b, G * E, L)  # noqa: E731
        y = selective_scan_reference(flat(u), flat(delta), A.reshape(G * E, N), B.permute(0, 1, 3, 2),
                                     C.permute(0, 1, 3, 2), D.reshape(-1), None, delta_bias.reshape(-1), True)
        return y.reshape(b, G, E, L).permute(0, 1, 3, 2)

    results = []
    for fn in (lambda **k: selective_scan_grouped(**k, delta_softplus=True), by_hand):
        leaves = {k: v.clone().requires_grad_() for k, v in ins.items()}
        y = fn(**leaves)
        (y.double() * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape)).sum().backward()
        results.append((y, {k: v.grad for k, v in leaves.items()}))
    (y, grads), (y_ref, grads_ref) = results
    assert y.shape == (b, G, L, E) and y.dtype == torch.float32
    assert_rel_close(y, y_ref, what="y")
    for name in ins:
        assert_rel_close(grads[name], grads_ref[name], what=f"grad of {name}")
    assert_rel_close(selective_scan_grouped(**ins, delta_softplus=True, backend="reference"), y_ref)


def test_grouped_reference_with_equal_groups_is_the_ungrouped_one():
    """The reference's grouped form agrees with its plain form when every group has the same B and C."""
    inputs = make_inputs(2, 3, 4, 20, 2, dtype=torch.float64, seed=9)
    same = dict(inputs, B=inputs["B"][:, :1].expand(-1, 3, -1, -1), C=inputs["C"][:, :1].expand(-1, 3, -1, -1))
    plain = dict(inputs, B=inputs["B"][:, 0], C=inputs["C"][:, 0])
    torch.testing.assert_close(selective_scan_reference(**same, delta_softplus=True),
                               selective_scan_reference(**plain, delta_softplus=True))


def test_without_optional_inputs_and_empty_sequences():
    inputs = make_inputs(2, 4, 3, 30, 1, seed=11)
    core = {k: inputs[k] for k in ("u", "delta", "A", "B", "C")}
    assert_rel_close(selective_scan(**core), selective_scan_reference(**core))
    empty = make_inputs(2, 4, 3, 0, 1)
    y, last = selective_scan(**empty, return_last_state=True)
    assert y.shape == (2, 12, 0) and torch.equal(last, empty["initial_state"])


@pytest.mark.parametrize("name, bad, message", [
    ("B", torch.zeros(2, 5, 1, 10), "G that divides E"),
    ("C", torch.zeros(2, 4, 2, 10), r"C must be \(batch, G, N, L\)"),
])
def test_wrong_grouped_shapes_are_named(name, bad, message):
    inputs = make_inputs(2, 4, 3, 10, 1)
    inputs[name] = bad
    with pytest.raises(ValueError, match=message):
        selective_scan(**inputs)


def test_channel_last_shapes_are_checked():
    u = torch.zeros(1, 4, 5, 3)
    with pytest.raises(ValueError, match=r"A must be \(G, E, N\)"):
        selective_scan_grouped(u, u, torch.zeros(4, 2, 1), torch.zeros(1, 4, 5, 1), torch.zeros(1, 4, 5, 1))
    with pytest.raises(ValueError, match=r"B must be \(batch, G, L, N\)"):
        selective_scan_grouped(u, u, torch.zeros(4, 3, 1), torch.zeros(1, 4, 5, 2), torch.zeros(1, 4, 5, 1))


@pytest.mark.parametrize("d_state", [1, 2])
def test_channel_last_initial_state_matches_the_float64_recurrence(d_state):
    """selective_scan_grouped's initial_state (b, G, E, N) against a loop written here in float64, outputs and
    gradients (the initial state's included); the reference backend agrees too."""
    b, G, L, E, N = 2, 4, 9, 3, d_state
    g = torch.Generator().manual_seed(13)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ins = {"u": r(b, G, L, E), "delta": r(b, G, L, E) * 0.5, "A": -torch.exp(r(G, E, N) * 0.5),
           "B": r(b, G, L, N), "C": r(b, G, L, N), "D": r(G, E), "delta_bias": r(G, E) * 0.1,
           "initial_state": r(b, G, E, N)}

    def loop(u, delta, A, B, C, D, delta_bias, initial_state):
        dt = torch.nn.functional.softplus(delta.double() + delta_bias.double()[:, None])       # (b, G, L, E)
        s = initial_state.double()                                                              # (b, G, E, N)
        ys = []
        for t in range(L):
            s = torch.exp(dt[:, :, t, :, None] * A.double()) * s + (dt[:, :, t] * u[:, :, t].double())[..., None] * \
                B[:, :, t, None, :].double()
            ys.append((s * C[:, :, t, None, :].double()).sum(-1) + D.double() * u[:, :, t].double())
        return torch.stack(ys, dim=2)

    results = []
    for fn in (lambda **k: selective_scan_grouped(**k, delta_softplus=True), loop):
        leaves = {k: v.clone().requires_grad_() for k, v in ins.items()}
        y = fn(**leaves)
        (y.double() * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape)).sum().backward()
        results.append((y, {k: v.grad for k, v in leaves.items()}))
    (y, grads), (y_ref, grads_ref) = results
    assert_rel_close(y, y_ref, what="y")
    for name in ins:
        assert grads[name].abs().sum() > 0, name
        assert_rel_close(grads[name], grads_ref[name], what=f"grad of {name}")
    assert_rel_close(selective_scan_grouped(**ins, delta_softplus=True, backend="reference"), y_ref)
    zero = dict(ins, initial_state=torch.zeros(b, G, E, N))
    without = {k: v for k, v in ins.items() if k != "initial_state"}
    assert torch.equal(selective_scan_grouped(**zero, delta_softplus=True),
                       selective_scan_grouped(**without, delta_softplus=True))
    with pytest.raises(ValueError, match=r"initial_state must be \(batch, G, E, N\)"):
        selective_scan_grouped(**dict(ins, initial_state=torch.zeros(b, G, N, E + 1)), delta_softplus=True)
