"""Where adapters belong: three findings checked on the built-in task with the same budget per row, several seeds.

    .venv/bin/python benchmarks/placement.py --threads 1 --jobs 2        # every row; see benchmarks/README.md
    .venv/bin/python benchmarks/placement.py --sections state --seeds 0 --max-steps 20   # a quick subset

Sections (rows; each row is fine-tuned once per seed, with the same steps, batch and evaluation schedule):

  mamba_vs_attention   the MambaPEFT paper's first finding (PEFT works better on Mamba than on a Transformer of the
                       same size): the built-in tiny Mamba-2 (963k parameters) against tiny-attention (968k, a plain
                       Transformer), each with LoRA r 8 on every linear layer of its blocks (Mamba-2: in_proj and
                       out_proj; Transformer: q, k, v, o and the MLP) and with full fine-tuning.
  placement            the 2026 placement finding ("Where Should LoRA Go?", arXiv 2604.22127: adapting the recurrent
                       part hurts a sequential hybrid and helps a parallel one): placement/attention, placement/ssm
                       and placement/both (config/presets.py) on tiny-jamba (sequential: Mamba-1 layers and one
                       attention layer) and tiny-falcon-h1 (parallel: attention beside Mamba-2 in every layer).
  state                S0 tuning's finding (arXiv 2604.01168: one tuned initial state per recurrent layer beats LoRA
                       on hybrids): initial_state and state_offset on both hybrids, against the placement section's
                       LoRA rows, and on tiny-qwen3.5 (Gated DeltaNet, S0 tuning's own model family) against its
                       placement/both LoRA.

Rates are the built-in models' (config/presets.py: 3e-2 for the LoRA family, whose update is scaled by 0.1; 1e-3 for
full; 3e-3 for the rest; --lr sets one for all), as benchmarks/methods_language.py. Each run keeps the checkpoint
with the best validation accuracy and reports its test accuracy (112 questions, chance 25%). The table gives the
mean over seeds and the spread (min-max), with the zero-shot accuracy. Every built-in language model was pretrained
with the same budget (mambapeft.assets.PRETRAINING_STEPS, 2,000 steps of the same batches). results.json is written
after every run; a rerun with the same --out resumes (finished (row, seed) pairs are kept). --jobs 2 runs two
fine-tunings at once, each on one thread (the machine has two cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

LORA_ALL_MAMBA = ["lora_in_proj:r=8", "lora_out_proj:r=8"]
LORA_ALL_ATTENTION = ["lora_attn:r=8", "lora_mlp:r=8"]
HYBRIDS = {"sequential": "tiny-jamba", "parallel": "tiny-falcon-h1"}
LINEAR_RECURRENT = "tiny-qwen3.5"      # S0 tuning's own setting: a Gated DeltaNet hybrid (Qwen3.5's layout)


def rows(mamba: str) -> dict[str, list[tuple[str, str, list[str]]]]:
    """section -> [(row name, model, method specs)]"""
    return {
        "mamba_vs_attention": [
            (f"{mamba} lora r8 (every linear)", mamba, LORA_ALL_MAMBA),
            ("tiny-attention lora r8 (every linear)", "tiny-attention", LORA_ALL_ATTENTION),
            (f"{mamba} full", mamba, ["full"]),
            ("tiny-attention full", "tiny-attention", ["full"])],
        "placement": [(f"{model} {where}", model, [f"placement/{where}"])
                      for model in HYBRIDS.values() for where in ("attention", "ssm", "both")],
        "state": [(f"{model} {method}", model, [f"paper/{method}"])
                  for model in (*HYBRIDS.values(), LINEAR_RECURRENT) for method in ("initial_state", "state_offset")]
                 + [(f"{LINEAR_RECURRENT} both", LINEAR_RECURRENT, ["placement/both"])],
    }


def run_one(name: str, model: str, specs: list[str], seed: int, args: dict) -> dict:
    """One fine-tuning (in a worker process: one thread, its own output folder)."""
    import torch

    from mambapeft.errors import NotApplicable
    from mambapeft.train import TrainConfig, fine_tune

    torch.set_num_threads(args["threads"])
    steps = args["max_steps"]
    config = TrainConfig.from_dict(dict(
        model=model, data="builtin", test_data="builtin", method=specs,
        output_dir=str(Path(args["out"]) / "runs" / f"{name.replace(' ', '_').replace('/', '-')}_seed{seed}"),
        max_length=192, epochs=100.0, max_steps=steps, batch_size=8, micro_batch_size=8, lr=args["lr"],
        warmup_steps=10, eval_steps=max(1, steps // args["evals"]), logging_steps=max(1, steps // 8),
        train_on_prompt=False, seed=seed))
    start = time.time()
    try:
        result = fine_tune(config, overwrite=True, log=lambda *a: None)
    except NotApplicable as err:
        return {"row": name, "seed": seed, "not_applicable": str(err)}
    return {"row": name, "seed": seed, "model": model, "methods": specs,
            "trainable": result["parameters"]["trainable"], "percent": result["parameters"]["percent"],
            "val_acc": result["best_validation"], "test_acc": result["fine_tuned"]["acc"],
            "zero_shot": result["zero_shot"]["acc"], "seconds": round(time.time() - start, 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["mamba_vs_attention", "placement", "state"],
                   choices=["mamba_vs_attention", "placement", "state"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--max-steps", type=int, default=126, help="optimiser steps per run (3 epochs of the task)")
    p.add_argument("--evals", type=int, default=2, help="validation checkpoints per run (the best one is tested)")
    p.add_argument("--mamba", default="tiny-mamba2", help="the SSM model of the first section")
    p.add_argument("--lr", type=float, default=None, help="one rate for every row (default: the built-in rates)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (separate processes)")
    p.add_argument("--out", default="runs/placement", help="output folder (results.json, table.md)")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else []
    done = {(r["row"], r["seed"]) for r in results}
    plan = [(section, name, model, specs) for section in args.sections
            for name, model, specs in rows(args.mamba)[section]]
    # seed-major: every row's first seed before any row's second, so a run cut short still has one of each
    todo = [(name, model, specs, seed) for seed in args.seeds for _, name, model, specs in plan
            if (name, seed) not in done]
    shared = dict(max_steps=args.max_steps, evals=args.evals, lr=args.lr, threads=args.threads, out=str(out))
    start = time.time()
    print(f"{len(plan)} rows x {len(args.seeds)} seeds, {len(todo)} runs to do, {args.max_steps} steps each",
          flush=True)

    def record(r: dict) -> None:
        results.append(r)
        results_file.write_text(json.dumps(results, indent=2) + "\n")      # after every run: resumable
        what = r.get("not_applicable") or f"val {r['val_acc']:.3f}  test {r['test_acc']:.3f}  {r['seconds']:.0f}s"
        print(f"{r['row']:45s} seed {r['seed']}  {what}   ({time.time() - start:.0f}s)", flush=True)

    if args.jobs <= 1:
        for name, model, specs, seed in todo:
            record(run_one(name, model, specs, seed, shared))
    else:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_one, name, model, specs, seed, shared) for name, model, specs, seed in todo]
            for future in as_completed(futures):
                record(future.result())
    table = render(plan, results, args)
    (out / "table.md").write_text(table)
    print(table)
    print(f"total {time.time() - start:.0f}s")


def render(plan, results: list[dict], args) -> str:
    """Markdown table: one line per row, mean and min-max of test accuracy over the seeds that ran."""
    lines = [f"{args.max_steps} steps per run, seeds {' '.join(map(str, args.seeds))}, test accuracy mean "
             f"(min-max); chance 25%", "",
             "| section | row | methods | trainable | zero-shot | val acc | test acc (mean) | min-max | s/run |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for section, name, _model, specs in plan:
        runs = [r for r in results if r["row"] == name and r["seed"] in args.seeds]
        if not runs:
            continue
        if "not_applicable" in runs[0]:
            lines.append(f"| {section} | {name} | not applicable: {runs[0]['not_applicable']} | | | | | | |")
            continue
        test = [r["test_acc"] for r in runs]
        lines.append(
            f"| {section} | {name} | {' + '.join(specs)} | {runs[0]['trainable']:,} | {runs[0]['zero_shot']:.1%} | "
            f"{statistics.mean(r['val_acc'] for r in runs):.1%} | {statistics.mean(test):.1%} | "
            f"{min(test):.1%}-{max(test):.1%} | {statistics.mean(r['seconds'] for r in runs):.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
