"""Mini replication of the paper's language comparison on the built-in model and task (paper Figure 5 style).

    .venv/bin/python benchmarks/methods_language.py                       # every method, same budget and seed
    .venv/bin/python benchmarks/methods_language.py --methods lora_p_x full --max-steps 20   # a quick subset
    .venv/bin/python benchmarks/methods_language.py --model tiny-mamba2 --out runs/methods_language_mamba2

Each single method of the paper (its paper/<name> preset), plus full, linear_probe and all methods at once, is
fine-tuned with `mambapeft.train.fine_tune` on the built-in task with the same steps, batch and seed, at the
built-in model's per-method learning rates (config.presets: 3e-2 for the LoRA family, 1e-3 for full, 3e-3 for
the rest; --lr sets one for all), keeping the checkpoint with the best validation accuracy. Prints a table
(method, settings, trainable parameters, percent, validation and test accuracy, seconds per step with the run's
evaluations included) and writes it, results.json (resumable: finished rows are kept) and a PNG plot of test
accuracy against trainable parameters to --out. About 3 minutes a method on one core. A method the model's family
lacks (`mambapeft methods` says which) is a row marked not applicable, with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mambapeft.errors import NotApplicable  # noqa: E402
from mambapeft.peft import count_parameters as count  # noqa: E402
from mambapeft.train import TrainConfig, fine_tune  # noqa: E402

SINGLE = ["lora_embed", "lora_in_proj", "lora_x_proj", "lora_dt_proj", "lora_out_proj", "lora_p_x", "lora_p_z",
          "lora_p_dt", "lora_p_b", "lora_p_c", "parallel_adapter", "prompt", "affix", "additional_scan",
          "partial_a", "partial_d", "partial_conv1d", "partial_bias", "sdt", "sdt_lora", "dora_p_x",
          "initial_state", "state_offset", "state_offset_y", "memba", "prodial"]
HYBRID = ["lora_attn", "lora_mlp"]                # a hybrid's attention and MLP layers (not applicable on pure SSMs)
ALL_AT_ONCE = ["lora_embed:r=8", "lora_p_x:r=8", "lora_p_z:r=8", "lora_out_proj:r=8", "parallel_adapter:dim=8",
               "affix:n=1", "additional_scan:n=1", "partial_a", "partial_d", "partial_bias"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=SINGLE + HYBRID + ["full", "linear_probe", "all"],
                   help="method names (paper presets), 'full', 'linear_probe' or 'all' (every method at once)")
    p.add_argument("--max-steps", type=int, default=336, help="optimiser steps per method (8 epochs: 336)")
    p.add_argument("--model", default="builtin",
                   help="the base model: builtin (tiny Mamba), tiny-mamba2, or a built-in hybrid (tiny-granite-h, ...)")
    p.add_argument("--lr", type=float, default=None,
                   help="one learning rate for every method (default: the built-in model's per-method rates)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="runs/methods_language", help="output folder")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    before = {r["method"]: r for r in json.loads(results.read_text())} if results.exists() else {}
    rows = []
    for name in args.methods:
        if name in before:                           # resume: a finished row is kept
            rows.append(before[name])
            continue
        specs = ALL_AT_ONCE if name == "all" else [name if name in ("full", "linear_probe") else f"paper/{name}"]
        if name in HYBRID:                               # no paper preset: the placement presets' rank
            specs = [f"{name}:r=8"]
        if name == "prompt":                             # the preset's prefix+suffix is Vim's; causal LMs: prefix
            specs = ["prompt:n=8,position=prefix"]
        if name in ("sdt", "sdt_lora"):                  # SDT's warm-up: the first quarter of the budget
            specs = [f"sdt:warmup_steps={max(1, args.max_steps // 4)}"]
            specs += ["lora_out_proj:r=8"] if name == "sdt_lora" else []
        config = TrainConfig.from_dict(dict(
            model=args.model, data="builtin", test_data="builtin", method=specs, output_dir=str(out / name),
            max_length=192, epochs=100.0, max_steps=args.max_steps, batch_size=8, micro_batch_size=8, lr=args.lr,
            warmup_steps=10, eval_steps=max(1, args.max_steps // 8), logging_steps=max(1, args.max_steps // 16),
            train_on_prompt=False, seed=42))
        start = time.time()
        try:
            result = fine_tune(config, overwrite=True, log=lambda *a: None)
        except NotApplicable as err:                     # the family lacks what the method trains
            rows.append({"method": name, "not_applicable": str(err)})
            print(f"{name}: not applicable: {err}", flush=True)
            save(results, rows, before)
            continue
        except Exception as err:                         # one method's failure is a line, not the end of the table
            print(f"{name}: failed: {type(err).__name__}: {err}", flush=True)
            continue
        counts = result["parameters"]
        if name in ("sdt", "sdt_lora"):                  # what trains after the selection, not the dense warm-up
            counts = count(args.model, specs)
        rows.append({"method": name, "config": method_specs(result),
                     "trainable": counts["trainable"], "percent": counts["percent"],
                     "val_acc": result["best_validation"], "test_acc": result["fine_tuned"]["acc"],
                     "zero_shot": result["zero_shot"]["acc"],
                     "s_per_step": (time.time() - start) / max(1, result["steps"])})
        r = rows[-1]
        print(f"{name:18s} {r['trainable']:>10,} {r['percent']:7.2f}%  val {r['val_acc']:.3f}  test {r['test_acc']:.3f}"
              f"  {r['s_per_step']:.2f} s/step", flush=True)
        save(results, rows, before)                      # after every row: an interrupted run resumes
    save(results, rows, before)
    lines = ["| method | settings | trainable | % | val acc | test acc | s/step |",
             "|---|---|---:|---:|---:|---:|---:|"]
    ran = [r for r in rows if "not_applicable" not in r]
    lines += [f"| {r['method']} | not applicable | | | | | |" if "not_applicable" in r else
              f"| {r['method']} | {' + '.join(r['config'])} | {r['trainable']:,} | {r['percent']:.2f} | "
              f"{r['val_acc']:.3f} | {r['test_acc']:.3f} | {r['s_per_step']:.2f} |" for r in rows]
    if ran:
        lines.append(f"\nzero-shot test accuracy of {args.model}: {ran[0]['zero_shot']:.3f} (chance 0.25)")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(ran, out)


def save(results: Path, rows: list[dict], before: dict) -> None:
    """results.json: this run's rows, then the earlier rows of methods this run did not list (a run of a few methods
    into an existing folder adds to its table, it does not drop the rest)."""
    ran = {r["method"] for r in rows}
    results.write_text(json.dumps(rows + [r for name, r in before.items() if name not in ran], indent=2) + "\n")


def method_specs(result: dict) -> list[str]:
    """`id:key=value` of each method as it ran (main options and lr), from results.json's method dicts."""
    keys = ("r", "n", "dim", "s", "position", "variant", "warmup_steps", "lr")
    specs = []
    for m in result["methods"]:
        options = ",".join(f"{k}={m[k]}" for k in keys if m.get(k) is not None)
        specs.append(m["method"] + (":" + options if options else ""))
    return specs


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
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
