"""Forward + backward of the gated delta rule (Gated DeltaNet: Qwen3.5, Qwen3-Next) on the CPU: ours against
transformers' torch path, side by side in one process, and each against the time of its own matrix products.

    python benchmarks/scan_gated_delta.py [--lengths 512 2048 --batch 1 --heads 16 --key-heads 16 --d-k 128 --d-v 128]

The defaults are one Gated DeltaNet layer of Qwen3-Next-80B-A3B's shape (16 key heads of 128; there 32 value heads,
here 16 unless --heads). Both compute the same rule on the same fp32 inputs (q and k l2-normalised inside, as the
models call them; no initial state unless --initial-state) and differentiate o with respect to q, k, v, g and beta:
  * mambapeft: `gated_delta_rule`, the exact chunked form (chunks of 64, UT transform, one sequential product
    per chunk, outputs batched, hand-written backward of the sequential part);
  * transformers: `torch_chunk_gated_delta_rule`, what Qwen3NextGatedDeltaNet and Qwen3_5GatedDeltaNet run without
    flash-linear-attention (chunks of 64, autograd through its loop over chunks).
The two run alternately, `--repeats` times each, and the medians are compared (the machine may be shared).

Matmul bound: every matrix product each implementation runs (forward and backward) is recorded with its shapes
(a TorchDispatchMode on mm / bmm / addmm / baddbmm), then the same products are timed alone on fresh contiguous
tensors. The ratio time / bound says how far each is from its own GEMMs (transformers' triangular solves are not
products and count as overhead). With --check the outputs and gradients are compared with the float64 recurrence.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time

import torch
import torch.nn.functional as F
from _common import machine, rel_err, setup_threads
from torch.utils._python_dispatch import TorchDispatchMode

NAMES = ("q", "k", "v", "g", "beta")
aten = torch.ops.aten
PRODUCTS = {aten.mm: (0, 1), aten.bmm: (0, 1), aten.addmm: (1, 2), aten.baddbmm: (1, 2)}   # operands, any overload


def make_inputs(batch, length, key_heads, heads, d_k, d_v, initial_state, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    a, dt_bias, A = r(batch, length, heads), r(heads) * 0.5, torch.empty(heads).uniform_(1, 16, generator=gen)
    inputs = {"q": r(batch, length, key_heads, d_k), "k": r(batch, length, key_heads, d_k),
              "v": r(batch, length, heads, d_v), "g": -A * F.softplus(a + dt_bias),     # the models' decay
              "beta": torch.sigmoid(r(batch, length, heads))}
    if initial_state:
        inputs["initial_state"] = r(batch, heads, d_k, d_v) * 0.1
    return inputs


def forward_backward(fn, inputs, seed=1):
    """o = fn(**inputs) and the gradients of sum(o * w) with respect to every input (fresh leaves)."""
    leaves = {k: t.clone().requires_grad_() for k, t in inputs.items()}
    o = fn(**leaves)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(o.dtype)
    (o * w).sum().backward()
    return o.detach(), {k: t.grad for k, t in leaves.items()}


class RecordProducts(TorchDispatchMode):
    """Records the operand shapes of every matrix product run under it."""

    def __init__(self):
        super().__init__()
        self.shapes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in PRODUCTS:
            left, right = PRODUCTS[func.overloadpacket]
            self.shapes[(tuple(args[left].shape), tuple(args[right].shape))] += 1
        return func(*args, **(kwargs or {}))


def product_bound(shapes: collections.Counter, repeats: int = 3) -> tuple[float, float]:
    """Seconds to run the recorded products alone (each shape timed on fresh contiguous operands, median of
    `repeats`, times its count) and their GFLOP."""
    seconds = flops = 0.0
    for (left, right), count in shapes.items():
        a, b = torch.randn(left), torch.randn(right)
        product = torch.bmm if a.dim() == 3 else torch.mm
        product(a, b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            product(a, b)
            times.append(time.perf_counter() - start)
        seconds += statistics.median(times) * count
        flops += 2 * torch.Size(left).numel() * right[-1] * count
    return seconds, flops / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16, help="value heads")
    parser.add_argument("--key-heads", type=int, default=16)
    parser.add_argument("--d-k", type=int, default=128)
    parser.add_argument("--d-v", type=int, default=128)
    parser.add_argument("--initial-state", action="store_true", help="also a trained initial state (and its grad)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check", action="store_true", help="compare with the float64 recurrence (slow)")
    args = parser.parse_args()
    setup_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    from mambapeft.scan.gated_delta import gated_delta_rule
    from mambapeft.scan.gated_delta_reference import gated_delta_rule_reference

    candidates = {
        "mambapeft": lambda **t: gated_delta_rule(**t, use_qk_l2norm=True)[0],
        "transformers": lambda q, k, v, g, beta, initial_state=None: torch_chunk_gated_delta_rule(
            q, k, v, g, beta, initial_state=initial_state, use_qk_l2norm_in_kernel=True)[0],
    }
    print(f"gated delta rule forward+backward, fp32, batch {args.batch}, heads {args.heads} (key heads "
          f"{args.key_heads}), d_k {args.d_k}, d_v {args.d_v}, initial state: {args.initial_state}")
    print(f"machine: {machine()}")
    print(f"{'L':>6s} {'implementation':14s} {'time (ms)':>10s} {'matmul bound':>13s} {'time/bound':>11s} "
          f"{'GEMM GFLOP':>11s} {'vs ours':>8s} {'diff vs ours (o, grads)':>24s}")
    for length in args.lengths:
        inputs = make_inputs(args.batch, length, args.key_heads, args.heads, args.d_k, args.d_v, args.initial_state)
        results, times = {}, {name: [] for name in candidates}
        for name, fn in candidates.items():
            results[name] = forward_backward(fn, inputs)                                 # warm-up
        for _ in range(args.repeats):                                                    # alternately
            for name, fn in candidates.items():
                start = time.perf_counter()
                forward_backward(fn, inputs)
                times[name].append(time.perf_counter() - start)
        ours = statistics.median(times["mambapeft"])
        for name, fn in candidates.items():
            with RecordProducts() as recorder:
                forward_backward(fn, inputs)
            bound, gflop = product_bound(recorder.shapes)
            seconds = statistics.median(times[name])
            o, grads = results[name]
            o_ours, grads_ours = results["mambapeft"]
            diff = max(rel_err(grads[k], grads_ours[k]) for k in grads)
            print(f"{length:6d} {name:14s} {seconds * 1e3:10.1f} {bound * 1e3:11.1f}ms {seconds / bound:10.2f}x "
                  f"{gflop:11.2f} {seconds / ours:7.2f}x {rel_err(o, o_ours):11.1e} {diff:11.1e}")
        if args.check:
            reference = lambda **t: gated_delta_rule_reference(**t, use_qk_l2norm=True)[0]  # noqa: E731
            o_ref, g_ref = forward_backward(reference, {k: t.double() for k, t in inputs.items()})
            for name, (o, grads) in results.items():
                worst = max((rel_err(grads[k], g_ref[k]), k) for k in grads)
                print(f"{'':6s} {name:14s} vs float64: o {rel_err(o, o_ref):.1e}, worst gradient {worst[0]:.1e} "
                      f"({worst[1]})")


if __name__ == "__main__":
    main()
