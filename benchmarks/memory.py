"""Peak memory and time of one LoRA training step (lora_p_x r=8, batch 1, random weights) under the memory options:
float32, gradient checkpointing, a bfloat16 base, an int8 or 4-bit (NF4) quantized base (needs mambapeft[quant]),
each base with checkpointing.

    python benchmarks/memory.py [--arch mamba-370m --tokens 512 2048 --settings fp32 ckpt bf16 bf16+ckpt
                                 --steps 2 --threads 2 --json results/memory.json]

Each (arch, tokens, setting) runs in a fresh subprocess, so one setting's peak cannot hide another's. Reported per
setting: the peak RSS of the whole process (resource.getrusage: model build included) and the peak RSS of the steps
alone (/proc/self/status VmHWM after resetting it through /proc/self/clear_refs once the model is ready), the
stored bytes of parameters + buffers, and the time of the last step (the first warms up). Model building materialises
float32 weights before a bf16 or int8 / int4 base is narrowed, so the whole-process peak of such a setting includes
the float32 weights once; the steps' peak is what the step itself needs (plus, for small models, whatever part of the
freed float32 weights the allocator keeps instead of returning it: tensors under glibc's mmap threshold, 32 MB at
most, go back to its heap).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = ("fp32", "ckpt", "bf16", "bf16+ckpt", "int8", "int8+ckpt", "int4", "int4+ckpt")
BASES = {"bf16": "bfloat16", "int8": "int8", "int4": "int4"}


def vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Resets the process's peak RSS (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def one(arch: str, tokens: int, setting: str, steps: int, threads: int) -> dict:
    """One setting, in this process: build, attach, step; the figures as a dict."""
    import torch

    from mambapeft import from_config, get_peft_model

    torch.set_num_threads(threads)
    model = from_config(arch, seed=0)
    peft = get_peft_model(model, ["lora_p_x:r=8"], seed=0).train()
    if "ckpt" in setting:
        peft.gradient_checkpointing_enable()
    base = BASES.get(setting.split("+")[0])
    if base:
        peft.store_base_as(base)
    stored = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    reset = reset_peak()
    losses, seconds = [], 0.0
    for _ in range(steps):
        start = time.perf_counter()
        loss = peft(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        losses.append(loss.item())
    return {"arch": arch, "tokens": tokens, "setting": setting, "stored_gb": stored / 1e9,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "step_peak_rss_gb": vm_hwm_bytes() / 1e9 if reset and vm_hwm_bytes() else None,
            "step_seconds": seconds, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["mamba-370m"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS[:4]))
    parser.add_argument("--steps", type=int, default=2, help="steps per setting; the last one is timed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--one", nargs=3, metavar=("ARCH", "TOKENS", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        arch, tokens, setting = args.one
        print(json.dumps(one(arch, int(tokens), setting, args.steps, args.threads)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRANSFORMERS_VERBOSITY": "error"}
    rows = []
    print(f"{'arch':<12} {'tokens':>6} {'setting':<10} {'stored GB':>9} {'peak GB':>8} {'step peak GB':>12} "
          f"{'step s':>7}  losses")
    for arch in args.arch:
        for tokens in args.tokens:
            for setting in args.settings:
                done = subprocess.run([sys.executable, __file__, "--one", arch, str(tokens), setting,
                                       "--steps", str(args.steps), "--threads", str(args.threads)],
                                      env=env, capture_output=True, text=True)
                if done.returncode:
                    print(f"{arch} {tokens} {setting}: failed (exit {done.returncode}): {done.stderr[-500:]}")
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                step_peak = f"{row['step_peak_rss_gb']:.2f}" if row["step_peak_rss_gb"] else "-"
                print(f"{arch:<12} {tokens:>6} {setting:<10} {row['stored_gb']:>9.3f} {row['peak_rss_gb']:>8.2f} "
                      f"{step_peak:>12} {row['step_seconds']:>7.2f}  {', '.join(f'{x:.4f}' for x in row['losses'])}",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
