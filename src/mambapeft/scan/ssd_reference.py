"""The Mamba-2 scan (SSD) written as plainly as possible, in float64: the oracle the fast form is tested against.

One time step at a time, straight from the recurrence of the Mamba-2 paper, per head h (scalar A_h):

    h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T          (P x N)
    y_t = h_t C_t + D x_t,          then y_t * silu(z_t)

B and C are shared by groups of heads: head h reads group h // (H / G). Autograd differentiates it, so it is
also the oracle for the gradients. It is slow on purpose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ssd_scan_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
):
    """Same arguments and layout as `mambapeft.scan.ssd_scan`; computes and returns float64 tensors."""
    f64 = torch.float64
    x, dt, A, B, C = (t.to(f64) for t in (x, dt, A, B, C))
    batch, length, heads, head_dim = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    if dt_bias is not None:
        dt = dt + dt_bias.to(f64)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    B = B.repeat_interleave(heads // groups, dim=2)                     # (b, L, H, N): head h -> group h // (H/G)
    C = C.repeat_interleave(heads // groups, dim=2)

    state = torch.zeros(batch, heads, head_dim, d_state, dtype=f64, device=x.device)
    if initial_states is not None:
        state = state + initial_states.to(f64)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]                              # (b, H, 1, 1)
        drive = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]         # (b, H, P, N)
        state = decay * state + drive
        ys.append((state * C[:, t, :, None, :]).sum(-1))                               # (b, H, P)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)
    if D is not None:
        D = D.to(f64)
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.to(f64))
    return (y, state) if return_final_states else y
