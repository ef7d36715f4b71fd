"""Writes src/mambapeft/assets/digits.npz, the built-in sequence task's data (data/sequences.py reads it).

The 1,797 8x8 grey images of handwritten digits (pixel counts 0-16) and their labels, from scikit-learn's bundled
copy of the test set of the UCI "Optical Recognition of Handwritten Digits" data set (E. Alpaydin, C. Kaynak, 1998;
https://archive.ics.uci.edu/dataset/80, licensed CC BY 4.0). scikit-learn is needed here only, not by the package:

    pip install scikit-learn && python scripts/make_digits.py

Stored as uint8 arrays `images` (1797, 8, 8) and `labels` (1797,), compressed: about 45 KB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "src" / "mambapeft" / "assets" / "digits.npz"


def main() -> None:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images.astype(np.uint8)                      # integers 0..16 stored as float64 by scikit-learn
    assert (images == data.images).all() and images.max() <= 16
    labels = data.target.astype(np.uint8)
    np.savez_compressed(OUT, images=images, labels=labels)
    print(f"wrote {OUT}: {len(labels)} images {images.shape[1:]}, {OUT.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
