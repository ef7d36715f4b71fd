"""The pixel study's pretraining as s4_pixels.py ran it before the library had the sequence task: a plain torch loop.

Same recipe as scripts/pretrain_tiny_s4d.py (s4d-pixels, digits 0-4 by rows, AdamW lr 1e-2 with torch's default
weight decay 0.01, batch 64, 40 epochs, seed 123), another data order (a torch generator instead of the Trainer's
sampler). Its only use: telling the pretrained model apart from the fine-tuning pipeline when the pixel table moves
(benchmarks/README.md, "Pixel sequences"):

    python benchmarks/s4_pretrain_plain.py /tmp/s4-plain
    python benchmarks/s4_pixels.py --pretrained /tmp/s4-plain --out benchmarks/results/s4_pixels_plain_pretraining.json
"""

from __future__ import annotations

import argparse

import torch
from _common import setup_threads

from mambapeft.data.sequences import SequenceDataset, builtin_split
from mambapeft.model.s4d import build_s4d, save_s4d
from mambapeft.train.sequence import accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write the pretrained S4D to (save_s4d)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()
    setup_threads(1)
    x, y = builtin_split("digits-rows", "train")
    model = build_s4d("s4d-pixels", seed=args.seed, num_classes=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(args.seed)
    model.train()
    for _ in range(args.epochs):
        perm = torch.randperm(len(y), generator=order)
        for i in range(0, len(y), args.batch):
            batch = perm[i: i + args.batch]
            loss = model(x[batch], labels=y[batch]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    test = SequenceDataset(*builtin_split("digits-rows", "test"))
    print(f"pretrained on digits 0-4 (rows): test accuracy {accuracy(model, test):.1%}")
    model.name_or_path = args.out
    save_s4d(model.eval(), args.out)


if __name__ == "__main__":
    main()
