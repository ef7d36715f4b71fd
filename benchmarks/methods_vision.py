"""Every PEFT method on the built-in vision task (tiny-vim or tiny-vmamba, digits_rotation) with one budget.

Each run is `fine_tune_vision` with the built-in defaults (head always trained), split "search" (train800,
best checkpoint on val200, then test). Prints a table (method, trainable params, percent, val/test accuracy,
seconds per step) and writes results.json + accuracy_vs_params.png to --out.

    .venv/bin/python benchmarks/methods_vision.py --threads 1 --epochs 20            # all (long on 2 CPU cores)
    .venv/bin/python benchmarks/methods_vision.py --only linear_probe 'lora_p_x:r=8 partial_d'   # a subset
    .venv/bin/python benchmarks/methods_vision.py --model tiny-vmamba     # VMAMBA_METHODS: Table 5's rows and more

On a VMamba the default list is VMAMBA_METHODS: the rows of the paper's Table 5 (linear probe, full, Conv2d-tuning =
partial_conv1d, affix after the cross-scan, additional scan n=2, parallel adapter, LoRA on out_proj, LoRA_p(X)) at
ranks that fit the tiny model, then methods the table lacks (LoRA on x_proj per direction, A, D, SDT, the state
methods).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mambapeft.model.vmamba.loading import looks_like_vmamba
from mambapeft.train import fine_tune_vision

METHODS = [
    "linear_probe", "full", "lora_in_proj:r=8", "lora_x_proj:r=8", "lora_dt_proj:r=4", "lora_out_proj:r=8",
    "lora_p_x:r=8", "lora_p_z:r=8", "lora_p_dt:r=4", "lora_p_b:r=8", "lora_p_c:r=8", "lora_embed:r=8",
    "sll_lora:r=4", "dora_p_x:r=8", "partial_a", "partial_d", "partial_conv1d", "partial_bias",
    "partial_cls_token", "partial_pos_embed", "parallel_adapter:dim=8", "additional_scan:n=4",
    "prompt:n=4,position=prefix", "affix:n=2", "sdt", "sdt lora_out_proj:r=8",
    "initial_state", "state_offset", "state_offset:variant=y",
    "svp:rank=8,shared_layers=4", "mamba_adaptor:points=2,groups=2",     # issue 29: published after MambaPEFT
    "lora_p_x:r=8 lora_in_proj:r=8 lora_out_proj:r=8 partial_d additional_scan:n=4 affix:n=2",   # all at once
]

# Table 5's rows (paper/vmamba/... presets where their sizes fit tiny-vmamba, small ranks elsewhere), then the rest
VMAMBA_METHODS = [
    "linear_probe", "full", "partial_conv1d", "affix:n=3", "additional_scan:n=2", "parallel_adapter:dim=8",
    "lora_out_proj:r=8", "lora_p_x:r=8",
    "lora_x_proj:r=4", "partial_a", "partial_d", "sdt", "initial_state", "state_offset",
    "mamba_adaptor:points=2,groups=2",                                      # issue 29 (SVP is Vim-only)
]


def load_model(name: str):
    from mambapeft.model.vim.loading import load_vim
    from mambapeft.model.vmamba.loading import load_vmamba

    return (load_vmamba if looks_like_vmamba(name) else load_vim)(name)


def sparse_counts(specs: list[str], classes: int, model_name: str = "tiny-vim") -> dict:
    """Trainable parameters after SDT's selection (the run's own count, taken at the start, has the dense warm-up)."""
    import sys

    from mambapeft.config import PeftConfig
    from mambapeft.peft import get_peft_model, guess_arch
    from mambapeft.train.vision import with_head

    model = load_model(model_name)
    model.reset_head(classes)
    peft = get_peft_model(model, PeftConfig.parse(with_head(specs, log=lambda _: None), arch=guess_arch(model)))
    peft.on_step_end(sys.maxsize)                 # as after the warm-up
    return peft.parameter_counts()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-vim",
                        help="the built-in model: tiny-vim (METHODS) or tiny-vmamba (VMAMBA_METHODS)")
    parser.add_argument("--only", nargs="+",
                        help="method specs to run (default: all of METHODS, or of VMAMBA_METHODS on a VMamba); a "
                        "quoted 'a b' is a hybrid")
    parser.add_argument("--epochs", type=float, default=20.0, help="epochs per method (the same budget for all)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default="runs/methods_vision", help="folder for runs, results.json and the plot")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    done_before = {r["method"]: r for r in json.loads(results.read_text())} if results.exists() else {}
    rows = []
    default = VMAMBA_METHODS if looks_like_vmamba(args.model) else METHODS
    for spec in args.only or default:
        if spec in done_before and "error" not in done_before[spec]:   # resume: a finished row is kept
            rows.append(done_before[spec])
            continue
        name = spec.replace(":", "_").replace(",", "_").replace("=", "").replace(" ", "__")[:80]
        try:
            r = fine_tune_vision({"model": args.model, "method": spec.split(), "split": "search", "epochs": args.epochs,
                                  "threads": args.threads, "output_dir": str(out / name)}, overwrite=True,
                                 log=lambda _: None)
        except Exception as err:              # one method's failure is a row of the table, not the end of it
            rows.append(dict(method=spec, error=f"{type(err).__name__}: {err}"))
            print(f"{spec}: {rows[-1]['error']}")
            continue
        counts = sparse_counts(spec.split(), r["classes"], args.model) if "sdt" in spec else r["parameters"]
        rows.append(dict(method=spec, trainable=counts["trainable"], percent=counts["percent"],
                         val_acc=r["best_validation"], test_acc=r["fine_tuned"]["acc"],
                         s_per_step=r["seconds_per_step"]))
        row = rows[-1]
        print(f"{spec:40s} {row['trainable']:>9,} {row['percent']:7.2f}% val {row['val_acc']:.1%} "
              f"test {row['test_acc']:.1%} {row['s_per_step']:.3f} s/step", flush=True)
        results.write_text(json.dumps(rows, indent=2) + "\n")     # after every row: an interrupted run resumes

    results.write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| method | trainable | % | val acc | test acc | s/step |\n|---|---:|---:|---:|---:|---:|")
    for row in rows:
        if "error" in row:
            print(f"| {row['method']} | failed: {row['error'][:60]} | | | | |")
        else:
            print(f"| {row['method']} | {row['trainable']:,} | {row['percent']:.2f} | {row['val_acc']:.1%} | "
                  f"{row['test_acc']:.1%} | {row['s_per_step']:.3f} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    done = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter([r["trainable"] for r in done], [100 * r["test_acc"] for r in done])
    for r in done:
        label = r["method"].split(":")[0] if " " not in r["method"] else (
            "sdt+lora" if r["method"].startswith("sdt ") else "all")
        ax.annotate(label, (r["trainable"], 100 * r["test_acc"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{args.model} on digits_rotation, {args.epochs:g} epochs")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_params.png", dpi=120)
    print(f"plot: {out / 'accuracy_vs_params.png'}")


if __name__ == "__main__":
    main()
