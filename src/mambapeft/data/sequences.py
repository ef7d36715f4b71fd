"""Sequence classification data: the built-in pixel-sequence digits and .npz files of sequences and labels.

The built-in tasks read the packaged 8x8 digits (assets/digits.npz) as sequences of 64 grey pixels in [0, 1], as the
SDT paper's S4 study reads images (its pixel-sequence MNIST / CIFAR-10):

    digits-rows   digits 0-4, pixels row by row; 20% test (tiny-s4d's pretraining task)
    digits        digits 5-9, pixels column by column; 50% test (the fine-tuning task: other classes, another
                  temporal structure); labels 0-4

Each is split into train and test by a seeded permutation (`data_seed`; seed 0 is the packaged default).

A .npz file holds `sequences`, a float or integer array (n, L) or (n, L, features), and `labels`, integers (n,) from
0; every array is checked (kind, shape, finite values, labels against the class count) with a message naming the file.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError

DIGITS_FILE = Path(__file__).resolve().parents[1] / "assets" / "digits.npz"


@dataclass(frozen=True)
class BuiltinSequenceTask:
    order: str                     # "row" or "column": how an 8x8 image becomes a sequence of 64 pixels
    classes: tuple[int, ...]       # the digits kept, relabelled 0..k-1 in this order
    test_fraction: float
    description: str


BUILTIN_TASKS = {
    "digits": BuiltinSequenceTask("column", (5, 6, 7, 8, 9), 0.5, "8x8 digits 5-9 read column by column"),
    "digits-rows": BuiltinSequenceTask("row", (0, 1, 2, 3, 4), 0.2, "8x8 digits 0-4 read row by row"),
}


def digits_sequences(order: str = "row", classes=tuple(range(10))) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequences (n, 64, 1) in [0, 1], labels (n,)) of the packaged digits of `classes` (relabelled 0..k-1 in the
    order given), read row by row or column by column."""
    if order not in ("row", "column"):
        raise ConfigError(f"order must be 'row' or 'column', not {order!r}")
    with np.load(DIGITS_FILE, allow_pickle=False) as data:
        images = torch.from_numpy(data["images"].astype(np.float32)) / 16.0          # (n, 8, 8)
        labels = torch.from_numpy(data["labels"].astype(np.int64))
    if order == "column":
        images = images.transpose(1, 2)
    keep = torch.isin(labels, torch.tensor(classes))
    relabel = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
    relabel[torch.tensor(classes)] = torch.arange(len(classes))
    return images[keep].reshape(-1, 64, 1), relabel[labels[keep]]


def split_sequences(x: torch.Tensor, y: torch.Tensor, seed: int, fraction: float):
    """((x, y) kept, (x, y) held out): a seeded permutation, its first `fraction` held out."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n = int(len(y) * fraction)
    return (x[n:], y[n:]), (x[:n], y[:n])


def builtin_split(name: str, split: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The "train" or "test" part of a built-in task, split with `seed`."""
    task = BUILTIN_TASKS[name]
    train, test = split_sequences(*digits_sequences(task.order, task.classes), seed, task.test_fraction)
    return train if split == "train" else test


def read_npz(path, what: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """(sequences (n, L, features) float32, labels (n,) int64) of a .npz file, checked."""
    path = Path(path).expanduser()
    where = f"{what} {path}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file (a .npz of 'sequences' and 'labels', or a built-in task: "
                          f"{', '.join(BUILTIN_TASKS)})")
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{where} cannot be read as a .npz file (not a zip archive of .npy arrays: another format, "
                          f"or truncated); write it with numpy.savez(path, sequences=..., labels=...)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise ConfigError(f"{where} holds object arrays (pickled Python objects), which are not read; save plain "
                              f"numeric arrays") from None
        raise ConfigError(f"{where} cannot be read as a .npz file ({err})") from None
    except Exception as err:
        raise ConfigError(f"{where} cannot be read as a .npz file (corrupt, truncated or another format: "
                          f"{type(err).__name__}: {str(err)[:200]})") from None
    missing = [k for k in ("sequences", "labels") if k not in arrays]
    if missing:
        raise ConfigError(f"{where} lacks the array(s) {', '.join(missing)}; it has {', '.join(arrays) or 'none'} "
                          f"(expected 'sequences' (n, L) or (n, L, features) and integer 'labels' (n,))")
    x, y = arrays["sequences"], arrays["labels"]
    if x.dtype.kind not in "fiub" or x.dtype.kind == "b":
        raise ConfigError(f"{where}: 'sequences' has dtype {x.dtype}; expected numbers (float or integer)")
    if x.ndim not in (2, 3):
        raise ConfigError(f"{where}: 'sequences' has shape {x.shape}; expected (n, L) or (n, L, features)")
    if x.ndim == 2:
        x = x[..., None]
    if min(x.shape) < 1:
        raise ConfigError(f"{where}: 'sequences' has shape {x.shape}: no sequences, no steps or no features")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ConfigError(f"{where}: 'labels' has shape {y.shape} and dtype {y.dtype}; expected integers (n,)")
    if len(y) != len(x):
        raise ConfigError(f"{where}: {len(x)} sequences but {len(y)} labels")
    if (y < 0).any():
        raise ConfigError(f"{where}: label {int(y.min())} is negative; labels are class indices 0, 1, ...")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x))[0][0])
        raise ConfigError(f"{where}: sequence {bad} holds NaN or infinite values")
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def load_sequences(name: str, split: str, seed: int = 0, what: str = "data"):
    """A built-in task's split, or a .npz file (all of it)."""
    if name in BUILTIN_TASKS:
        return builtin_split(name, split, seed)
    return read_npz(name, what)


class SequenceDataset(torch.utils.data.Dataset):
    """(sequences (n, L, features), labels (n,)) as items {"inputs": (L, features), "labels": ()}."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i) -> dict:
        return {"inputs": self.x[i], "labels": self.y[i]}


def collate_sequences(items: list[dict]) -> dict:
    return {key: torch.stack([item[key] for item in items]) for key in ("inputs", "labels")}
