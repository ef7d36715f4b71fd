"""Forward + backward of the selective scan on the CPU: ours against transformers' fallback and mambapy's pscan.

    python benchmarks/scan.py [--batch 8 --d-inner 512 --length 256 --d-state 16 --threads 2]

Every implementation computes the full Mamba scan (delta bias, softplus, D skip, silu(z) gate) on the same
fp32 inputs; their outputs and all gradients are compared with the float64 reference recurrence.
Targets (issue 2): at least 30x faster than transformers' fallback, at least 2x faster than pscan.
"""

from __future__ import annotations

import argparse

import torch
from _common import forward_backward, machine, rel_err, setup_threads, timed

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch, d_inner, length, d_state, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return {"u": r(batch, d_inner, length), "delta": r(batch, d_inner, length) * 0.5 - 1.0,
            "A": -torch.exp(r(d_inner, d_state) * 0.5), "B": r(batch, d_state, length), "C": r(batch, d_state, length),
            "D": r(d_inner), "z": r(batch, d_inner, length), "delta_bias": r(d_inner) * 0.1}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--d-inner", type=int, default=512)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    setup_threads(args.threads)

    from transformers.models.mamba.modeling_mamba import mamba_selective_scan
    from transformers.utils.import_utils import is_mambapy_available

    from mambapeft import selective_scan, selective_scan_reference

    inputs = make_inputs(args.batch, args.d_inner, args.length, args.d_state)
    weights = torch.randn(args.batch, args.d_inner, args.length, generator=torch.Generator().manual_seed(1))
    common = {"delta_softplus": True}
    # transformers names u and delta "hidden_states" and "dt": pass the tensors by position
    positional = lambda fn, **extra: lambda u, delta, A, B, C, **t: fn(u, delta, A, B, C, **t, **common, **extra)
    candidates = {
        "mambapeft (sequential, exact)": positional(selective_scan),
        "transformers fallback loop": positional(mamba_selective_scan, use_mambapy=False),
    }
    if is_mambapy_available():
        candidates["mambapy pscan (via transformers)"] = positional(mamba_selective_scan, use_mambapy=True)
    else:
        print("mambapy is not installed (pip install mambapy): pscan skipped")

    print(f"selective scan forward+backward, fp32, batch {args.batch}, E {args.d_inner}, L {args.length}, "
          f"N {args.d_state}")
    print(f"machine: {machine()}")
    y_ref, g_ref = forward_backward(lambda **t: selective_scan_reference(**t, **common), inputs, weights.double())

    results = {}
    for name, scan in candidates.items():
        repeats = 1 if "loop" in name else args.repeats
        seconds, (y, grads) = timed(lambda scan=scan: forward_backward(scan, inputs, weights), repeats,
                                    warmup=0 if "loop" in name else 1)
        error = max([rel_err(y, y_ref)] + [rel_err(grads[k], g_ref[k]) for k in NAMES])
        results[name] = (seconds, error)

    ours = results["mambapeft (sequential, exact)"][0]
    print(f"{'implementation':34s} {'time (ms)':>10s} {'ours is faster by':>18s} {'max rel. error vs float64':>26s}")
    for name, (seconds, error) in results.items():
        print(f"{name:34s} {seconds * 1e3:10.1f} {seconds / ours:17.1f}x {error:26.1e}")
    loop = results["transformers fallback loop"][0] / ours
    verdict = [f"vs transformers loop {loop:.1f}x (target >= 30x): {'ok' if loop >= 30 else 'MISSED'}"]
    if "mambapy pscan (via transformers)" in results:
        pscan = results["mambapy pscan (via transformers)"][0] / ours
        verdict.append(f"vs pscan {pscan:.1f}x (target >= 2x): {'ok' if pscan >= 2 else 'MISSED'}")
    print("; ".join(verdict))


if __name__ == "__main__":
    main()
