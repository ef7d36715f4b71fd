"""Forward + backward of the Mamba-2 (SSD) scan on the CPU: ours against transformers' torch path and a plain loop.

    python benchmarks/scan_mamba2.py [--batch 2 --length 512 --heads 24 --head-dim 64 --groups 1 --d-state 128]

The defaults are one layer of mamba2-130m. Every implementation computes the same scan (dt bias, softplus, D skip;
no gate, which transformers' chunked scan does not take) on the same fp32 inputs, and their outputs and all
gradients are compared with the float64 sequential reference:
  * mambapeft: `ssd_scan`, the exact chunked form (chunks of 64, decays in float64);
  * transformers: `mamba2_chunk_scan`, the torch fallback Mamba2ForCausalLM runs on the CPU (chunks of 256);
  * plain loop: the recurrence one step at a time in float32 (the reference's algorithm, without float64).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from _common import forward_backward, machine, rel_err, setup_threads, timed

NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias")


def make_inputs(batch, length, heads, head_dim, groups, d_state, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return {"x": r(batch, length, heads, head_dim), "dt": r(batch, length, heads) * 0.5 - 1.0,
            "A": -torch.exp(r(heads) * 0.5), "B": r(batch, length, groups, d_state),
            "C": r(batch, length, groups, d_state), "D": r(heads), "dt_bias": r(heads) * 0.1}


def plain_loop(x, dt, A, B, C, D, dt_bias):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T; y_t = h_t C_t + D x_t, one step at a time, in x's dtype."""
    batch, length, heads, head_dim = x.shape
    per_group = heads // B.shape[2]
    dt = F.softplus(dt + dt_bias)
    B, C = B.repeat_interleave(per_group, dim=2), C.repeat_interleave(per_group, dim=2)
    state = x.new_zeros(batch, heads, head_dim, B.shape[-1])
    ys = []
    for t in range(length):
        drive = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None]                   # (b, H, P, N)
        state = torch.exp(dt[:, t] * A)[:, :, None, None] * state + drive
        ys.append((state @ C[:, t, :, :, None]).squeeze(-1))
    return torch.stack(ys, dim=1) + x * D[:, None]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--d-state", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    setup_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    from mambapeft import ssd_scan, ssd_scan_reference

    inputs = make_inputs(args.batch, args.length, args.heads, args.head_dim, args.groups, args.d_state)
    weights = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(1))
    candidates = {
        "mambapeft (chunked, exact)": lambda **t: ssd_scan(**t, dt_softplus=True),
        "transformers torch path": lambda x, dt, A, B, C, D, dt_bias: mamba2_chunk_scan(
            x, dt, A, B, C, 256, D=D, dt_bias=dt_bias, dt_softplus=True),
        "plain loop (float32)": plain_loop,
    }

    print(f"Mamba-2 scan forward+backward, fp32, batch {args.batch}, L {args.length}, H {args.heads}, "
          f"P {args.head_dim}, G {args.groups}, N {args.d_state}")
    print(f"machine: {machine()}")
    y_ref, g_ref = forward_backward(lambda **t: ssd_scan_reference(**t, dt_softplus=True), inputs, weights.double())

    results = {}
    for name, scan in candidates.items():
        slow = "loop" in name
        seconds, (y, grads) = timed(lambda scan=scan: forward_backward(scan, inputs, weights),
                                    1 if slow else args.repeats, warmup=0 if slow else 1)
        grad_error, worst = max((rel_err(grads[k], g_ref[k]), k) for k in NAMES)
        results[name] = (seconds, rel_err(y, y_ref), grad_error, worst)

    ours = results["mambapeft (chunked, exact)"][0]
    print("max rel. error vs float64 (max |a - b| / max |b|): of y, and of the worst gradient")
    print(f"{'implementation':30s} {'time (ms)':>10s} {'ours is faster by':>18s} {'error of y':>11s} "
          f"{'of gradients':>20s}")
    for name, (seconds, y_error, grad_error, worst) in results.items():
        print(f"{name:30s} {seconds * 1e3:10.1f} {seconds / ours:17.1f}x {y_error:11.1e} {grad_error:9.1e} "
              f"({worst:>7s})")


if __name__ == "__main__":
    main()
