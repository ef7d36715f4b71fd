"""The Mamba-2 scan (SSD, "state space duality"), with mamba_ssm's `mamba_chunk_scan_combined` layout and semantics.

Shapes: batch b, length L, heads H, head dim P, groups G (H % G == 0), state size N.

    x (b, L, H, P)   dt (b, L, H)   A (H,)   B, C (b, L, G, N)   D (H,) or (H, P)   z (b, L, H, P)
    dt <- softplus(dt + dt_bias), clamped to dt_limit            (each optional)
    h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T                 per head, h (P, N); head h reads group h // (H/G)
    y_t = h_t C_t + D x_t,  then y_t * silu(z_t)

Backends:
  * "chunked" (the CPU path, and the fallback everywhere): the exact chunked form below, pure torch;
  * "cuda": mamba_ssm's `mamba_chunk_scan_combined` kernel, chosen for CUDA tensors when mamba_ssm is installed.
    Only the scan: mamba_ssm's `mamba_split_conv1d_scan_combined` takes the conv, norm and out_proj weights raw
    and would bypass adapters, so it is never used. (Untested here: no GPU in the test environment.)
  * "reference": the float64 sequential oracle of `ssd_reference.py`, for tests and debugging.
The environment variable MAMBAPEFT_SSD_BACKEND forces one of them.

Why chunks, and why they stay exact. Because A is a scalar per head, the decay between two positions of a head is
one number, exp(sum of dt*A between them), so inside a chunk of Q steps the recurrence unrolls into matrices:

    y_t = sum_{s<=t in chunk} exp(cs_t - cs_s) (C_t . B_s) dt_s x_s  +  exp(cs_t) C_t . h_start   (cs: cumsum dt*A)
    h_end = exp(cs_Q) h_start + sum_s exp(cs_Q - cs_s) dt_s x_s B_s^T

(matrix multiplies), and only the states at chunk boundaries are passed sequentially. Nothing is approximated:
the one numerical trap is the differences cs_t - cs_s of long cumulative sums, which lose digits in float32 when
dt*A is large, so the cumulative sums and their differences are taken in float64 (tensors of size b*L*H and
b*L*H*Q, small next to the matmuls) and only the finished exponents are rounded to float32. Gradients come from
autograd through these operations (the sequential state passing has a hand-written backward, `PassStates`), so
they are the exact gradients of the same arithmetic.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

from .ssd_reference import ssd_scan_reference

SSD_BACKENDS = ("chunked", "cuda", "reference")
NO_LIMIT = (0.0, float("inf"))

# Steps per chunk on the CPU. Larger chunks do more intra-chunk work (O(L Q) per head), smaller ones more
# sequential state passing; 64 measured best for the mamba2-130m shapes here (benchmarks/scan_mamba2.py).
_CHUNK = 64


def chunk_length(length: int) -> int:
    """Chunks of at most _CHUNK steps, evened out so that padding the last one wastes few steps."""
    chunks = max(1, math.ceil(length / _CHUNK))
    return math.ceil(length / chunks)


@functools.lru_cache(maxsize=1)
def cuda_kernel():
    """mamba_ssm's `mamba_chunk_scan_combined`, or None where mamba_ssm (with its Triton kernels) is missing."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # ImportError, or a broken Triton / CUDA install
        return None
    return mamba_chunk_scan_combined


def _check_shapes(x, dt, A, B, C, D, z, dt_bias, initial_states):
    def fail(what):
        raise ValueError(
            f"ssd_scan: {what}. Expected x, z (batch, L, H, P); dt (batch, L, H); A, dt_bias (H,); B, C "
            f"(batch, L, G, N) with H % G == 0; D (H,) or (H, P); initial_states (batch, H, P, N). Got x "
            f"{tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}."
        )

    if x.dim() != 4:
        fail(f"x must have 4 dimensions, it has {x.dim()}")
    batch, length, heads, head_dim = x.shape
    if dt.shape != (batch, length, heads):
        fail(f"dt must be (batch, L, H) = {(batch, length, heads)}")
    if A.shape != (heads,):
        fail(f"A must be (H,) = ({heads},)")
    if B.dim() != 4 or B.shape[:2] != (batch, length) or heads % max(1, B.shape[2]) or B.shape[2] == 0:
        fail("B must be (batch, L, G, N) with H divisible by G")
    if C.shape != B.shape:
        fail("C must have the shape of B")
    if D is not None and D.shape not in ((heads,), (heads, head_dim)):
        fail(f"D must be (H,) or (H, P), got {tuple(D.shape)}")
    if dt_bias is not None and dt_bias.shape != (heads,):
        fail(f"dt_bias must be (H,), got {tuple(dt_bias.shape)}")
    if z is not None and z.shape != x.shape:
        fail(f"z must have the shape of x, got {tuple(z.shape)}")
    state_shape = (batch, heads, head_dim, B.shape[3])
    if initial_states is not None and initial_states.shape != state_shape:
        fail(f"initial_states must be (batch, H, P, N) = {state_shape}, got {tuple(initial_states.shape)}")


def choose_ssd_backend(x: torch.Tensor, backend: str | None = None) -> str:
    backend = backend or os.environ.get("MAMBAPEFT_SSD_BACKEND") or None
    if backend is not None:
        if backend not in SSD_BACKENDS:
            raise ValueError(f"unknown SSD scan backend {backend!r}; choose one of {', '.join(SSD_BACKENDS)}")
        if backend == "cuda" and (not x.is_cuda or cuda_kernel() is None):
            backend = "chunked"   # the kernel cannot take this call; the exact torch form can
        return backend
    return "cuda" if x.is_cuda and cuda_kernel() is not None else "chunked"


class PassStates(torch.autograd.Function):
    """The sequential part of the chunked scan: after_c = decay_c * after_{c-1} + added_c, with after_{-1} = initial.

    added (b, n, ..., P, N); decay (b, n, ...); initial (b, ..., P, N). Returns the state after every chunk
    (b, n, ..., P, N). Written by hand because the states are the largest tensors of the scan: autograd through a
    Python loop would keep a second copy of them and assemble its gradient from n pieces; here the forward writes
    them once into one tensor and the backward is one reverse loop.
    """

    @staticmethod
    def forward(ctx, added, decay, initial):
        after = torch.empty_like(added)
        state = initial
        for c in range(added.shape[1]):
            state = torch.addcmul(added[:, c], decay[:, c, ..., None, None], state, out=after[:, c])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(decay, after, initial)
        return after

    @staticmethod
    def backward(ctx, grad_after):
        decay, after, initial = ctx.saved_tensors
        if grad_after is None:
            return None, None, None
        # g_added[:, c] = dLoss/d(after_c): its own gradient plus what flows back through the next chunk's decay
        g_added = torch.empty_like(after)
        g = grad_after[:, -1]
        for c in range(after.shape[1] - 1, -1, -1):
            if c < after.shape[1] - 1:
                g = torch.addcmul(grad_after[:, c], decay[:, c + 1, ..., None, None], g)
            g_added[:, c] = g
        before = torch.cat([initial[:, None], after[:, :-1]], dim=1)                  # after_{c-1}
        g_decay = (g_added * before).sum((-1, -2))                                  # (b, n, ...)
        g_initial = decay[:, 0, ..., None, None] * g_added[:, 0] if ctx.needs_input_grad[2] else None
        return g_added, g_decay, g_initial


def ssd_chunked(x, dt, A, B, C, initial_states, chunk: int, final_state: bool = True):
    """The core of the scan in chunks of `chunk` steps: no bias, softplus, D or gate (the caller applies them).

    x (b, L, H, P); dt (b, L, H), final step sizes; A (H,); B, C (b, L, G, N); initial_states (b, H, P, N) or None.
    Returns y (b, L, H, P) and the final state (b, H, P, N) (None unless `final_state`), in x's dtype.
    Work that cannot matter is skipped: without an initial state nothing enters the first chunk, and without
    `final_state` the state the last chunk adds is never used.
    """
    b, length, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G                                                     # heads per group
    Q = chunk
    nc = math.ceil(length / Q)
    pad = nc * Q - length
    if pad:   # zero steps at the end: dt 0 means no decay and no input, so y and the final state are unchanged
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))

    # log-decays: cs[t] = sum of dt*A over the chunk up to t, in float64 (see the module docstring)
    cs = (dt.double() * A.double()).view(b, nc, Q, H).transpose(2, 3).cumsum(-1)       # (b, c, H, Q)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    seg = (cs[..., :, None] - cs[..., None, :]).masked_fill(~causal, -math.inf)      # (b, c, H, Q, Q) [t, s]
    decay_ts = seg.to(x.dtype).exp().view(b, nc, G, R, Q, Q)                          # exp(cs_t - cs_s), s <= t

    xdt = (x * dt[..., None]).view(b, nc, Q, G, R, P).permute(0, 1, 3, 4, 2, 5)     # (b, c, G, R, Q, P)
    Bc = B.view(b, nc, Q, G, N).transpose(2, 3)[:, :, :, None]                       # (b, c, G, 1, Q, N)
    Cc = C.view(b, nc, Q, G, N).transpose(2, 3)[:, :, :, None]                       # (b, c, G, 1, Q, N)

    # 1. inside each chunk: an attention-like causal product
    CB = Cc @ Bc.mT                                                                   # (b, c, G, 1, Q, Q)
    y = (decay_ts * CB) @ xdt                                                         # (b, c, G, R, Q, P)

    # 2. the state each chunk adds by its end, for the chunks whose state is used (n of them)
    n = nc if final_state else nc - 1
    initial = initial_states.view(b, G, R, P, N).to(x.dtype) if initial_states is not None else None
    if n == 0 and initial is None:
        return y.permute(0, 1, 4, 2, 3, 5).reshape(b, nc * Q, H, P)[:, :length], None
    cs_n = cs[:, :n]
    decay_to_end = (cs_n[..., -1:] - cs_n).to(x.dtype).exp().view(b, n, G, R, Q)      # exp(cs_Q - cs_s)
    added = (xdt[:, :n] * decay_to_end[..., None]).mT @ Bc[:, :n]                    # (b, n, G, R, P, N)

    # 3. the state after each chunk, passed along sequentially
    decay_chunk = cs_n[..., -1].to(x.dtype).exp().view(b, n, G, R)                   # exp(cs_Q)
    start = initial if initial is not None else x.new_zeros(b, G, R, P, N)
    after = PassStates.apply(added, decay_chunk, start) if n else start[:, None][:, :0]  # (b, n, G, R, P, N)

    # 4. what the state entering each chunk contributes to its outputs: exp(cs_t) C_t . h_start
    entering = after[:, : nc - 1]                                                     # into chunks 1 .. nc-1
    first = 1
    if initial is not None:
        entering, first = torch.cat([initial[:, None], entering], dim=1), 0
    decay_from_start = cs[:, first:].to(x.dtype).exp().view(b, nc - first, G, R, Q)   # exp(cs_t)
    y_off = (Cc[:, first:] @ entering.mT) * decay_from_start[..., None]              # (b, nc-first, G, R, Q, P)
    y = torch.cat([y[:, :first], y[:, first:] + y_off], dim=1) if first else y + y_off

    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, nc * Q, H, P)
    last = after[:, -1].reshape(b, H, P, N) if final_state else None
    return y[:, :length], last


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_LIMIT,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    *,
    chunk_size: int = 256,
    backend: str | None = None,
):
    """The Mamba-2 scan; arguments and layout as mamba_ssm's `mamba_chunk_scan_combined` (see the module docstring).

    Returns y (b, L, H, P) in x's dtype, and with `return_final_states` also the final state (b, H, P, N) in
    float32 (float64 for float64 inputs). Differentiable in every tensor argument, the initial state included.
    `chunk_size` is passed to the CUDA kernel only; the CPU form picks its own chunks (`chunk_length`).
    """
    _check_shapes(x, dt, A, B, C, D, z, dt_bias, initial_states)
    backend = choose_ssd_backend(x, backend)
    if backend == "reference":
        out = ssd_scan_reference(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_states,
                                 return_final_states)
        if return_final_states:
            return out[0].to(x.dtype), out[1].float()
        return out.to(x.dtype)
    if backend == "cuda":
        return cuda_kernel()(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                             dt_softplus=dt_softplus, dt_limit=tuple(dt_limit), return_final_states=return_final_states)

    # the exact chunked form; computes in float32 (float64 stays float64, for gradcheck)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_c, dt_c = x.to(compute), dt.to(compute)
    if dt_bias is not None:
        dt_c = dt_c + dt_bias.to(compute)
    if dt_softplus:
        dt_c = F.softplus(dt_c)
    if tuple(dt_limit) != NO_LIMIT:
        dt_c = dt_c.clamp(min=dt_limit[0], max=dt_limit[1])
    s0 = initial_states.to(compute) if initial_states is not None else None
    if x.shape[1] == 0:
        y = x_c.new_zeros(x.shape)
        last = s0 if s0 is not None else x_c.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[3])
    else:
        y, last = ssd_chunked(x_c, dt_c, A.to(compute), B.to(compute), C.to(compute), s0, chunk_length(x.shape[1]),
                              final_state=return_final_states)
    if D is not None:
        D_c = D.to(compute)
        y = y + x_c * (D_c[:, None] if D.dim() == 1 else D_c)
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(x.dtype)
    return (y, last) if return_final_states else y
