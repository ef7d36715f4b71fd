"""Builds the built-in tiny VMamba: pretrained like the tiny Vim, on the same digits, never seeing the task's images.

    .venv/bin/pip install scikit-learn            # the 8x8 digits ship with it; only the asset scripts need it
    .venv/bin/python scripts/pretrain_tiny_vmamba.py --threads 1          # deterministic (seed 0)
    .venv/bin/python scripts/pretrain_tiny_vmamba.py --steps 20 --out /tmp/v   # a quick smoke run

Data, held-out split, augmentation and accuracy are those of scripts/pretrain_tiny_vim.py (imported from it, not
copied): scikit-learn's 1,797 digits upscaled to 32 x 32; the same fixed random 550 held out for the built-in task
(assets/vtab-tiny/digits_rotation, written by that script; this one does not rewrite it); digit classification
(10 classes) on the other 1,247, augmented on the fly.

Model (assets/tiny-vmamba): VMamba with dims 16, 32, 64, 128, depths 1, 1, 2, 1, patch embedding of stride 4 (8 x 8
tokens at 32 px, then 4 x 4, 2 x 2, 1 x 1), N = 1, drop path 0.1; the released models' structure at a small size.
A plain AdamW loop for a one-off asset build, not the fine-tuning path. Final accuracies go to pretraining.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from pretrain_tiny_vim import SIZE, TASK, accuracy, pretrain, render, split_digits  # noqa: E402

from mambapeft.data.images import to_tensor  # noqa: E402
from mambapeft.model.vmamba.loading import save_vmamba  # noqa: E402
from mambapeft.model.vmamba.modeling import VMamba, VMambaConfig  # noqa: E402

CONFIG = VMambaConfig(embed_dim=16, depths=(1, 1, 2, 1), img_size=SIZE, patch_size=4, num_classes=10, d_state=1,
                      drop_path_rate=0.1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the init, the augmentation and drop path")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: deterministic and fast on a busy machine)")
    p.add_argument("--out", type=Path, default=ROOT / "src" / "mambapeft" / "assets",
                   help="assets folder: writes tiny-vmamba/ in it")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    images, targets, held, rest = split_digits(args.seed)
    task = args.out / "vtab-tiny" / TASK
    # the pretraining pool: 90% to train, 10% to watch digit accuracy (none of the held-out digits), as for Vim
    watch, train = rest[: len(rest) // 10], rest[len(rest) // 10:]
    assert not set(held) & set(rest), "the held-out task digits must never be trained on"
    as_tensor = lambda idx: torch.stack([to_tensor(render(images[i])) for i in idx])  # noqa: E731
    x_train, y_train = as_tensor(train), torch.as_tensor(targets[train])
    x_watch, y_watch = as_tensor(watch), torch.as_tensor(targets[watch])

    model = VMamba(CONFIG)
    model.reset_parameters(seed=args.seed)
    # no decay on norms, biases, A_logs and Ds (upstream marks A_logs / Ds _no_weight_decay)
    decays = {n: p.dim() >= 2 and not n.endswith("A_logs") for n, p in model.named_parameters()}
    start = time.time()
    losses = pretrain(model, decays, x_train, y_train, x_watch, y_watch, args)

    folder = args.out / "tiny-vmamba"
    model.eval()
    save_vmamba(model, folder)
    report = {
        "data": "scikit-learn digits, 8x8 upscaled to 32x32; 550 held out for the task, never seen here "
                "(the split of scripts/pretrain_tiny_vim.py)",
        "model": {k: v for k, v in CONFIG.to_dict().items() if k != "model_type"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_images": int(len(train)), "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
        "threads": args.threads,
        "final_loss": float(np.mean(losses[-100:])),
        "digit_accuracy_train": accuracy(model, x_train, y_train),
        "digit_accuracy_watch": accuracy(model, x_watch, y_watch),
        "seconds": round(time.time() - start, 1), "torch": torch.__version__,
        "task": {"name": TASK, "classes": 4, "written_by": "scripts/pretrain_tiny_vim.py",
                 "present": (task / "test.txt").is_file()},
    }
    (folder / "pretraining.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
