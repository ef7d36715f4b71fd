"""One training step of VMamba-S (random weights, every parameter trainable) on the CPU, and what bounds it.

    python benchmarks/vmamba.py [--arch vmamba-small --batch 8 --size 224 --threads 2 --repeats 3]

Forward + backward of the cross-entropy loss, with the scan paths the CPU has:
  * grouped  : ours, the four directions in one call of the blocked grouped kernel (scan/grouped.py);
  * per-dir. : the ungrouped sequential backend (scan/sequential.py) called once per direction, the path that
               exists without grouped B and C;
  * reference: the plain float64 per-step loop (scan/reference.py) under autograd. A whole step with it takes
               far too long (>10 GiB; autograd's select-backward writes a full-size zero tensor per time step), so
               it is timed on one block's scan per stage at --reference-batch images (default 1), scaled linearly
               to the batch (its cost is linear in the batch), and extrapolated to a step:
               step(grouped) + sum over stages of depth x (scan(reference) - scan(grouped)).
Every figure is given as wall time and as CPU time of the process (all threads): on a machine shared with other
jobs, wall time measures the machine's load as much as the code; CPU time much less so (OMP_WAIT_POLICY=PASSIVE
keeps idle threads from spinning). The matmul-bound estimate: every matmul and convolution of the step (forward and
both backward products) timed alone on the model's own shapes and summed with multiplicity, i.e. the step if all
else were free. Target: a step within 3x of that bound. --keep-memory also measures the grouped step with glibc
keeping freed memory (no mmap, no trim), so big tensors reuse pages instead of faulting fresh ones.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # before torch starts its thread pool

import argparse  # noqa: E402
import contextlib
import ctypes  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import machine, peak_memory, setup_threads  # noqa: E402


def trim():
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def keep_freed_memory() -> bool:
    """glibc: serve every allocation from the heap and never give it back (M_MMAP_MAX 0, M_TRIM_THRESHOLD 1 GiB)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 2**30))
    except (OSError, AttributeError):
        return False


def timed(fn, repeats: int, warmup: int = 1):
    """Medians of (wall, CPU) seconds of `repeats` calls after `warmup` calls, and the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


# ---------------------------------------------------------------- the scan paths


def per_direction_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, backend=None):
    """selective_scan_grouped's contract computed with the ungrouped sequential backend, one direction at a time."""
    from mambapeft.scan import selective_scan

    ys = []
    for k in range(u.shape[1]):          # direction k: (b, L, E) -> (b, E, L), B and C (b, L, N) -> (b, N, L)
        y = selective_scan(u[:, k].mT, delta[:, k].mT, A[k], B[:, k].mT, C[:, k].mT, D=D[k], delta_bias=delta_bias[k],
                           delta_softplus=delta_softplus, backend="sequential")
        ys.append(y.mT)
    return torch.stack(ys, dim=1)


def use_scan(fn):
    from mambapeft.model.vmamba import modeling as vmamba

    vmamba.selective_scan_grouped = fn


def stage_scan_inputs(config, batch: int, size: int):
    """Per stage: (depth, inputs of one SS2D scan) with the model's shapes and value ranges."""
    g = torch.Generator().manual_seed(0)
    h = size // config.patch_size
    for i, depth in enumerate(config.depths):
        E, N, L = int(config.ssm_ratio * config.dims[i]), config.d_state, (h >> i) ** 2
        yield i, depth, {
            "u": torch.randn(batch, 4, L, E, generator=g), "delta": torch.randn(batch, 4, L, E, generator=g) * 0.5,
            "A": -torch.ones(4, E, N), "B": torch.randn(batch, 4, L, N, generator=g),
            "C": torch.randn(batch, 4, L, N, generator=g), "D": torch.ones(4, E),
            "delta_bias": torch.randn(4, E, generator=g) * 0.5 - 3.0,
        }


def scan_step(fn, inputs):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = fn(**leaves, delta_softplus=True)
    y.backward(torch.ones_like(y))


# ---------------------------------------------------------------- the matmul bound


def matmul_ops(config, batch: int, size: int) -> list[tuple[str, int, tuple]]:
    """(kind, multiplicity, shape) of every matmul and convolution of one forward pass."""
    ops = []
    stride = config.patch_size // 2
    h = (size + 2 - 3) // stride + 1
    d = config.embed_dim
    ops.append(("conv", 1, (batch, config.in_chans, size, size, d // 2, 3, stride, 1, False)))   # no input grad
    ops.append(("conv", 1, (batch, d // 2, h, h, d, 3, stride, 1, True)))
    h = (h + 2 - 3) // stride + 1
    for i, depth in enumerate(config.depths):
        d = config.dims[i]
        E, N = int(config.ssm_ratio * d), config.d_state
        R = config.dt_rank or math.ceil(d / 16)
        M = batch * h * h
        hidden = int(d * config.mlp_ratio)
        ops += [("linear", depth, (M, d, E)), ("conv", depth, (batch, E, h, h, E, config.d_conv, 1, E, True)),
                ("bmm", depth, (batch, h * h, E, R + 2 * N)), ("bmm", depth, (batch, h * h, R, E)),
                ("linear", depth, (M, E, d)), ("linear", depth, (M, d, hidden)), ("linear", depth, (M, hidden, d))]
        if i < len(config.depths) - 1:
            ops.append(("conv", 1, (batch, d, h, h, 2 * d, 3, 2, 1, True)))
            h = (h + 2 - 3) // 2 + 1
    ops.append(("linear", 1, (batch, config.num_features, config.num_classes)))
    return ops


def op_flops(kind: str, shape: tuple) -> tuple[float, float]:
    """(forward, backward) FLOPs of one op; backward = weight gradient + input gradient (if needed)."""
    if kind == "linear":
        M, K, N = shape
        f = 2.0 * M * K * N
        return f, 2 * f
    if kind == "bmm":                               # (b, 4, L, K) @ (4, K, N)
        b, L, K, N = shape
        f = 2.0 * b * 4 * L * K * N
        return f, 2 * f
    b, cin, h, w, cout, k, stride, groups, input_grad = shape
    ho, wo = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    f = 2.0 * b * ho * wo * cout * (cin // groups) * k * k
    return f, f * (2 if input_grad else 1)


def op_seconds(kind: str, shape: tuple, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of forward + backward of the op alone (weight gradient, and input gradient but for the
    first conv)."""
    if kind == "linear":
        M, K, N = shape
        x, w = torch.randn(M, K, requires_grad=True), torch.randn(N, K, requires_grad=True)

        def fn():
            return F.linear(x, w)
    elif kind == "bmm":
        b, L, K, N = shape
        x, w = torch.randn(b, 4, L, K, requires_grad=True), torch.randn(4, N, K, requires_grad=True)

        def fn():
            return torch.matmul(x, w.mT)
    else:
        b, cin, h, w_, cout, k, stride, groups, input_grad = shape
        x = torch.randn(b, cin, h, w_).to(memory_format=torch.channels_last).requires_grad_(input_grad)
        w = torch.randn(cout, cin // groups, k, k, requires_grad=True)

        def fn():
            return F.conv2d(x, w, stride=stride, padding=k // 2, groups=groups)
    gy = torch.randn_like(fn())

    def step():
        x.grad = w.grad = None
        fn().backward(gy)

    wall, cpu, _ = timed(step, repeats)
    return wall, cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vmamba-small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-per-direction", action="store_true", help="skip the per-direction whole step")
    parser.add_argument("--skip-reference", action="store_true", help="skip the float64 reference scans")
    parser.add_argument("--reference-batch", type=int, default=1, help="batch of the reference scans (scaled up)")
    parser.add_argument("--skip-steps", action="store_true", help="only the per-stage scans and the matmul bound")
    parser.add_argument("--keep-memory", action="store_true", help="also time the grouped step with freed memory kept")
    args = parser.parse_args()
    setup_threads(args.threads)

    import mambapeft
    from mambapeft.scan import selective_scan_grouped

    model = mambapeft.from_config(args.arch, seed=0).train()
    config = model.config
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    labels = torch.randint(0, config.num_classes, (args.batch,), generator=g)
    with torch.no_grad():
        model.classifier.head.weight.normal_(std=0.02)      # a zero head would stop the backward at the head

    def step():
        torch.manual_seed(0)                                 # the same drop-path draws in every step
        model.zero_grad(set_to_none=True)
        loss = model(images, labels=labels).loss
        loss.backward()
        return loss.detach()

    def load():
        return f"load {os.getloadavg()[0]:.1f}"

    print(f"one training step of {args.arch} (random weights, all {sum(p.numel() for p in model.parameters()):,} "
          f"parameters trainable, drop path {config.drop_path_rate}), batch {args.batch} x {args.size} px, fp32")
    print(f"machine: {machine()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; {load()} at start")
    steps = {}
    paths = [] if args.skip_steps else [("grouped", selective_scan_grouped)]
    if not args.skip_per_direction and not args.skip_steps:
        paths.append(("per-dir.", per_direction_scan))
    for name, fn in paths:
        use_scan(fn)
        trim()
        wall, cpu, loss = timed(step, args.repeats)
        model.zero_grad(set_to_none=True)
        trim()
        memory, _ = peak_memory(step)
        steps[name] = (wall, cpu)
        print(f"  step {name:9s} wall {wall:7.2f} s  CPU {cpu:7.2f} s   peak +{memory / 2**20:.0f} MiB   "
              f"loss {loss.item():.6f}   {load()}", flush=True)
    use_scan(selective_scan_grouped)

    print("one SS2D scan (forward + backward), per stage:")
    scans = {"grouped": [], "per-dir.": [], "reference": []}
    scale = args.batch / args.reference_batch
    for i, depth, inputs in stage_scan_inputs(config, args.batch, args.size):
        row = []
        for name, fn, repeats, warmup in (
            ("grouped", selective_scan_grouped, args.repeats, 1), ("per-dir.", per_direction_scan, args.repeats, 1),
            ("reference", partial(selective_scan_grouped, backend="reference"), 1, 0),
        ):
            if name == "reference" and args.skip_reference:
                continue
            trim()
            if name == "reference":      # a smaller batch, scaled up
                small = {k: v[: args.reference_batch] if v.dim() == 4 else v for k, v in inputs.items()}
                wall, cpu, _ = timed(lambda fn=fn, small=small: scan_step(fn, small), repeats, warmup=warmup)
                wall, cpu = wall * scale, cpu * scale
            else:
                wall, cpu, _ = timed(lambda fn=fn, inputs=inputs: scan_step(fn, inputs), repeats, warmup=warmup)
            scans[name].append((depth, wall, cpu))
            row.append(f"{name} {wall:6.3f} / {cpu:6.3f} s")
        L, E = inputs["u"].shape[2], inputs["u"].shape[3]
        print(f"  stage {i} (x{depth:2d}, L {L:5d}, 4 x E {4 * E:5d}, wall / CPU): " + "   ".join(row), flush=True)
    if scans["reference"] and "grouped" in steps:
        pairs = list(zip(scans["reference"], scans["grouped"], strict=True))     # (depth, wall, cpu) of each
        extra_wall = sum(ref[0] * (ref[1] - ours[1]) for ref, ours in pairs)
        extra_cpu = sum(ref[0] * (ref[2] - ours[2]) for ref, ours in pairs)
        steps["reference (extrapolated)"] = (steps["grouped"][0] + extra_wall, steps["grouped"][1] + extra_cpu)
        print(f"  step reference, extrapolated: wall {steps['reference (extrapolated)'][0]:.1f} s, CPU "
              f"{steps['reference (extrapolated)'][1]:.1f} s")

    ops = matmul_ops(config, args.batch, args.size)
    forward = sum(n * op_flops(k, s)[0] for k, n, s in ops)
    backward = sum(n * op_flops(k, s)[1] for k, n, s in ops)
    timings = [(n, op_seconds(k, s, args.repeats)) for k, n, s in ops]
    bound_wall, bound_cpu = sum(n * t[0] for n, t in timings), sum(n * t[1] for n, t in timings)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak_wall, peak_cpu, _ = timed(lambda: torch.mm(a, b), 3)
    total = forward + backward
    print(f"matmul + conv work of the step: {total / 1e9:.0f} GFLOP (forward {forward / 1e9:.0f}, backward "
          f"{backward / 1e9:.0f})")
    print(f"GEMM rate on 2048^3: {2 * 2048**3 / peak_wall / 1e9:.0f} GFLOP/s (wall), "
          f"{2 * 2048**3 / peak_cpu / 1e9:.0f} GFLOP per CPU-second")
    print(f"matmul bound (the step's own matmuls and convs timed alone): wall {bound_wall:.2f} s, "
          f"CPU {bound_cpu:.2f} s ({total / bound_wall / 1e9:.0f} GFLOP/s wall)   {load()}")
    if "grouped" not in steps:
        return
    wall, cpu = steps["grouped"]
    print(f"ours (grouped): {wall / bound_wall:.2f}x the bound in wall time, {cpu / bound_cpu:.2f}x in CPU time "
          f"(target <= 3x): {'ok' if cpu <= 3 * bound_cpu else 'MISSED'}")
    for name, (w, c) in steps.items():
        if name != "grouped":
            print(f"  {name}: {w / wall:.1f}x the grouped step's wall time, {c / cpu:.1f}x its CPU time")

    if args.keep_memory:
        if keep_freed_memory():
            trim()
            wall, cpu, _ = timed(step, args.repeats)
            print(f"grouped step with freed memory kept: wall {wall:.2f} s, CPU {cpu:.2f} s = "
                  f"{cpu / bound_cpu:.2f}x the bound in CPU time   {load()}")
        else:
            print("grouped step with freed memory kept: mallopt unavailable (not glibc)")
    print(f"{load()} at the end")


if __name__ == "__main__":
    main()
