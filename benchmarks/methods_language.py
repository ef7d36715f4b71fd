"""Mini replication of the paper's language comparison on the built-in model and task (paper Figure 5 style).

    .venv/bin/python benchmarks/methods_language.py                       # every method, same budget and seed
    .venv/bin/python benchmarks/methods_language.py --methods lora_p_x full --max-steps 20   # a quick subset

Each single method of the paper (its paper/<name> preset), plus full, linear_probe and all methods at once, is
fine-tuned with `mambapeft.train.fine_tune` on the built-in task with the same steps, learning rate and seed.
Prints a table (method, trainable parameters, percent, validation and test accuracy, seconds per step with the
run's evaluations included) and writes it with a PNG plot of test accuracy against trainable parameters to
--out. Not yet run at full budget (about 4 minutes a method on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mambapeft.train import TrainConfig, fine_tune  # noqa: E402

SINGLE = ["lora_embed", "lora_in_proj", "lora_x_proj", "lora_dt_proj", "lora_out_proj", "lora_p_x", "lora_p_z",
          "lora_p_dt", "lora_p_b", "lora_p_c", "parallel_adapter", "prompt", "affix", "additional_scan",
          "partial_a", "partial_d", "partial_conv1d", "partial_bias", "sdt", "sdt_lora"]
ALL_AT_ONCE = ["lora_embed:r=8", "lora_p_x:r=8", "lora_p_z:r=8", "lora_out_proj:r=8", "parallel_adapter:dim=8",
               "affix:n=1", "additional_scan:n=1", "partial_a", "partial_d", "partial_bias"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=SINGLE + ["full", "linear_probe", "all"],
                   help="method names (paper presets), 'full', 'linear_probe' or 'all' (every method at once)")
    p.add_argument("--max-steps", type=int, default=336, help="optimiser steps per method (8 epochs: 336)")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate for every method")
    p.add_argument("--out", default="runs/methods_language", help="output folder")
    args = p.parse_args(argv)

    out = Path(args.out)
    rows = []
    for name in args.methods:
        specs = ALL_AT_ONCE if name == "all" else [name if name in ("full", "linear_probe") else f"paper/{name}"]
        config = TrainConfig.from_dict(dict(
            model="builtin", data="builtin", test_data="builtin", method=specs, output_dir=str(out / name),
            max_length=192, epochs=100.0, max_steps=args.max_steps, batch_size=8, micro_batch_size=8, lr=args.lr,
            warmup_steps=10, eval_steps=max(1, args.max_steps // 4), logging_steps=max(1, args.max_steps // 8),
            train_on_prompt=False, seed=42))
        start = time.time()
        result = fine_tune(config, log=lambda *a: None)
        rows.append({"method": name, "trainable": result["parameters"]["trainable"],
                     "percent": result["parameters"]["percent"], "val_acc": result["best_validation"],
                     "test_acc": result["fine_tuned"]["acc"], "zero_shot": result["zero_shot"]["acc"],
                     "s_per_step": (time.time() - start) / max(1, result["steps"])})
        r = rows[-1]
        print(f"{name:18s} {r['trainable']:>10,} {r['percent']:7.2f}%  val {r['val_acc']:.3f}  test {r['test_acc']:.3f}"
              f"  {r['s_per_step']:.2f} s/step", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| method | trainable | % | val acc | test acc | s/step |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['trainable']:,} | {r['percent']:.2f} | {r['val_acc']:.3f} | {r['test_acc']:.3f} | "
              f"{r['s_per_step']:.2f} |" for r in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["trainable"], r["test_acc"])
        ax.annotate(r["method"], (r["trainable"], r["test_acc"]), fontsize=7)
    ax.axhline(rows[0]["zero_shot"], color="gray", linestyle="--", label="zero-shot")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test accuracy (built-in task)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_params.png", dpi=120)
    print(f"wrote {out / 'table.md'} and {out / 'accuracy_vs_params.png'}")


if __name__ == "__main__":
    main()
