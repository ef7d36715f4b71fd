"""VTAB-1k task folders, in the layout the paper (and NOAH, whose data it uses) reads:

    <root>/<task>/train800.txt  val200.txt  train800val200.txt  test.txt
    <root>/<task>/images/<split>/NNNNNN.jpg ...

Each list line is `images/<split>/NNNNNN.jpg <label>`, the path relative to the task folder. The protocol:
train on train800val200, report top-1 on test; train800 / val200 for hyperparameter search. A malformed line,
a label out of range or a missing image is an error naming the list file and the line.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .images import ImageDataset, Sample
from .instructions import read_text

# task folder -> number of classes (the 19 tasks of VTAB-1k, in its three groups)
VTAB_TASKS = {
    # natural
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "svhn": 10,
    "sun397": 397,
    # specialized
    "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
    # structured
    "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
    "smallnorb_azi": 18, "smallnorb_ele": 9,
}
VTAB_GROUPS = {
    "natural": list(VTAB_TASKS)[:7], "specialized": list(VTAB_TASKS)[7:11], "structured": list(VTAB_TASKS)[11:],
}
# the built-in task (scripts/pretrain_tiny_vim.py): held-out digits, label = their turn by 0/90/180/270 degrees
BUILTIN_ROOT = Path(__file__).resolve().parents[1] / "assets" / "vtab-tiny"
BUILTIN_TASK = "digits_rotation"
KNOWN_CLASSES = {**VTAB_TASKS, BUILTIN_TASK: 4}
# split name -> list file; "train" and "test" are the protocol's
SPLITS = {"train": "train800val200", "test": "test", "train800": "train800", "val200": "val200",
          "train800val200": "train800val200"}


def read_list(file: Path, task_dir: Path) -> list[Sample]:
    """The samples of one list file, each image checked to exist; errors name the file and the line."""
    if not file.is_file():
        raise ConfigError(f"no list file {file}: a VTAB-1k task folder holds "
                          f"{', '.join(f'{n}.txt' for n in ('train800', 'val200', 'train800val200', 'test'))}")
    samples = []
    for number, line in enumerate(read_text(file).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"{where}: expected `images/<split>/NNNNNN.jpg <label>` (a path and an integer "
                              f"label, separated by a space), got {line.strip()!r}")
        name, label = parts
        try:
            label = int(label)
        except ValueError:
            raise ConfigError(f"{where}: the label {label!r} is not an integer") from None
        if label < 0:
            raise ConfigError(f"{where}: label {label} is negative")
        path = task_dir / name
        if not path.is_file():
            raise ConfigError(f"{where}: missing image {path}")
        samples.append(Sample(path, label, where))
    if not samples:
        raise ConfigError(f"{file} lists no images")
    return samples


def task_folder(root, task: str) -> Path:
    root = Path(root)
    folder = root / task
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise ConfigError(f"no VTAB task folder {folder}" + (f"; {root} holds: {', '.join(present)}" if present
                          else f"; expected <root>/<task>/ with the list files, e.g. {root}/cifar/test.txt"))
    return folder


def task_classes(root, task: str, num_classes: int | None = None) -> int:
    """The class count: the known one of a VTAB-1k task (or the built-in one), else `num_classes`, which must then be
    given: sizing the head from the largest label seen would silently drop classes absent from the lists."""
    known = KNOWN_CLASSES.get(task)
    if known is not None and num_classes is not None and num_classes != known:
        raise ConfigError(f"--num-classes {num_classes} contradicts the {known} classes of the VTAB-1k task {task!r}")
    if known is not None or num_classes is not None:
        return known if known is not None else num_classes
    folder = task_folder(root, task)
    labels = [s.label for name in ("train800val200", "test", "train800", "val200")
              if (folder / f"{name}.txt").is_file() for s in read_list(folder / f"{name}.txt", folder)]
    seen = f" (its lists have labels 0..{max(labels)})" if labels else ""
    raise ConfigError(f"{task!r} is not one of the 19 VTAB-1k tasks, so its number of classes is unknown{seen}: "
                      f"pass --num-classes (num_classes in a config file)")


def vtab_split(root, task: str, split: str = "train", *, image_size: int = 224, num_classes: int | None = None,
               cache: bool = False) -> ImageDataset:
    """One split of a VTAB-style task: "train" (train800val200), "test", "train800" or "val200".

    num_classes: by default the task's known count (VTAB-1k names) or max label + 1 over all its lists.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; one of {', '.join(SPLITS)} "
                          f"(train = train800val200, as the paper trains; test is what it reports)")
    folder = task_folder(root, task)
    samples = read_list(folder / f"{SPLITS[split]}.txt", folder)
    classes = task_classes(root, task, num_classes)
    return ImageDataset(samples, classes, image_size=image_size, cache=cache, name=f"{task}/{SPLITS[split]}")
