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

    python benchmarks/s4_pixels.py                    # writes benchmarks/results/s4_pixels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _common import machine, setup_threads

from mambapeft import get_peft_model
from mambapeft.model.s4d.modeling import build_s4d

HEAD = "linear_probe"
EXTRAS = ["partial_d", "partial_out_bias"]
SDT = "sdt:warmup_steps={warmup},restart=true,channel_fraction=0.0625,state_fraction=0.0625,out_proj={out_proj}"
ROWS = {
    "head only": [HEAD],
    "head + D, dt, bias": [HEAD, *EXTRAS, "partial_log_dt"],
    "LoRA (Proj)": [HEAD, "lora_out_proj:r=16,s=1,dropout=0", *EXTRAS],
    # not an authors' row: LoRA (Proj) with log_dt too, to tell what SDT's few SSM entries add beside dt
    "LoRA (Proj) + dt": [HEAD, "lora_out_proj:r=16,s=1,dropout=0", *EXTRAS, "partial_log_dt"],
    "LoRA (S4+Proj)": [HEAD, "lora_ssm:r=4", "lora_out_proj:r=16,s=1,dropout=0", *EXTRAS, "partial_log_dt"],
    "SDT": [HEAD, SDT.replace("{out_proj}", "true"), *EXTRAS, "partial_log_dt"],
    "SDT + LoRA": [HEAD, SDT.replace("{out_proj}", "false"), "lora_out_proj:r=16,s=1,dropout=0", *EXTRAS,
                   "partial_log_dt"],
    "full": ["full"],
}


def digits(order: str):
    """(sequences (n, 64, 1) in [0, 1], labels) of scikit-learn's 8x8 digits, read row by row or column by column."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0          # (n, 8, 8)
    if order == "column":
        images = images.transpose(1, 2)
    return images.reshape(-1, 64, 1), torch.tensor(data.target)


def split(x, y, classes, seed: int, test_fraction: float):
    """The images of `classes` (relabelled 0..k-1), shuffled with `seed`, cut into train and test."""
    keep = torch.isin(y, torch.tensor(classes))
    x, y = x[keep], y[keep] - min(classes)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = int(len(y) * test_fraction)
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def batches(x, y, size: int, generator):
    order = torch.randperm(len(y), generator=generator)
    for i in range(0, len(y), size):
        yield x[order[i: i + size]], y[order[i: i + size]]


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).logits.argmax(-1) == y).float().mean().item()


def pretrain(args, log) -> dict:
    x, y = digits("row")
    (train_x, train_y), (test_x, test_y) = split(x, y, [0, 1, 2, 3, 4], seed=0, test_fraction=0.2)
    model = build_s4d("s4d-pixels", seed=args.seed, num_classes=5)
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.pretrain_epochs):
        model.train()
        for bx, by in batches(train_x, train_y, args.batch, generator):
            loss = model(bx, labels=by).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    acc = accuracy(model, test_x, test_y)
    log(f"pretrained on digits 0-4, rows: {len(train_y)} train, test accuracy {acc:.1%}")
    return {"state": model.state_dict(), "test_accuracy": acc, "train": len(train_y), "test": len(test_y)}


def fine_tune(specs: list[str], pretrained: dict, data, seed: int, args) -> dict:
    (train_x, train_y), (test_x, test_y) = data
    model = build_s4d("s4d-pixels", seed=seed, num_classes=5)
    model.load_state_dict(pretrained["state"])
    torch.manual_seed(seed)
    model.decoder.reset_parameters()                              # a fresh head for the new classes
    steps_per_epoch = -(-len(train_y) // args.batch)
    specs = [s.replace("{warmup}", str(steps_per_epoch)) for s in specs]
    peft = get_peft_model(model, specs)
    warmup = peft.extra_steps()

    def optimizer(lr):
        groups = peft.parameter_groups(lr=lr, weight_decay=0.01)
        for group in groups:                                      # torch's AdamW default on every tensor
            group["weight_decay"], group["lr"] = 0.01, lr
        return torch.optim.AdamW(groups)

    opt = optimizer(args.warmup_lr if warmup else args.lr)
    generator = torch.Generator().manual_seed(seed)
    step, start, cpu = 0, time.perf_counter(), time.process_time()
    total = warmup + args.epochs * steps_per_epoch
    while step < total:
        peft.train()
        for bx, by in batches(train_x, train_y, args.batch, generator):
            loss = peft(bx, labels=by).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if peft.on_step_end(step):                            # SDT's selection: the main run starts afresh
                opt = optimizer(args.lr)
            if step == total:
                break
    return {"trainable": peft.parameter_counts()["trainable"], "test_accuracy": accuracy(peft, test_x, test_y),
            "train_accuracy": accuracy(peft, train_x, train_y), "steps": total, "config": str(peft.peft_config),
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
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", help="rows to run (default: all); the other rows of an existing .json "
                        "made with the same settings are kept")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "s4_pixels.json"))
    args = parser.parse_args()
    setup_threads(args.threads)
    start, cpu = time.perf_counter(), time.process_time()

    pretrained = pretrain(args, print)
    x, y = digits("column")
    splits = {seed: split(x, y, [5, 6, 7, 8, 9], seed=seed, test_fraction=0.5) for seed in range(args.seeds)}
    base = sum(t.numel() for t in pretrained["state"].values())
    settings = {k: getattr(args, k) for k in ("epochs", "pretrain_epochs", "batch", "lr", "warmup_lr", "pretrain_lr",
                                              "seeds", "seed")}
    out = Path(args.out)
    rows = {}
    if args.only and out.exists():
        before = json.loads(out.read_text())
        if before["settings"] == settings:
            rows = {name: row for name, row in before["rows"].items() if name not in args.only}
    for name, specs in ROWS.items():
        if args.only and name not in args.only:
            continue
        runs = [fine_tune(specs, pretrained, splits[seed], seed, args) for seed in range(args.seeds)]
        accs = [r["test_accuracy"] for r in runs]
        rows[name] = {"specs": specs, "config": runs[0]["config"], "trainable": runs[0]["trainable"],
                      "percent": 100.0 * runs[0]["trainable"] / base, "test_accuracy_mean": statistics.mean(accs),
                      "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "runs": runs}
        r = rows[name]
        print(f"{name:<20} {r['trainable']:>7,} ({r['percent']:5.1f}%)  test {r['test_accuracy_mean']:.1%} "
              f"± {r['test_accuracy_std']:.1%}  ({', '.join(f'{a:.1%}' for a in accs)})  "
              f"{sum(run['cpu_seconds'] for run in runs):.0f} s CPU", flush=True)
    rows = {name: rows[name] for name in ROWS if name in rows}             # the table's order
    report = {"settings": settings, "machine": machine(), "base_parameters": base,
              "pretraining": {k: v for k, v in pretrained.items() if k != "state"},
              "fine_tuning": {"train": len(splits[0][0][1]), "test": len(splits[0][1][1])},
              "seconds": round(time.perf_counter() - start), "cpu_seconds": round(time.process_time() - cpu),
              "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} in {report['seconds']} s ({report['cpu_seconds']} s of CPU)")


if __name__ == "__main__":
    main()
