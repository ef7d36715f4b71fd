"""The gated delta rule (Gated DeltaNet: Qwen3-Next, Qwen3.5) written as plainly as possible, in float64: the oracle
the chunked form of gated_delta.py is tested against.

One time step at a time, per head, with a matrix state S (d_k x d_v) that maps keys to values:

    S <- exp(g_t) S                                   decay (g_t <= 0, one number per head and step)
    S <- S + k_t (beta_t (v_t - S^T k_t))^T           delta rule: move S's answer for k_t toward v_t by beta_t
    o_t = S^T q_t                                     read with the (scaled) query

with q scaled by 1/sqrt(d_k) and, optionally, q and k l2-normalised first (transformers' `use_qk_l2norm_in_kernel`).
The delta rule reads the state *after* the decay, as transformers and the flash-linear-attention kernels do.
Grouped heads: with H_k key heads and H_v = R H_k value heads, value head h reads key head h // R.

Layouts are those of transformers' `torch_chunk_gated_delta_rule`: q, k (b, L, H_k, d_k); v (b, L, H_v, d_v);
g, beta (b, L, H_v); states (b, H_v, d_k, d_v). Autograd differentiates it, so it is also the gradient oracle.
It is slow on purpose.
"""

from __future__ import annotations

import torch


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps) over the last axis (eps inside the root, as flash-linear-attention and transformers)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gated_delta_rule_reference(
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
    """Same arguments and layout as `mambapeft.scan.gated_delta.gated_delta_rule`. Returns o (b, L, H_v, d_v) and
    the final state (b, H_v, d_k, d_v) (None unless `output_final_state`), float64."""
    f64 = torch.float64
    q, k, v, g, beta = (t.to(f64) for t in (q, k, v, g, beta))
    batch, length, key_heads, d_k = k.shape
    heads, d_v = v.shape[2], v.shape[3]
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    q = q * (d_k**-0.5 if scale is None else scale)
    q = q.repeat_interleave(heads // key_heads, dim=2)                 # (b, L, H_v, d_k): head h reads h // R
    k = k.repeat_interleave(heads // key_heads, dim=2)

    S = torch.zeros(batch, heads, d_k, d_v, dtype=f64, device=v.device)
    if initial_state is not None:
        S = S + initial_state.to(f64)
    outputs = []
    for t in range(length):
        q_t, k_t, v_t = q[:, t], k[:, t], v[:, t]                       # (b, H, d_k), (b, H, d_k), (b, H, d_v)
        S = torch.exp(g[:, t])[..., None, None] * S                      # decay
        recalled = (S * k_t[..., None]).sum(-2)                          # S^T k_t (b, H, d_v)
        delta = beta[:, t, :, None] * (v_t - recalled)                   # (b, H, d_v)
        S = S + k_t[..., None] * delta[..., None, :]                     # + k_t delta^T
        outputs.append((S * q_t[..., None]).sum(-2))                     # S^T q_t (b, H, d_v)
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape)
    return o, (S if output_final_state else None)
