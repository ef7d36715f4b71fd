"""The selective scan written as plainly as possible, in float64: the oracle the fast backends are tested against.

One time step at a time, straight from the recurrence of the Mamba paper:

    s_t = exp(delta_t * A) * s_{t-1} + delta_t * B_t * u_t
    y_t = <s_t, C_t> + D * u_t,        then y_t * silu(z_t)

B and C may also be grouped, (batch, G, N, L) as mamba_ssm accepts: channel e then uses group e // (E / G)
(VMamba's four scan directions are four groups). Autograd differentiates it, so it is also the oracle for the
gradients. It is slow on purpose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_reference(
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
):
    """Same arguments and layout as `mambapeft.selective_scan`; computes and returns float64 tensors."""
    f64 = torch.float64
    u, delta, A, B, C = (t.to(f64) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(f64)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, d_inner, length = u.shape
    # B, C per channel: (b, E, N, L), whether given once for all channels (b, N, L) or per group (b, G, N, L)
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    B = B.repeat_interleave(d_inner // B.shape[1], dim=1)
    C = C.repeat_interleave(d_inner // C.shape[1], dim=1)
    state = torch.zeros(batch, d_inner, A.shape[1], dtype=f64, device=u.device)
    if initial_state is not None:
        state = state + initial_state.to(f64)
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, :, t, None] * A)                                # (b, E, N)
        drive = (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, :, :, t]          # (b, E, N)
        state = decay * state + drive
        ys.append((state * C[:, :, :, t]).sum(-1))                                 # (b, E)
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, d_inner, 0)
    if D is not None:
        y = y + u * D.to(f64)[:, None]
    if z is not None:
        y = y * F.silu(z.to(f64))
    return (y, state) if return_last_state else y
