"""Images for Vision Mamba: the paper's VTAB preprocessing with Pillow and numpy, a Dataset, plain class folders.

Preprocessing (the VTAB-1k protocol of the paper and of NOAH, which it follows): RGB, resize to 224 x 224 with
bicubic interpolation (no crop, no augmentation; the aspect ratio is not kept), scale to [0, 1], normalise with
the ImageNet mean and std. Pillow's bicubic resize is what torchvision's Resize calls for PIL images, so the
tensors are those of the reference pipeline without torchvision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    where: str          # where it was listed ("task/test.txt:12" or the class folder), for error messages


def read_image(path: Path, size: int, where: str | None = None) -> np.ndarray:
    """The image as RGB uint8 (size, size, 3), resized bicubically."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(image, dtype=np.uint8)
    except FileNotFoundError:
        raise ConfigError(f"missing image {path}" + (f" (listed at {where})" if where else "")) from None
    except (UnidentifiedImageError, OSError) as err:
        raise ConfigError(f"cannot read image {path}" + (f" (listed at {where})" if where else "")
                          + f": {err}; the file is corrupt or not an image") from None


def to_tensor(rgb: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalised float32 (3, H, W)."""
    x = rgb.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def preprocess(path, size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """One image file -> the (3, size, size) tensor Vim takes."""
    return to_tensor(read_image(Path(path), size), mean, std)


class ImageDataset(Dataset):
    """Labelled images; items are {"pixel_values": (3, S, S) float32, "labels": int}, as `model(**batch)` takes.

    cache=True keeps every resized image in memory as uint8 (150 kB at 224 px), which pays off over the many
    epochs of a 1,000-image VTAB task.
    """

    def __init__(self, samples: list[Sample], num_classes: int, *, image_size: int = 224, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, cache: bool = False, name: str = "images"):
        if not samples:
            raise ConfigError(f"{name}: no images")
        for s in samples:
            if not 0 <= s.label < num_classes:
                raise ConfigError(f"{s.where}: label {s.label} is out of range for {num_classes} classes "
                                  f"(0..{num_classes - 1})")
        self.samples, self.num_classes, self.image_size = samples, num_classes, image_size
        self.mean, self.std, self.name = mean, std, name
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        rgb = self._cache.get(i) if self._cache is not None else None
        if rgb is None:
            rgb = read_image(s.path, self.image_size, s.where)
            if self._cache is not None:
                self._cache[i] = rgb
        return {"pixel_values": to_tensor(rgb, self.mean, self.std), "labels": s.label}

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]


def collate_images(batch: list[dict]) -> dict:
    """A list of items -> {"pixel_values": (b, 3, S, S), "labels": (b,) long}."""
    return {"pixel_values": torch.stack([item["pixel_values"] for item in batch]),
            "labels": torch.tensor([item["labels"] for item in batch], dtype=torch.long)}


def image_folder(root, *, image_size: int = 224, classes: list[str] | None = None, cache: bool = False) -> ImageDataset:
    """A folder with one sub-folder of images per class (sorted names -> labels 0, 1, ...).

    classes: the class names in label order (for a test folder that must use a train folder's labels).
    The dataset gets a `classes` attribute.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"no image folder {root}")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ConfigError(f"{root} has class folders {unknown} that are not among the given classes {classes}")
    if not classes:
        raise ConfigError(f"{root} has no class sub-folders: put the images of each class in a folder of its own")
    samples = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        samples += [Sample(p, label, str(folder)) for p in sorted(folder.rglob("*"))
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        raise ConfigError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    dataset = ImageDataset(samples, len(classes), image_size=image_size, cache=cache, name=str(root))
    dataset.classes = list(classes)
    return dataset
