"""The gated delta rule (Gated DeltaNet, the linear-recurrent mixer of Qwen3-Next and Qwen3.5), exact and chunked.

Shapes: batch b, length L, key heads H_k, value heads H = R H_k (value head h reads key head h // R), key dim d_k,
value dim d_v. Layouts are those of transformers' `torch_chunk_gated_delta_rule` and flash-linear-attention:

    q, k (b, L, H_k, d_k)   v (b, L, H, d_v)   g, beta (b, L, H)   states S (b, H, d_k, d_v)
    S_t = exp(g_t) S_{t-1};  S_t += k_t (beta_t (v_t - S_t^T k_t))^T;  o_t = S_t^T q_t      (gated_delta_reference.py)

q is scaled by 1/sqrt(d_k) (or `scale`), after an optional l2-normalisation of q and k (`use_qk_l2norm`).

Why chunks, and why they stay exact. Inside a chunk of Q steps let gamma_t be the cumulative sum of g from the
chunk's start, Gamma[t, s] = exp(gamma_t - gamma_s) for s <= t (0 above), and S_0 the state entering the chunk.
Unrolling the recurrence gives the state as the decayed S_0 plus rank-one writes k_s u_s^T, whose "new values"
u_s solve a unit lower-triangular system (the WY / UT form of DeltaNet, Yang et al. 2024):

    (I + A) U = beta V - (beta e K) S_0,      A = strictly_lower(beta K K^T * Gamma),   e_t = exp(gamma_t)
    U = W_v - W_k S_0                         W_v = T (beta V), W_k = T (beta e K),  T = (I + A)^-1
    o  = (e Q) S_0 + M U                      M = lower(Q K^T * Gamma), diagonal included
    S_Q = exp(gamma_Q) S_0 + Kd^T U           Kd_s = exp(gamma_Q - gamma_s) k_s

Everything but S_0 is known per chunk without the past: A, T (by halves, `UnitLowerInverse`, whose backward is
two products), W_v, W_k, Kd and M are batched matrix products over every chunk at once. What remains sequential is,
per chunk, U = W_v - W_k S_0 and S_Q = exp(gamma_Q) S_0 + Kd^T U: two (Q x d_k) by (d_k x d_v)-sized products
(`PassStates`, chunk-major so each step touches contiguous blocks, with a hand-written reverse loop for its
backward), after which the outputs of all chunks are again one batched product. Every (chunk, head) pair is one
matrix of a 3-D batch, so each product is a bmm on views (a 4-D matmul would copy its transposed operands).
Nothing is approximated: only exponentials of non-positive numbers are taken (no ratio of decays), and the
cumulative sums and their differences are taken in float64 (tensors of size b L H and b L H Q, small next to the
matmuls), then rounded to float32, as in ssd.py. The other gradients come from autograd through the same
operations, so all are exact gradients of the same arithmetic.

Speed (benchmarks/scan_gated_delta.py): forward + backward against transformers' `torch_chunk_gated_delta_rule`,
which runs the same UT form but solves the triangular systems with `solve_triangular` and lets autograd record
its loop over chunks. 64 steps per chunk measured as fast as 32 and faster than 128 here (L 2048, d_k = d_v = 128).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .gated_delta_reference import l2_normalize

# Steps per chunk: the UT system is Q x Q (intra-chunk work grows with Q), every chunk adds two sequential products.
_CHUNK = 64


def chunk_length(length: int) -> int:
    """Chunks of at most _CHUNK steps, evened out so that padding the last one wastes few steps."""
    chunks = max(1, math.ceil(length / _CHUNK))
    return math.ceil(length / chunks)


def _check_shapes(q, k, v, g, beta, initial_state):
    def fail(what):
        raise ValueError(
            f"gated_delta_rule: {what}. Expected q, k (batch, L, H_k, d_k); v (batch, L, H, d_v) with H % H_k == 0; "
            f"g, beta (batch, L, H); initial_state (batch, H, d_k, d_v). Got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}, g {tuple(g.shape)}, beta {tuple(beta.shape)}."
        )

    if k.dim() != 4 or q.shape != k.shape:
        fail("q and k must be 4-dimensional and alike")
    if v.dim() != 4 or v.shape[:2] != k.shape[:2] or v.shape[2] % k.shape[2]:
        fail("v must be (batch, L, H, d_v) with H a multiple of q and k's heads")
    if g.shape != v.shape[:3] or beta.shape != v.shape[:3]:
        fail("g and beta must be (batch, L, H)")
    state_shape = (v.shape[0], v.shape[2], k.shape[3], v.shape[3])
    if initial_state is not None and initial_state.shape != state_shape:
        fail(f"initial_state must be (batch, H, d_k, d_v) = {state_shape}, got {tuple(initial_state.shape)}")


def _unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """(I + A)^-1 for the strictly lower triangle A of (..., n, n) (what lies on and above the diagonal is not read),
    by halves: [[T11, 0], [-T22 A21 T11, T22]]; blocks of at most 16 by the product (I + X)(I + X^2)(I + X^4)...
    with X = -A, exact because X^n = 0."""
    n = A.shape[-1]
    if n <= 16:
        X = -A.tril(-1)
        T = X + torch.eye(n, dtype=A.dtype, device=A.device)
        power = 2
        while power < n:                                    # T = sum of X^j for j < 2 power
            X = X @ X
            T = T + T @ X
            power *= 2
        return T
    h = n // 2
    if n % 2 == 0:                                          # both halves in one call
        T11, T22 = _unit_lower_inverse(torch.stack([A[..., :h, :h], A[..., h:, h:]]))
    else:
        T11, T22 = _unit_lower_inverse(A[..., :h, :h]), _unit_lower_inverse(A[..., h:, h:])
    T21 = -(T22 @ (A[..., h:, :h] @ T11))
    top = torch.cat([T11, T11.new_zeros(*T11.shape[:-1], n - h)], -1)
    return torch.cat([top, torch.cat([T21, T22], -1)], -2)


class UnitLowerInverse(torch.autograd.Function):
    """T = (I + A)^-1 for the strictly lower triangle A of (..., n, n), the UT transform of each chunk.
    Backward: dA = -strictly_lower(T^T dT T^T) (the gradient of an inverse, kept to A's pattern)."""

    @staticmethod
    def forward(ctx, A):
        T = _unit_lower_inverse(A)
        ctx.save_for_backward(T)
        return T

    @staticmethod
    def backward(ctx, grad_T):
        (T,) = ctx.saved_tensors
        return -(T.mT @ grad_T @ T.mT).tril(-1)


class PassStates(torch.autograd.Function):
    """The sequential part, chunk by chunk (c = 0 .. n-1), from S_0 = initial:

        U_c = W_v,c - W_k,c S_c                           (Q x d_v) the new values of chunk c
        S_{c+1} = exp(gamma_Q,c) S_c + Kd_c^T U_c         (d_k x d_v)

    W_v (n, B, Q, d_v); W_k, Kd (n, B, Q, d_k); decay (n, B) = exp(gamma_Q); initial (B, d_k, d_v). Returns the
    states entering the chunks S_0 .. S_{n-1} (n, B, d_k, d_v), U (n, B, Q, d_v) and the final state S_n (B, d_k,
    d_v). Chunk-major, so that each step reads and writes contiguous blocks. The backward is one reverse loop (two
    products per chunk); the gradients of W_k, Kd and the decays are then one batched product each.
    """

    @staticmethod
    def forward(ctx, W_v, W_k, Kd, decay, initial):
        n = W_v.shape[0]
        states = initial.new_empty(n + 1, *initial.shape)
        U = torch.empty_like(W_v)
        states[0] = initial
        for c in range(n):
            torch.baddbmm(W_v[c], W_k[c], states[c], alpha=-1, out=U[c])
            torch.addcmul(torch.bmm(Kd[c].mT, U[c]), decay[c, :, None, None], states[c], out=states[c + 1])
        ctx.save_for_backward(W_k, Kd, decay, states, U)
        return states[:n], U, states[n]

    @staticmethod
    def backward(ctx, grad_entering, grad_U, grad_final):
        W_k, Kd, decay, states, U = ctx.saved_tensors
        n = W_k.shape[0]
        grad_U_total = torch.empty_like(U)                    # dLoss/dU_c, through every path
        grad_next = torch.empty_like(states[1:])              # dLoss/dS_{c+1}, through every path
        grad = grad_final
        for c in range(n - 1, -1, -1):
            grad_next[c] = grad
            torch.baddbmm(grad_U[c], Kd[c], grad, out=grad_U_total[c])
            grad = torch.addcmul(grad_entering[c], decay[c, :, None, None], grad)
            grad = torch.baddbmm(grad, W_k[c].mT, grad_U_total[c], alpha=-1)
        flat = lambda t: t.flatten(0, 1)  # noqa: E731    (n, B, ...) -> (n B, ...) for one batched product
        before = flat(states[:n])
        grad_W_k = torch.baddbmm(torch.empty_like(flat(W_k)), flat(grad_U_total), before.mT, beta=0, alpha=-1)
        grad_Kd = torch.bmm(flat(U), flat(grad_next).mT)
        grad_decay = torch.bmm(flat(grad_next).flatten(1)[:, None], before.flatten(1)[:, :, None]).view(n, -1)  # dots
        return grad_U_total, grad_W_k.view_as(W_k), grad_Kd.view_as(Kd), grad_decay, grad


def gated_delta_chunked(q, k, v, g, beta, initial_state, chunk: int):
    """The chunked core (see the module docstring). q, k (b, L, H, d_k) already normalised, scaled and repeated to
    the value heads; v (b, L, H, d_v); g, beta (b, L, H); initial_state (b, H, d_k, d_v) or None.
    Returns o (b, L, H, d_v) and the final state (b, H, d_k, d_v)."""
    b, length, H, d_k = k.shape
    d_v = v.shape[3]
    B, Q = b * H, chunk
    nc = math.ceil(length / Q)
    pad = nc * Q - length
    if pad:   # steps with k = 0 and beta = 0, g = 0: no decay and no write, so o and the final state are unchanged
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        g, beta = F.pad(g, (0, 0, 0, pad)), F.pad(beta, (0, 0, 0, pad))
    # chunk-major, every (chunk, head) one matrix of a batch: (b, L, H, ...) -> (c b H, Q, ...); kept 3-D so that
    # every product is a bmm on views (4-D matmuls copy transposed operands)
    chunked = lambda t: t.reshape(b, nc, Q, H, -1).permute(1, 0, 3, 2, 4).reshape(nc * B, Q, t.shape[-1])  # noqa: E731
    q, k, v, beta = chunked(q), chunked(k), chunked(v), chunked(beta[..., None])

    # decays: gamma = cumulative log-decay inside the chunk, in float64 (see the module docstring)
    gamma = chunked(g.double()[..., None]).squeeze(-1).cumsum(-1)                        # (c B, Q)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=k.device).tril()
    Gamma = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, -math.inf).to(k.dtype).exp()  # [t, s]
    e = gamma.to(k.dtype).exp()[..., None]                                               # (c B, Q, 1) exp(gamma_t)
    to_end = (gamma[..., -1:] - gamma).to(k.dtype).exp()[..., None]                      # exp(gamma_Q - gamma_s)
    decay = e[:, -1, 0].view(nc, B)                                                      # exp(gamma_Q)

    # 1. the UT transform of every chunk: T = (I + A)^-1, W_v = T (beta V), W_k = T (beta e K); the diagonal
    # factors beta and e scale the rows and columns of the Q x Q matrices (smaller than the Q x d ones when Q < d)
    A = torch.bmm(k, k.mT) * Gamma * beta                   # (c B, Q, Q) [t, s]; only its strictly lower part is read
    T = UnitLowerInverse.apply(A)
    beta_row = beta.mT                                                                   # (c B, 1, Q)
    W_v, W_k = torch.bmm(T * beta_row, v), torch.bmm(T * (beta_row * e.mT), k)
    # 2. the states entering each chunk and the new values, in sequence
    start = initial_state.reshape(B, d_k, d_v) if initial_state is not None else k.new_zeros(B, d_k, d_v)
    by_chunk = lambda t: t.view(nc, B, *t.shape[1:])  # noqa: E731
    entering, U, last = PassStates.apply(by_chunk(W_v), by_chunk(W_k), by_chunk(k * to_end), decay, start)
    # 3. every chunk's outputs at once: o = (e Q) S_c + M U,  M = lower(Q K^T * Gamma)
    o = torch.baddbmm(torch.bmm(torch.bmm(q, k.mT) * Gamma, U.flatten(0, 1)), q * e, entering.flatten(0, 1))
    o = o.view(nc, b, H, Q, d_v).permute(1, 0, 3, 2, 4).reshape(b, nc * Q, H, d_v)
    return o[:, :length], last.view(b, H, d_k, d_v)


def _prepare(q, k, g, beta, heads, use_qk_l2norm, scale, compute):
    """q, k in the compute dtype, normalised, scaled and repeated to the value heads."""
    q, k = q.to(compute), k.to(compute)
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    q = q * (k.shape[-1] ** -0.5 if scale is None else scale)
    R = heads // k.shape[-2]
    if R > 1:
        q, k = q.repeat_interleave(R, dim=-2), k.repeat_interleave(R, dim=-2)
    return q, k, g.to(compute), beta.to(compute)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule over a sequence; layouts as transformers' `torch_chunk_gated_delta_rule`.

    Returns o (b, L, H, d_v) in v's dtype and the final state (b, H, d_k, d_v) in float32 (float64 for float64
    inputs), None unless `output_final_state`. Differentiable in every tensor argument, the initial state included.
    """
    _check_shapes(q, k, v, g, beta, initial_state)
    compute = torch.float64 if v.dtype == torch.float64 else torch.float32
    b, length, heads, d_v = v.shape
    d_k = k.shape[-1]
    q, k, g, beta = _prepare(q, k, g, beta, heads, use_qk_l2norm, scale, compute)
    s0 = initial_state.to(compute) if initial_state is not None else None
    if length == 0:
        o = v.new_zeros(v.shape)
        last = s0 if s0 is not None else v.new_zeros(b, heads, d_k, d_v, dtype=compute)
    else:
        o, last = gated_delta_chunked(q, k, v.to(compute), g, beta, s0, chunk_length(length))
        o = o.to(v.dtype)
    return o, (last if output_final_state else None)


def gated_delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token (decoding): q, k (b, H_k, d_k); v (b, H, d_v); g, beta (b, H); state (b, H, d_k, d_v) or None
    (zeros). Returns o (b, H, d_v) in v's dtype and the new state (float32; float64 for float64 inputs), a new
    tensor (the old one is not written, so a state can be branched from or differentiated through)."""
    compute = torch.float64 if v.dtype == torch.float64 else torch.float32
    q, k, g, beta = _prepare(q, k, g, beta, v.shape[1], use_qk_l2norm, scale, compute)
    S = state.to(compute) if state is not None else v.new_zeros(*v.shape[:2], k.shape[-1], v.shape[-1], dtype=compute)
    S = torch.exp(g)[..., None, None] * S                                                 # decay
    recalled = (k[..., None, :] @ S).squeeze(-2)                                         # S^T k (b, H, d_v)
    delta = beta[..., None] * (v.to(compute) - recalled)
    S = S + k[..., :, None] * delta[..., None, :]                                        # + k delta^T
    o = (q[..., None, :] @ S).squeeze(-2)                                                # S^T q (b, H, d_v)
    return o.to(v.dtype), S
