"""The selective scan of Mamba-1, behind one function with mamba_ssm's layout and semantics.

Backends:
  * "sequential": exact sequential recurrence with its own reverse-loop backward (`sequential.py`); the
    default on the CPU and the fallback everywhere, any state size N. Grouped B and C (one per group of
    channels, VMamba's four scan directions) go to its grouped, channel-last form (`grouped.py`).
  * "cuda": mamba_ssm's `selective_scan_fn` kernel, chosen automatically for CUDA tensors when
    mamba_ssm is installed and no initial state is passed.
  * "reference": the float64 oracle of `reference.py`, for tests and debugging.

The environment variable MAMBAPEFT_SCAN_BACKEND forces one of them.

The Mamba-2 scan (scalar A per head, grouped B and C) is `ssd_scan` of ssd.py, with its own backends.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import cuda
from .grouped import GroupedScan
from .reference import selective_scan_reference
from .sequential import SequentialScan
from .ssd import ssd_scan
from .ssd_reference import ssd_scan_reference

BACKENDS = ("sequential", "cuda", "reference")

__all__ = ["selective_scan", "selective_scan_grouped", "selective_scan_reference", "BACKENDS", "choose_backend",
           "ssd_scan", "ssd_scan_reference"]


def _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state):
    def fail(what):
        raise ValueError(
            f"selective_scan: {what}. Expected u, delta, z (batch, E, L); A (E, N); B, C (batch, N, L) or grouped "
            f"(batch, G, N, L); D, delta_bias (E,); initial_state (batch, E, N). Got u {tuple(u.shape)}, delta "
            f"{tuple(delta.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}."
        )

    if u.dim() != 3:
        fail(f"u must have 3 dimensions, it has {u.dim()}")
    batch, d_inner, length = u.shape
    if delta.shape != u.shape:
        fail("delta must have the shape of u")
    if A.dim() != 2 or A.shape[0] != d_inner:
        fail("A must be (E, N) with E = u.shape[1]")
    d_state = A.shape[1]
    if B.dim() == 4:
        groups = B.shape[1]
        if groups < 1 or d_inner % groups:
            fail(f"grouped B must have a number of groups G that divides E = {d_inner}")
        expected, layout = (batch, groups, d_state, length), "(batch, G, N, L)"
    else:
        expected, layout = (batch, d_state, length), "(batch, N, L)"
    for name, t in (("B", B), ("C", C)):
        if t.shape != expected:
            fail(f"{name} must be {layout} = {expected}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (d_inner,):
            fail(f"{name} must be (E,) = ({d_inner},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        fail(f"z must have the shape of u, got {tuple(z.shape)}")
    if initial_state is not None and initial_state.shape != (batch, d_inner, d_state):
        fail(f"initial_state must be (batch, E, N) = {(batch, d_inner, d_state)}, got {tuple(initial_state.shape)}")


def choose_backend(u: torch.Tensor, initial_state: torch.Tensor | None, backend: str | None = None) -> str:
    backend = backend or os.environ.get("MAMBAPEFT_SCAN_BACKEND") or None
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown scan backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if backend == "cuda" and (not u.is_cuda or cuda.kernel() is None or initial_state is not None):
            backend = "sequential"   # the kernel cannot take this call; the exact backend can
        return backend
    if u.is_cuda and initial_state is None and cuda.kernel() is not None:
        return "cuda"
    return "sequential"


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
    *,
    backend: str | None = None,
):
    """Selective scan with mamba_ssm's layout: u, delta, z (batch, E, L); A (E, N); B, C (batch, N, L).

    delta <- softplus(delta + delta_bias) (each optional); s_t = exp(delta_t A) s_{t-1} + delta_t B_t u_t,
    starting from `initial_state` (batch, E, N) or zeros; y_t = <s_t, C_t> + D u_t, times silu(z_t).
    Returns y (batch, E, L) in u's dtype, and with `return_last_state` also the last state (batch, E, N)
    in float32. Differentiable in every tensor argument, the initial state included.

    B and C may be grouped, (batch, G, N, L): channel e uses group e // (E / G), as in mamba_ssm.
    (The argument list is the reference's and mamba_ssm's on purpose: every backend is called the same way.)
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    backend = choose_backend(u, initial_state, backend)
    if backend == "reference":
        out = selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                       return_last_state)
        if return_last_state:
            return out[0].to(u.dtype), out[1].float()
        return out.to(u.dtype)
    if backend == "cuda":
        return cuda.kernel()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    if B.dim() == 4:
        return _grouped_from_mamba_layout(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                          return_last_state)

    # exact sequential backend; computes in float32 (float64 stays float64, for gradcheck)
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u_c, delta_c = u.to(compute), delta.to(compute)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta_c = F.softplus(delta_c)
    s0 = initial_state.to(compute) if initial_state is not None else None
    if u.shape[-1] == 0:
        y = u_c.new_zeros(u.shape)
        last = s0 if s0 is not None else u_c.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    else:
        y, last = SequentialScan.apply(u_c, delta_c, A.to(compute), B.to(compute), C.to(compute), s0)
    if D is not None:
        y = y + u_c * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(u.dtype)
    return (y, last) if return_last_state else y


# ---------------------------------------------------------------- grouped B and C (VMamba's four directions)


def _grouped_core(u, delta, A, B, C, D, delta_bias, delta_softplus, initial_state):
    """The exact CPU kernel on channel-last tensors: u, delta (b, G, L, E); A (G, N, E); B, C (b, G, L, N);
    D, delta_bias (G, E); initial_state (b, G, N, E). Returns y (b, G, L, E) and the last state, in float32
    (float64 stays float64)."""
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    cast = lambda t: None if t is None else t.to(compute).contiguous()  # noqa: E731
    if u.shape[2] == 0:
        batch, groups, _, d_inner = u.shape
        last = cast(initial_state) if initial_state is not None else u.new_zeros(
            batch, groups, A.shape[1], d_inner, dtype=compute)
        return u.new_zeros(u.shape, dtype=compute), last
    return GroupedScan.apply(cast(u), cast(delta), cast(A), cast(B), cast(C), cast(D), cast(delta_bias),
                             cast(initial_state), bool(delta_softplus))


def _grouped_from_mamba_layout(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state):
    """selective_scan's grouped CPU path: mamba_ssm's layout to the channel-last kernel and back."""
    batch, d_inner, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    per = d_inner // groups
    to_cl = lambda t: t.reshape(batch, groups, per, length).transpose(2, 3)  # noqa: E731  (b, E, L) -> (b, G, L, E/G)
    y, last = _grouped_core(
        to_cl(u), to_cl(delta), A.reshape(groups, per, d_state).transpose(1, 2), B.transpose(2, 3), C.transpose(2, 3),
        D.reshape(groups, per) if D is not None else None,
        delta_bias.reshape(groups, per) if delta_bias is not None else None, delta_softplus,
        initial_state.reshape(batch, groups, per, d_state).transpose(2, 3) if initial_state is not None else None,
    )
    y = y.transpose(2, 3).reshape(batch, d_inner, length)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    y = y.to(u.dtype)
    if return_last_state:
        return y, last.transpose(2, 3).reshape(batch, d_inner, d_state).float()
    return y


def selective_scan_grouped(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """G independent scans of E channels each, channel-last: VMamba's four directions in one call.

    u, delta (batch, G, L, E); A (G, E, N); B, C (batch, G, L, N), shared by the E channels of their group;
    D, delta_bias (G, E); initial_state (batch, G, E, N) or None (zeros). Same recurrence as `selective_scan` (no
    gate). Returns y (batch, G, L, E) in u's dtype; differentiable in every tensor argument, the initial state included.
    """
    if u.dim() != 4 or delta.shape != u.shape:
        raise ValueError(f"selective_scan_grouped: u and delta must be (batch, G, L, E) alike, got u "
                         f"{tuple(u.shape)}, delta {tuple(delta.shape)}")
    batch, groups, length, d_inner = u.shape
    if A.dim() != 3 or A.shape[:2] != (groups, d_inner):
        raise ValueError(f"selective_scan_grouped: A must be (G, E, N) = ({groups}, {d_inner}, N), got "
                         f"{tuple(A.shape)}")
    d_state = A.shape[2]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, groups, length, d_state):
            raise ValueError(f"selective_scan_grouped: {name} must be (batch, G, L, N) = "
                             f"{(batch, groups, length, d_state)}, got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (groups, d_inner):
            raise ValueError(f"selective_scan_grouped: {name} must be (G, E) = {(groups, d_inner)}, got "
                             f"{tuple(t.shape)}")
    if initial_state is not None and initial_state.shape != (batch, groups, d_inner, d_state):
        raise ValueError(f"selective_scan_grouped: initial_state must be (batch, G, E, N) = "
                         f"{(batch, groups, d_inner, d_state)}, got {tuple(initial_state.shape)}")

    backend = choose_backend(u, initial_state, backend)
    if backend == "sequential":
        h0 = initial_state.transpose(2, 3) if initial_state is not None else None          # (b, G, N, E)
        y, _ = _grouped_core(u, delta, A.transpose(1, 2), B, C, D, delta_bias, delta_softplus, h0)
        return y.to(u.dtype)
    # the other backends take mamba_ssm's layout: (b, G, L, E) -> (b, G E, L), B and C (b, G, N, L)
    to_mamba = lambda t: t.transpose(2, 3).reshape(batch, groups * d_inner, length)  # noqa: E731
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    args = (to_mamba(u), to_mamba(delta), A.reshape(groups * d_inner, d_state), B.transpose(2, 3).contiguous(),
            C.transpose(2, 3).contiguous(), flat(D))
    if backend == "reference":
        h0 = initial_state.reshape(batch, groups * d_inner, d_state) if initial_state is not None else None
        y = selective_scan_reference(*args, None, flat(delta_bias), delta_softplus, h0)
    else:                                  # the kernel takes no initial state (choose_backend saw to it)
        y = cuda.kernel()(*args, None, flat(delta_bias), delta_softplus, False)
    return y.reshape(batch, groups, d_inner, length).transpose(2, 3).to(u.dtype)
