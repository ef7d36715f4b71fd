"""The SDT paper's S4 pixel-sequence study in miniature: pretrain a deep S4D classifier, fine-tune it with each method.

The authors' `run_s4_real.py` (furiosa-ai/ssm-peft, S4/) pretrains a deep S4D (encoder, 4 residual S4D layers with
H 64 and N 16, mean pool, decoder) on one image set read as a pixel sequence and fine-tunes it on another (CIFAR-10
and MNIST, 784 or 1024 steps). Here, on scikit-learn's 8x8 digits (64 steps, no download):

    pretrain   digits 0-4, pixels read row by row, every weight trained (AdamW lr 1e-2)
    fine-tune  digits 5-9, pixels read column by column (a new task: other classes, another temporal structure),
               a fresh decoder (the head, trained in every row as the authors' decoder is), each method at lr 5e-3

Rows, through the registry and PeftModel (+ the head, linear_probe, everywhere; + D and the output bias where the
authors train them; + log_dt where they tune the SSM):

    head only        linear_probe
    head + D, dt, bias
    LoRA (Proj)      lora_out_proj r 16                     (and "LoRA (Proj) + dt", with log_dt as the SDT rows)
    LoRA (S4+Proj)   lora_ssm r 4 + lora_out_proj r 16
    SDT              sdt: 4 of 64 channels, 1 of 16 states (all usable), output columns, 1-epoch warm-up at lr 1e-2
    SDT + LoRA       the same sdt without the columns + lora_out_proj r 16
    full             every weight

The encoder (Linear 1 -> 64, 128 weights), which the authors train in every row, is trained by `full` only (no
method targets it). Test accuracy after the last epoch, mean and spread over --seeds fine-tuning seeds.

Everything runs through the library: the data are the built-in sequence tasks (data/sequences.py: `digits-rows`,
`digits`, split by `data_seed` = the fine-tuning seed), the pretrained model is the built-in `tiny-s4d`
(scripts/pretrain_tiny_s4d.py, the same recipe; other --pretrain-* settings pretrain again with that script's
function), and every row is a `mambapeft train --task sequence` run (`fine_tune`: the Trainer, SDT's restart, the
adapter) with the authors' settings: constant rate, no clipping, weight decay 0.01 on every tensor (the partial
methods' own decay set to it), and SDT's warm-up at --warmup-lr (a callback raises the rate for those steps).

    python benchmarks/s4_pixels.py                    # writes benchmarks/results/s4_pixels.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, setup_threads
from transformers import TrainerCallback

from mambapeft.data.sequences import SequenceDataset, builtin_split
from mambapeft.model.s4d import load_s4d, save_s4d
from mambapeft.train.run import fine_tune
from mambapeft.train.sequence import accuracy

HEAD = "linear_probe"
DECAY = "weight_decay=0.01"                      # torch's AdamW default, which the authors' runs put on every tensor
EXTRAS = [f"partial_d:{DECAY}", f"partial_out_bias:{DECAY}"]
DT = f"partial_log_dt:{DECAY}"
LORA = "lora_out_proj:r=16,s=1,dropout=0"
SDT = "sdt:warmup_steps={warmup},restart=true,channel_fraction=0.0625,state_fraction=0.0625,out_proj={out_proj}"
ROWS = {
    "head only": [HEAD],
    "head + D, dt, bias": [HEAD, *EXTRAS, DT],
    "LoRA (Proj)": [HEAD, LORA, *EXTRAS],
    # not an authors' row: LoRA (Proj) with log_dt too, to tell what SDT's few SSM entries add beside dt
    "LoRA (Proj) + dt": [HEAD, LORA, *EXTRAS, DT],
    "LoRA (S4+Proj)": [HEAD, "lora_ssm:r=4", LORA, *EXTRAS, DT],
    "SDT": [HEAD, SDT.replace("{out_proj}", "true"), *EXTRAS, DT],
    "SDT + LoRA": [HEAD, SDT.replace("{out_proj}", "false"), LORA, *EXTRAS, DT],
    "full": ["full"],
}
PRETRAIN_DEFAULTS = {"pretrain_epochs": 40, "pretrain_lr": 1e-2, "seed": 123}    # scripts/pretrain_tiny_s4d.py's


class WarmupRate(TrainerCallback):
    """The authors' SDT warm-up runs at its own rate: every group at `rate` for the first `steps` optimiser steps
    (the scheduler puts the run's rate back after each step)."""

    def __init__(self, rate: float, steps: int):
        self.rate, self.steps = rate, steps

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step < self.steps:
            for group in optimizer.param_groups:
                group["lr"] = self.rate


class KeepModel(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def pretrained_model(args, folder: Path, log) -> tuple[str, dict]:
    """(the pretrained model's folder or name, what the report says of it): the built-in tiny-s4d when the settings
    are its own, else pretrained again with scripts/pretrain_tiny_s4d.py's function."""
    x, y = builtin_split("digits-rows", "test")
    if args.pretrained:
        model, name = load_s4d(args.pretrained), args.pretrained
    elif all(getattr(args, k) == v for k, v in PRETRAIN_DEFAULTS.items()):
        model, name = load_s4d("tiny-s4d"), "tiny-s4d"
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
        from pretrain_tiny_s4d import pretrain

        model, _ = pretrain(folder / "pretrain", epochs=args.pretrain_epochs, lr=args.pretrain_lr, seed=args.seed,
                            threads=args.threads, log=lambda *_: None)
        name = str(folder / "pretrained")
        save_s4d(model, name)
    acc = accuracy(model, SequenceDataset(x, y))
    log(f"pretrained on digits 0-4, rows ({name}): test accuracy {acc:.1%}")
    return name, {"model": name, "test_accuracy": acc, "train": len(builtin_split("digits-rows", "train")[1]),
                  "test": len(y)}


def fine_tune_row(specs: list[str], model: str, seed: int, args, folder: Path) -> dict:
    """One `mambapeft train --task sequence` run of `specs` on digits 5-9 by columns, split and seeded by `seed`."""
    steps_per_epoch = -(-len(builtin_split("digits", "train", seed)[1]) // args.batch)
    specs = [s.replace("{warmup}", str(steps_per_epoch)) for s in specs]
    warmup = steps_per_epoch if any(s.startswith("sdt:") for s in specs) else 0
    keep = KeepModel()
    start, cpu = time.perf_counter(), time.process_time()
    results = fine_tune({"task": "sequence", "model": model, "method": specs, "data": "digits", "data_seed": seed,
                         "seed": seed, "epochs": float(args.epochs), "batch_size": args.batch,
                         "micro_batch_size": args.batch, "lr": args.lr, "weight_decay": 0.01, "scheduler": "constant",
                         "max_grad_norm": 0.0, "val_fraction": 0.0, "eval_epochs": float(args.epochs),
                         "save_total_limit": 1, "logging_steps": 1000, "output_dir": str(folder)},
                        overwrite=True, callbacks=[WarmupRate(args.warmup_lr, warmup), keep], log=lambda *_: None)
    train = SequenceDataset(*builtin_split("digits", "train", seed))
    return {"trainable": keep.model.parameter_counts()["trainable"], "test_accuracy": results["fine_tuned"]["acc"],
            "zero_shot_accuracy": results["zero_shot"]["acc"], "train_accuracy": accuracy(keep.model, train),
            "steps": results["steps"], "config": " + ".join(m["method"] for m in results["methods"]),
            "seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(time.process_time() - cpu, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40, help="fine-tuning epochs (after SDT's 1-epoch warm-up)")
    parser.add_argument("--pretrain-epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64, help="the authors' batch size")
    parser.add_argument("--lr", type=float, default=5e-3, help="the authors' rate for every method")
    parser.add_argument("--warmup-lr", type=float, default=1e-2, help="SDT's warm-up rate (the authors')")
    parser.add_argument("--pretrain-lr", type=float, default=1e-2, help="the authors' pretraining rate")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds (data split, head, order)")
    parser.add_argument("--seed", type=int, default=123, help="the pretraining seed")
    parser.add_argument("--pretrained", help="an S4D folder (save_s4d) to fine-tune instead of the built-in tiny-s4d "
                        "(the --pretrain-* settings are then not used)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", help="rows to run (default: all); the other rows of an existing .json "
                        "made with the same settings are kept")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "s4_pixels.json"))
    args = parser.parse_args()
    setup_threads(args.threads)
    start, cpu = time.perf_counter(), time.process_time()

    folder = Path(tempfile.mkdtemp(prefix="s4_pixels-"))
    model, pretraining = pretrained_model(args, folder, print)
    base = sum(t.numel() for t in load_s4d(model).parameters())
    settings = {k: getattr(args, k) for k in ("epochs", "pretrain_epochs", "batch", "lr", "warmup_lr", "pretrain_lr",
                                              "seeds", "seed")}
    if args.pretrained:
        settings["pretrained"] = args.pretrained
    out = Path(args.out)
    rows = {}
    if args.only and out.exists():
        before = json.loads(out.read_text())
        if before["settings"] == settings:
            rows = {name: row for name, row in before["rows"].items() if name not in args.only}
    for name, specs in ROWS.items():
        if args.only and name not in args.only:
            continue
        runs = [fine_tune_row(specs, model, seed, args, folder / "run") for seed in range(args.seeds)]
        accs = [r["test_accuracy"] for r in runs]
        rows[name] = {"specs": specs, "config": runs[0]["config"], "trainable": runs[0]["trainable"],
                      "percent": 100.0 * runs[0]["trainable"] / base, "test_accuracy_mean": statistics.mean(accs),
                      "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "runs": runs}
        r = rows[name]
        print(f"{name:<20} {r['trainable']:>7,} ({r['percent']:5.1f}%)  test {r['test_accuracy_mean']:.1%} "
              f"± {r['test_accuracy_std']:.1%}  ({', '.join(f'{a:.1%}' for a in accs)})  "
              f"{sum(run['cpu_seconds'] for run in runs):.0f} s CPU", flush=True)
        rows = {name: rows[name] for name in ROWS if name in rows}         # the table's order
        report = {"settings": settings, "machine": machine(), "base_parameters": base, "pretraining": pretraining,
                  "fine_tuning": {"train": len(builtin_split("digits", "train")[1]),
                                  "test": len(builtin_split("digits", "test")[1])},
                  "seconds": round(time.perf_counter() - start), "cpu_seconds": round(time.process_time() - cpu),
                  "rows": rows}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")                   # after every row: a partial table
    shutil.rmtree(folder, ignore_errors=True)
    print(f"wrote {out} in {report['seconds']} s ({report['cpu_seconds']} s of CPU)")


if __name__ == "__main__":
    main()
