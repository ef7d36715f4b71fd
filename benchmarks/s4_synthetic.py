"""The SDT paper's S4 synthetic experiment: MSE against the percentage of trainable parameters, on the CPU.

As the authors' `run_s4.py` (furiosa-ai/ssm-peft, S4/): a frozen random deep S4D (the "theory" stack, 4 layers,
H 64, N 16, random A) is fine-tuned to imitate a random 1-layer target (N 8) on random integer inputs 0-9, a fresh
batch at every step, MSE loss, AdamW at lr 5e-3 (torch's default weight decay 0.01, on every tensor), SDT's warm-up
20 steps at lr 1e-2 as a run of its own. Every method goes through the registry and PeftModel:

    frozen          nothing trains
    LoRA (Proj)     lora_out_proj r                         + D and the output bias (as the authors' LoRA rows)
    LoRA (S4+Proj)  lora_ssm r_ssm + lora_out_proj r        + D, the output bias and log_dt
    SDT             sdt with out_proj=true                  + D, the output bias and log_dt (the authors' SDT row)
    SDT + LoRA      sdt + lora_out_proj r                   + D, the output bias and log_dt (their SDLoRA)
    full            every weight

Each point is the MSE on a held-out batch after training, mean and spread over --seeds training runs (data order and
initialisations; the authors' own metric, the lowest training-batch MSE, is in the JSON); percent = trainable / the
frozen model's parameters (33,536), as the authors' script counts.
The paper's sizes (batch 4000, length 200, 500 steps) take hours per point on a CPU; the defaults here are batch 16
and 300 steps (length 200 and the model and target are the paper's).

    python benchmarks/s4_synthetic.py                  # writes benchmarks/results/s4_synthetic.{json,png}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _common import machine, setup_threads

import mambapeft
from mambapeft import get_peft_model

EXTRAS_PROJ = ["partial_d", "partial_out_bias"]
EXTRAS_SSM = [*EXTRAS_PROJ, "partial_log_dt"]


def sdt(channels: int, states: int, out_proj: bool, mask: bool = True) -> str:
    """SDT with `channels` of 64 and `states` of 16 updatable; with `mask`, those are also the usable ones (C zeroed
    elsewhere, the authors' defaults tie them); without, everything is usable and nothing is zeroed."""
    c, s = channels / 64, states / 16
    usable = f"usable_channel_fraction={c:g},usable_state_fraction={s:g}," if mask else ""
    return (f"sdt:warmup_steps=20,restart=true,channel_fraction={c:g},state_fraction={s:g},{usable}"
            f"out_proj={str(out_proj).lower()}")


def lora(r: int) -> str:
    return f"lora_out_proj:r={r},s=1,dropout=0"          # the authors' Proj-LoRA: no scale, no dropout


ROWS: dict[str, list[list[str]]] = {
    "frozen": [[]],
    "LoRA (Proj)": [[lora(r), *EXTRAS_PROJ] for r in (1, 2, 4, 8, 16)],
    "LoRA (S4+Proj)": [[f"lora_ssm:r={rs}", lora(r), *EXTRAS_SSM] for rs, r in ((1, 1), (1, 2), (2, 4), (4, 8))],
    "SDT": [[sdt(c, s, True), *EXTRAS_SSM] for c, s in ((2, 4), (4, 8), (8, 8), (16, 8))],
    "SDT + LoRA": [[sdt(c, s, False), lora(r), *EXTRAS_SSM] for c, s, r in ((4, 4, 1), (8, 8, 2), (16, 8, 4),
                                                                             (16, 8, 8))],
    # not in the paper: the same SDT + LoRA points with every channel and state usable (C is never zeroed)
    "SDT + LoRA, no mask": [[sdt(c, s, False, mask=False), lora(r), *EXTRAS_SSM]
                            for c, s, r in ((4, 4, 1), (8, 8, 2), (16, 8, 4), (16, 8, 8))],
    "full": [["full"]],
}


def inputs(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 10, (batch, length, 64), generator=generator).float()


def run(specs: list[str], args, seed: int, frozen_state: dict, target) -> dict:
    """Fine-tunes a copy of the frozen model with `specs` (data order and initialisations from `seed`); returns
    counts, MSEs and time."""
    model = mambapeft.from_config("s4d-theory", seed=0)
    model.load_state_dict(frozen_state)
    model.config.l_max = args.length                       # SDT's horizon: the task's length
    data = torch.Generator().manual_seed(seed + 1)
    held_out = inputs(args.eval_batch, args.length, torch.Generator().manual_seed(10_000))
    with torch.no_grad():
        held_out_target = target(held_out).logits
    base_count = sum(p.numel() for p in model.parameters())
    result = {"seed": seed}
    start, cpu = time.perf_counter(), time.process_time()
    if specs:
        torch.manual_seed(seed)
        peft = get_peft_model(model, specs)
        warmup = peft.extra_steps()

        def optimizer(lr):
            groups = peft.parameter_groups(lr=lr, weight_decay=0.01)
            for group in groups:                            # torch's AdamW default on every tensor, as the authors
                group["weight_decay"], group["lr"] = 0.01, lr
            return torch.optim.AdamW(groups)

        opt = optimizer(args.warmup_lr if warmup else args.lr)
        best = float("inf")
        peft.train()
        for step in range(1, warmup + args.steps + 1):
            x = inputs(args.batch, args.length, data)
            with torch.no_grad():
                y = target(x).logits
            loss = peft(x, labels=y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step > warmup:
                best = min(best, loss.item())
            if peft.on_step_end(step):                      # SDT's selection: the main run starts afresh
                opt = optimizer(args.lr)
        counts = peft.parameter_counts()
        result.update(trainable=counts["trainable"], best_train_mse=best, steps=warmup + args.steps)
        model = peft.eval()
    else:
        result.update(trainable=0, best_train_mse=None, steps=0)
    with torch.no_grad():
        result["test_mse"] = torch.nn.functional.mse_loss(model(held_out).logits, held_out_target).item()
    result["percent"] = 100.0 * result["trainable"] / base_count
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["cpu_seconds"] = round(time.process_time() - cpu, 1)
    return result


def plot(rows: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"frozen": (">", "--", "#06D6A0"), "LoRA (Proj)": (">", "--", "#DD3497"),
              "LoRA (S4+Proj)": ("x", ":", "#DD3497"), "SDT": ("*", "--", "#073B4C"),
              "SDT + LoRA": ("*", "-", "#073B4C"), "SDT + LoRA, no mask": ("o", "-", "#FFB000"),
              "full": ("s", "-.", "#118AB2")}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 1.15 * max(r["test_mse"] for name, points in rows.items() if name != "frozen" for p in points
                     for r in p["runs"])
    for name, points in rows.items():
        marker, style, color = styles[name]
        xs, ys = [p["percent"] for p in points], [p["test_mse_mean"] for p in points]
        if name == "frozen":                                # far above the rest: named, not drawn
            ax.plot([], [], color=color, linestyle=style, label=f"frozen: {ys[0]:.1f} (off the scale)")
        elif name == "full":
            ax.axhline(ys[0], color=color, linestyle=style, linewidth=1.5, label=f"full ({xs[0]:.0f}%)")
        else:
            ax.plot(xs, ys, marker=marker, linestyle=style, color=color, linewidth=2, markersize=8, label=name)
            runs = [(p["percent"], r["test_mse"]) for p in points for r in p["runs"]]
            ax.scatter(*zip(*runs), marker=marker, color=color, alpha=0.3, s=18)
    ax.set_xlabel("trainable parameters (%)")
    ax.set_ylabel("held-out MSE (line: mean; faint: each run)")
    bottom = 0.9 * min(p["test_mse_mean"] for points in rows.values() for p in points)
    ax.set_ylim(bottom, top)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def title(settings: dict) -> str:
    s = settings
    return (f"S4D synthetic: frozen 4 x (H 64, N 16) -> target 1 x (H 64, N 8)\nbatch {s['batch']}, L {s['length']}, "
            f"{s['steps']} steps, lr {s['lr']:g}, {s['seeds']} seeds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (the paper: 4000)")
    parser.add_argument("--length", type=int, default=200, help="sequence length (the paper: 200)")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps after any warm-up (the paper: 500)")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--warmup-lr", type=float, default=1e-2, help="SDT's warm-up rate (the authors')")
    parser.add_argument("--eval-batch", type=int, default=256, help="held-out sequences")
    parser.add_argument("--seed", type=int, default=123, help="the task's seed (target and frozen model); the runs "
                        "use seed, seed + 1, ...")
    parser.add_argument("--seeds", type=int, default=3, help="training runs per point (data order, initialisations)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", help="rows to run (default: all); the other rows of an existing .json "
                        "made with the same settings are kept")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "s4_synthetic"))
    parser.add_argument("--plot-only", action="store_true", help="redraw the .png from the .json, train nothing")
    args = parser.parse_args()
    setup_threads(args.threads)
    out = Path(args.out)
    if args.plot_only:
        report = json.loads(out.with_suffix(".json").read_text())
        plot(report["rows"], out.with_suffix(".png"), title(report["settings"]))
        return

    torch.manual_seed(args.seed)                          # the authors build the target first, then the frozen model
    target = mambapeft.from_config("s4d-target").eval()
    frozen_state = mambapeft.from_config("s4d-theory").state_dict()
    for p in target.parameters():
        p.requires_grad_(False)

    rows, start = {}, time.perf_counter()
    settings = {k: getattr(args, k) for k in ("batch", "length", "steps", "lr", "warmup_lr", "eval_batch", "seed",
                                              "seeds")}
    if args.only and out.with_suffix(".json").exists():
        before = json.loads(out.with_suffix(".json").read_text())
        if before["settings"] == settings:
            rows = {name: points for name, points in before["rows"].items() if name not in args.only}
    for name, configs in ROWS.items():
        if args.only and name not in args.only:
            continue
        rows[name] = []
        for specs in configs:
            seeds = range(args.seed, args.seed + (args.seeds if specs else 1))      # frozen: nothing random
            runs = [run(specs, args, seed, frozen_state, target) for seed in seeds]
            mses = [r["test_mse"] for r in runs]
            point = {"specs": specs, "trainable": runs[0]["trainable"], "percent": runs[0]["percent"],
                     "test_mse_mean": statistics.mean(mses),
                     "test_mse_std": statistics.stdev(mses) if len(mses) > 1 else 0.0, "runs": runs}
            rows[name].append(point)
            print(f"{name:<15} {point['trainable']:>7,} ({point['percent']:5.1f}%)  test MSE "
                  f"{point['test_mse_mean']:.3f} ± {point['test_mse_std']:.3f} ({', '.join(f'{m:.3f}' for m in mses)})"
                  f"  {sum(r['cpu_seconds'] for r in runs):.0f} s CPU  {' + '.join(specs)}", flush=True)
    rows = {name: rows[name] for name in ROWS if name in rows}             # the table's order
    report = {"settings": settings, "machine": machine(), "seconds": round(time.perf_counter() - start),
              "cpu_seconds": round(time.process_time()), "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"), title(settings))
    print(f"wrote {out.with_suffix('.json')} and .png in {report['seconds']} s ({report['cpu_seconds']} s of CPU)")


if __name__ == "__main__":
    main()
