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

Everything but S_0 is known per chunk without the past, so the chunk's effect folds into two affine maps of S_0:

    o   = (e Q - M W_k) S_0 + M W_v                       (Q x d_k) S_0 + (Q x d_v)
    S_Q = (exp(gamma_Q) I - Kd^T W_k) S_0 + Kd^T W_v      (d_k x d_k) S_0 + (d_k x d_v)

All of these are batched matrix products over every chunk at once; what remains sequential is one (d_k x d_k) @
(d_k x d_v) product per chunk (`PassStates`, with a hand-written reverse loop for its backward), after which the
outputs of all chunks are again one batched product. Nothing is approximated: only exponentials of non-positive
numbers are taken (no ratio of decays), and the cumulative sums and their differences are taken in float64
(tensors of size b L H and b L H Q, small next to the matmuls), then rounded to float32, as in ssd.py. Gradients
come from autograd through the same operations (the triangular solve included), so they are exact gradients of the
same arithmetic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .gated_delta_reference import l2_normalize

# Steps per chunk: the UT system is Q x Q, and every chunk adds one sequential (d_k x d_k) @ (d_k x d_v) product.
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


class PassStates(torch.autograd.Function):
    """The sequential part: S_{c+1} = P_c S_c + R_c, with S_0 = initial.

    P (B, n, d_k, d_k); R (B, n, d_k, d_v); initial (B, d_k, d_v). Returns every state S_0 .. S_n (B, n+1, d_k, d_v).
    The backward is one reverse loop, g_c = dS_c + P_c^T g_{c+1}, then dP and dR for all chunks in one product.
    """

    @staticmethod
    def forward(ctx, P, R, initial):
        n = P.shape[1]
        states = R.new_empty(R.shape[0], n + 1, *R.shape[2:])
        states[:, 0] = initial
        for c in range(n):
            torch.baddbmm(R[:, c], P[:, c], states[:, c], out=states[:, c + 1])
        ctx.save_for_backward(P, states)
        return states

    @staticmethod
    def backward(ctx, grad_states):
        P, states = ctx.saved_tensors
        n = P.shape[1]
        grad_R = torch.empty_like(states[:, 1:])                                     # dLoss/dS_{c+1}, total
        grad = grad_states[:, n]
        for c in range(n - 1, -1, -1):
            grad_R[:, c] = grad
            grad = torch.baddbmm(grad_states[:, c], P[:, c].mT, grad)
        grad_P = grad_R @ states[:, :n].mT if ctx.needs_input_grad[0] else None     # (B, n, d_k, d_k)
        return grad_P, grad_R, grad


def gated_delta_chunked(q, k, v, g, beta, initial_state, chunk: int):
    """The chunked core (see the module docstring). q, k (B, L, d_k) already normalised, scaled and repeated to the
    value heads; v (B, L, d_v); g, beta (B, L); initial_state (B, d_k, d_v) or None; B = batch x heads.
    Returns o (B, L, d_v) and the final state (B, d_k, d_v)."""
    B, length, d_k = k.shape
    d_v = v.shape[2]
    Q = chunk
    nc = math.ceil(length / Q)
    pad = nc * Q - length
    if pad:   # steps with k = 0 and beta = 0, g = 0: no decay and no write, so o and the final state are unchanged
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    q, k, v = (t.view(B, nc, Q, t.shape[-1]) for t in (q, k, v))                       # (B, c, Q, d)
    beta = beta.view(B, nc, Q, 1)

    # decays: gamma = cumulative log-decay inside the chunk, in float64 (see the module docstring)
    gamma = g.double().view(B, nc, Q).cumsum(-1)                                         # (B, c, Q)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=k.device).tril()
    Gamma = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, -math.inf).to(k.dtype).exp()  # [t, s]
    e = gamma.to(k.dtype).exp()[..., None]                                               # (B, c, Q, 1) exp(gamma_t)
    to_end = (gamma[..., -1:] - gamma).to(k.dtype).exp()[..., None]                      # exp(gamma_Q - gamma_s)
    e_end = e[:, :, -1]                                                                  # (B, c, 1) exp(gamma_Q)

    # 1. the UT system of every chunk: W = T [beta V | beta e K]  (unit lower-triangular solve)
    k_beta = k * beta
    system = (k_beta @ k.mT) * Gamma                                    # its strictly lower part is A; diagonal unused
    W = torch.linalg.solve_triangular(system, torch.cat([v * beta, k_beta * e], -1), upper=False, unitriangular=True)
    # 2. each chunk as affine maps of its entering state
    M = (q @ k.mT) * Gamma                                                               # (B, c, Q, Q)
    MW = M @ W                                                                           # [M W_v | M W_k]
    out_bias, out_map = MW[..., :d_v], q * e - MW[..., d_v:]                             # (B, c, Q, d_v), (.., d_k)
    KW = (k * to_end).mT @ W                                                             # [Kd^T W_v | Kd^T W_k]
    eye = torch.eye(d_k, dtype=k.dtype, device=k.device)
    state_bias, state_map = KW[..., :d_v], e_end[..., None] * eye - KW[..., d_v:]       # (B, c, d_k, d_v), (.., d_k)
    # 3. the states entering each chunk, in sequence; 4. every chunk's outputs at once
    start = initial_state if initial_state is not None else k.new_zeros(B, d_k, d_v)
    states = PassStates.apply(state_map, state_bias, start)                             # (B, c+1, d_k, d_v)
    o = out_map @ states[:, :nc] + out_bias                                              # (B, c, Q, d_v)
    return o.reshape(B, nc * Q, d_v)[:, :length], states[:, nc]


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
    s0 = initial_state.to(compute).reshape(b * heads, d_k, d_v) if initial_state is not None else None
    if length == 0:
        o = v.new_zeros(v.shape)
        last = s0 if s0 is not None else v.new_zeros(b * heads, d_k, d_v, dtype=compute)
    else:
        heads_first = lambda t: t.transpose(1, 2).reshape(b * heads, length, *t.shape[3:])  # noqa: E731
        o, last = gated_delta_chunked(heads_first(q), heads_first(k), heads_first(v.to(compute)), heads_first(g),
                                      heads_first(beta), s0, chunk_length(length))
        o = o.view(b, heads, length, d_v).transpose(1, 2).to(v.dtype)                    # (b, L, H, d_v)
    return o, (last.reshape(b, heads, d_k, d_v) if output_final_state else None)


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
