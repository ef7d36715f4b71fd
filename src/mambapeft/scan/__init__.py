"""The selective scan of Mamba-1, behind one function with mamba_ssm's layout and semantics.

Backends:
  * "sequential": exact sequential recurrence with its own reverse-loop backward (`sequential.py`); the
    default on the CPU and the fallback everywhere, any state size N.
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
from .reference import selective_scan_reference
from .sequential import SequentialScan
from .ssd import ssd_scan
from .ssd_reference import ssd_scan_reference

BACKENDS = ("sequential", "cuda", "reference")

__all__ = ["selective_scan", "selective_scan_reference", "BACKENDS", "choose_backend", "ssd_scan",
           "ssd_scan_reference"]


def _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state):
    def fail(what):
        raise ValueError(
            f"selective_scan: {what}. Expected u, delta, z (batch, E, L); A (E, N); B, C (batch, N, L); "
            f"D, delta_bias (E,); initial_state (batch, E, N). Got u {tuple(u.shape)}, delta {tuple(delta.shape)}, "
            f"A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}."
        )

    if u.dim() != 3:
        fail(f"u must have 3 dimensions, it has {u.dim()}")
    batch, d_inner, length = u.shape
    if delta.shape != u.shape:
        fail("delta must have the shape of u")
    if A.dim() != 2 or A.shape[0] != d_inner:
        fail("A must be (E, N) with E = u.shape[1]")
    d_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, d_state, length):
            fail(f"{name} must be (batch, N, L) = {(batch, d_state, length)}")
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
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    backend = choose_backend(u, initial_state, backend)
    if backend == "reference":
        out = selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state)
        if return_last_state:
            return out[0].to(u.dtype), out[1].float()
        return out.to(u.dtype)
    if backend == "cuda":
        return cuda.kernel()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

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
