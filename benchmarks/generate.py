"""Greedy decoding of mamba-130m (random weights) on the CPU: ours against transformers' MambaForCausalLM.generate.

    python benchmarks/generate.py [--arch mamba-130m --prompt 8 --new-tokens 32 --batch-sizes 1 8 --threads 2]

Both models hold the same weights. For each batch size: tokens/s of a whole `generate` call (prompt pass
included, no early stop) and the check that both produce the same tokens; the two take turns (a warm-up
round, then `--repeats` rounds, medians). Beside the figures, the memory-bandwidth bound of decoding: a step
reads every weight once (the tied embedding as the output head), so it takes at least (bytes of weights) /
(memory bandwidth), the bandwidth measured here as the best rate of a large tensor copy. Also printed: the rate
torch's fp32 matrix-vector product (MKL) reaches here, the kernel every projection of a batch-1 step runs on.
Targets (issue "decoding and evaluation at the speed a recurrent model allows"): at batch 1, at least 2x
transformers and within 1.5x of the bandwidth bound.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _common import machine, setup_threads


def fastest(fn, repeats: int) -> float:
    """The shortest of `repeats` timed calls after one warm-up: a rate for a bound is the best one seen."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def copy_rate(megabytes: int = 512, repeats: int = 7) -> float:
    """Bytes copied per second by a large tensor copy (each byte is read once and written once)."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    return src.numel() * 4 / fastest(lambda: dst.copy_(src), repeats)


def gemv_rate(config, repeats: int = 7) -> float:
    """Weight bytes per second of F.linear at batch 1 over in_proj-sized matrices (more than the caches hold)."""
    d, E = config.hidden_size, config.intermediate_size
    weights = [torch.randn(2 * E, d) for _ in range(max(8, 2**29 // (8 * E * d)))]   # ~512 MiB in all
    x = torch.randn(1, d)
    return sum(w.numel() for w in weights) * 4 / fastest(lambda: [F.linear(x, w) for w in weights], repeats)


def interleaved(runs: dict, repeats: int) -> dict:
    """{name: (median seconds, last result)}, the runs taking turns (a warm-up round first), so that a load
    from other processes that comes and goes weighs on all of them alike."""
    times, results = {name: [] for name in runs}, {}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in runs}


def weight_bytes(model) -> int:
    """Bytes one decoding step reads: every parameter once (a tied head and embedding are one tensor)."""
    seen = {id(p): p for p in model.parameters()}
    return sum(p.numel() * p.element_size() for p in seen.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mamba-130m")
    parser.add_argument("--prompt", type=int, default=8, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    setup_threads(args.threads)

    from transformers import MambaForCausalLM

    import mambapeft

    ours = mambapeft.from_config(args.arch, seed=0).eval()
    config = ours.config
    theirs = MambaForCausalLM(config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=False)
    theirs.tie_weights()
    theirs.generation_config.eos_token_id = None          # both decode every token asked for
    theirs.generation_config.pad_token_id = config.pad_token_id
    n = args.new_tokens

    print(f"greedy decoding, {args.arch}, prompt {args.prompt} tokens + {n} new tokens, fp32")
    print(f"machine: {machine()}")
    copy = copy_rate()
    gemv = gemv_rate(config)
    step_bytes = weight_bytes(ours)
    print(f"memory: a 512 MiB tensor copy runs at {copy / 1e9:.1f} GB/s ({2 * copy / 1e9:.1f} GB/s of traffic, "
          f"read + write); fp32 matrix-vector product (F.linear, batch 1): {gemv / 1e9:.1f} GB/s of weights")
    print(f"weights read per decoding step: {step_bytes / 1e6:.0f} MB")
    print(f"{'batch':>5s} {'model':14s} {'time (s)':>9s} {'tokens/s':>9s} {'bound tok/s':>12s} {'of bound':>9s}")
    for batch in args.batch_sizes:
        ids = torch.randint(0, config.vocab_size, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        bound = batch * copy / step_bytes                    # tokens/s if a step cost only its weight reads
        runs = {
            "mambapeft": lambda ids=ids: ours.generate(ids, max_new_tokens=n, eos_token_id=None),
            "transformers": lambda ids=ids: theirs.generate(ids, max_new_tokens=n, do_sample=False),
        }
        results = interleaved(runs, args.repeats)
        for name, (seconds, _) in results.items():
            rate = batch * n / seconds
            print(f"{batch:5d} {name:14s} {seconds:9.2f} {rate:9.1f} {bound:12.1f} {rate / bound:8.0%}")
        (t_ours, tok_ours), (t_hf, tok_hf) = results["mambapeft"], results["transformers"]
        assert torch.equal(tok_ours, tok_hf), f"batch {batch}: the generated tokens differ"
        speedup = t_hf / t_ours
        if batch != 1:
            print(f"      same tokens; speed-up {speedup:.2f}x")
            continue
        per_token, floor, gemv_floor = t_ours / n, step_bytes / copy, step_bytes / gemv
        print(f"      same tokens; speed-up {speedup:.2f}x (target >= 2x: {'ok' if speedup >= 2 else 'MISSED'})")
        print(f"      {per_token * 1e3:.1f} ms per new token (prompt pass included) against a bound of "
              f"{floor * 1e3:.1f} ms: {per_token / floor:.2f}x (target <= 1.5x: "
              f"{'ok' if per_token <= 1.5 * floor else 'MISSED'})")
        print(f"      the weights' matrix-vector products alone, at the rate measured above: {gemv_floor * 1e3:.1f} ms "
              f"per token, for both models; ours spends {per_token * 1e3 - gemv_floor * 1e3:.1f} ms besides, "
              f"transformers {t_hf / n * 1e3 - gemv_floor * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
