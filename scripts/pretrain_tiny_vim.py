"""Builds the vision defaults: a tiny pretrained Vision Mamba and a VTAB-style task it has never seen.

    .venv/bin/pip install scikit-learn            # the 8x8 digits ship with it; only this script needs it
    .venv/bin/python scripts/pretrain_tiny_vim.py                       # deterministic (seed 0)
    .venv/bin/python scripts/pretrain_tiny_vim.py --steps 20 --out /tmp/v   # a quick smoke run

Data: scikit-learn's 1,797 handwritten digits (8 x 8, 16 grey levels), upscaled to 32 x 32 (bicubic) and fed
through the same preprocessing as any VTAB image (RGB, ImageNet mean/std). A fixed random 550 of them are held
out before anything else; pretraining never sees them.

* Pretraining (assets/tiny-vim): digit classification (10 classes) on the other 1,247 digits, augmented
  on the fly (rotation within +-10 degrees, scale, shift, contrast); Vim d 64, depth 4, patch 8 on 32 px.
* The task (assets/vtab-tiny/digits_rotation): the held-out digits turned by 0, 90, 180 or 270 degrees, the
  label being the turn (4 classes): a label the pretraining never saw, on images it never saw, in the VTAB-1k
  layout (train800.txt, val200.txt, train800val200.txt, test.txt; images/<split>/NNNNNN.jpg). 250 digits x 4
  turns make train800 + val200; the other 300 x 4 make the 1,200 test images.

The loop here is a plain AdamW loop for a one-off asset build, not the fine-tuning path (mambapeft.train).
Final accuracies go to the model folder's pretraining.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mambapeft.data.images import to_tensor  # noqa: E402
from mambapeft.model.vim.loading import save_vim  # noqa: E402
from mambapeft.model.vim.modeling import VimConfig, VisionMamba  # noqa: E402

SIZE = 32
HELD_OUT, TASK_TRAIN_DIGITS, TASK_VAL_DIGITS = 550, 200, 50
TASK = "digits_rotation"


def render(digit: np.ndarray) -> np.ndarray:
    """8 x 8 grey levels 0..16 -> 32 x 32 RGB uint8 (bicubic), white strokes on black."""
    from PIL import Image

    grey = Image.fromarray(np.clip(digit * (255 / 16), 0, 255).astype(np.uint8), mode="L")
    return np.asarray(grey.resize((SIZE, SIZE), Image.Resampling.BICUBIC).convert("RGB"))


def split_digits(seed: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    held, rest = order[:HELD_OUT], order[HELD_OUT:]
    return digits.images, digits.target, held, rest


def write_task(folder: Path, images: np.ndarray, held: np.ndarray, seed: int) -> dict:
    """The rotation task in the VTAB-1k layout; returns the split sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed + 1)
    pools = {
        "train800": held[:TASK_TRAIN_DIGITS],
        "val200": held[TASK_TRAIN_DIGITS:TASK_TRAIN_DIGITS + TASK_VAL_DIGITS],
        "test": held[TASK_TRAIN_DIGITS + TASK_VAL_DIGITS:],
    }
    lists = {}
    for split, pool in pools.items():
        items = [(i, k) for i in pool for k in range(4)]
        items = [items[j] for j in rng.permutation(len(items))]
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for n, (i, k) in enumerate(items):
            rel = f"images/{split}/{n:06d}.jpg"
            Image.fromarray(np.ascontiguousarray(np.rot90(render(images[i]), k))).save(folder / rel, quality=95)
            lines.append(f"{rel} {k}")
        lists[split] = lines
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (folder / "README.md").write_text(
        "# digits_rotation (built-in VTAB-style task)\n\n"
        "scikit-learn digits held out of the tiny Vim's pretraining, turned by 0/90/180/270 degrees;\n"
        "label = turn // 90. Written by scripts/pretrain_tiny_vim.py (deterministic).\n")
    return {split: len(lines) for split, lines in lists.items()}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random small rotation, scale, shift and contrast on a normalised batch (b, 3, S, S)."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(b, generator=gen) * 2 - 1) * 0.1
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * (3 / SIZE)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    background = x.amin(dim=(2, 3), keepdim=True)                          # the black of each channel
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x - background, grid, align_corners=False) + background
    contrast = 0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=gen)
    return (x - background) * contrast + background


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    hits = sum((model(xb).logits.argmax(-1) == yb).sum().item() for xb, yb in zip(x.split(256), y.split(256)))
    model.train()
    return hits / len(y)


def pretrain(model, decays: dict[str, bool], x_train, y_train, x_watch, y_watch, args) -> list[float]:
    """The tiny vision models' pretraining (Vim, VMamba): AdamW (decay 0.05 where `decays`), warm-up then cosine,
    augmented batches, gradients clipped at 1.0; returns the losses."""
    opt = torch.optim.AdamW([
        {"params": [p for n, p in model.named_parameters() if decays[n]], "weight_decay": 0.05},
        {"params": [p for n, p in model.named_parameters() if not decays[n]], "weight_decay": 0.0},
    ], lr=args.lr)
    warmup = min(100, args.steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    gen = torch.Generator().manual_seed(args.seed)
    start, losses = time.time(), []
    model.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(y_train), (args.batch,), generator=gen)
        loss = model(augment(x_train[idx], gen), labels=y_train[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == args.steps:
            print(f"step {step}/{args.steps}  loss {np.mean(losses[-100:]):.4f}  watch acc "
                  f"{accuracy(model, x_watch, y_watch):.3f}  {time.time() - start:.0f}s", flush=True)
    return losses


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps (default 1500)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the init and the augmentation")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 is much faster on a busy machine)")
    p.add_argument("--out", type=Path, default=ROOT / "src" / "mambapeft" / "assets",
                   help="assets folder: writes tiny-vim/ and vtab-tiny/ in it")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    images, targets, held, rest = split_digits(args.seed)
    sizes = write_task(args.out / "vtab-tiny" / TASK, images, held, args.seed)
    print(f"task written: {sizes}", flush=True)

    # the pretraining pool: 90% to train, 10% to watch digit accuracy (none of the held-out digits)
    watch, train = rest[: len(rest) // 10], rest[len(rest) // 10:]
    as_tensor = lambda idx: torch.stack([to_tensor(render(images[i])) for i in idx])  # noqa: E731
    x_train, y_train = as_tensor(train), torch.as_tensor(targets[train])
    x_watch, y_watch = as_tensor(watch), torch.as_tensor(targets[watch])

    config = VimConfig(d_model=64, depth=4, img_size=SIZE, patch_size=8, stride=8, num_classes=10)
    model = VisionMamba(config)
    model.reset_parameters(seed=args.seed)
    decays = {n: p.dim() >= 2 and n not in ("pos_embed", "cls_token") for n, p in model.named_parameters()}
    start = time.time()
    losses = pretrain(model, decays, x_train, y_train, x_watch, y_watch, args)

    folder = args.out / "tiny-vim"
    model.eval()
    save_vim(model, folder)
    report = {
        "data": "scikit-learn digits, 8x8 upscaled to 32x32; 550 held out for the task, never seen here",
        "train_images": int(len(train)), "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
        "final_loss": float(np.mean(losses[-100:])),
        "digit_accuracy_train": accuracy(model, x_train, y_train),
        "digit_accuracy_watch": accuracy(model, x_watch, y_watch),
        "seconds": round(time.time() - start, 1), "torch": torch.__version__,
        "task": {"name": TASK, "classes": 4, "splits": sizes},
    }
    (folder / "pretraining.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
