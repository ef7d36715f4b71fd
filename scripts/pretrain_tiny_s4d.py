"""Pretrains the built-in tiny S4D (src/mambapeft/assets/tiny-s4d) on the built-in pixel-sequence digits, offline.

As benchmarks/s4_pixels.py pretrains (the SDT authors' run_s4_real.py recipe, scaled to the 8x8 digits): a fresh
`s4d-pixels` classifier (encoder 1 -> 64, 4 residual S4D layers with H 64 and N 16, mean pool, decoder) trained in
full on digits 0-4 read row by row (`digits-rows`: 721 training, 180 test sequences of 64 pixels), AdamW at lr 1e-2
with weight decay 0.01, batch 64, 40 epochs, constant rate, through the library's own run pipeline
(`mambapeft train --task sequence --model s4d-pixels --data digits-rows --method full`). The fine-tuning task that
ships with it is `digits` (digits 5-9 read column by column): other classes and another temporal structure.

    python scripts/pretrain_tiny_s4d.py            # about 30 s on two cores; writes assets/tiny-s4d (140 KB)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "mambapeft" / "assets" / "tiny-s4d"


def pretrain(folder, *, epochs: float = 40.0, lr: float = 1e-2, seed: int = 123, threads: int = 0, log=print):
    """(the pretrained DeepS4D, the run's results): `s4d-pixels` trained in full on digits-rows in `folder`."""
    from mambapeft.model.s4d import load_s4d
    from mambapeft.peft import PeftModel
    from mambapeft.train.run import fine_tune

    results = fine_tune({"task": "sequence", "model": "s4d-pixels", "data": "digits-rows", "method": ["full"],
                         "epochs": epochs, "lr": lr, "seed": seed, "threads": threads, "output_dir": str(folder),
                         "eval_epochs": epochs, "logging_steps": 100}, overwrite=True, log=log)
    base = load_s4d("s4d-pixels", num_classes=results["classes"])
    model = PeftModel.from_pretrained(base, Path(folder) / "adapter").merge_and_unload()
    model.name_or_path = "tiny-s4d"
    return model.eval(), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=40.0)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    from mambapeft.model.s4d import save_s4d

    with tempfile.TemporaryDirectory() as tmp:
        model, results = pretrain(Path(tmp) / "run", epochs=args.epochs, lr=args.lr, seed=args.seed,
                                  threads=args.threads)
    save_s4d(model, args.out)
    print(f"wrote {args.out}: test accuracy on digits 0-4 (rows) {results['fine_tuned']['acc']:.1%} of "
          f"{results['fine_tuned']['n']}")


if __name__ == "__main__":
    main()
