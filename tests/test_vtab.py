"""VTAB-style folders and class folders: layout, preprocessing values, and errors that name file and line."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from mambapeft import ConfigError
from mambapeft.data.images import IMAGENET_MEAN, IMAGENET_STD, collate_images, image_folder, preprocess
from mambapeft.data.vtab import VTAB_TASKS, vtab_split

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 100, 50)]


def make_task(root, task="toy", sizes=None, labels=(0, 1, 2, 3, 0, 1)):
    """A VTAB-1k style task folder with solid-colour images; label i has COLOURS[i]."""
    folder = root / task
    lists = {}
    for split, count in (sizes or {"train800": 4, "val200": 2, "test": 3}).items():
        lines = []
        for i in range(count):
            label = labels[i % len(labels)]
            rel = f"images/{split}/{i:06d}.jpg"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), COLOURS[label]).save(folder / rel, quality=100, subsampling=0)
            lines.append(f"{rel} {label}")
        lists[split] = lines
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    lists["train800val200"] = lists.get("train800", []) + lists.get("val200", [])
    (folder / "train800val200.txt").write_text("\n".join(lists["train800val200"]) + "\n")
    return folder


def expected_pixel(rgb):
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)])


def test_splits_follow_the_protocol(tmp_path):
    make_task(tmp_path)
    train = vtab_split(tmp_path, "toy", "train", num_classes=4, image_size=32)
    assert len(train) == 6 and train.num_classes == 4                       # train800val200 = 4 + 2
    assert len(vtab_split(tmp_path, "toy", "test", num_classes=4, image_size=32)) == 3
    assert len(vtab_split(tmp_path, "toy", "train800", num_classes=4, image_size=32)) == 4
    assert len(vtab_split(tmp_path, "toy", "val200", num_classes=4, image_size=32)) == 2


def test_items_are_resized_rgb_normalised_with_imagenet_statistics(tmp_path):
    make_task(tmp_path)
    data = vtab_split(tmp_path, "toy", "train", num_classes=4, image_size=24)
    for i in range(4):                                                     # labels 0..3: the four colours
        item = data[i]
        x = item["pixel_values"]
        assert x.shape == (3, 24, 24) and x.dtype == torch.float32        # 40 x 30 -> 24 x 24, no crop
        colour = COLOURS[item["labels"]]
        # a solid colour stays solid under resizing; JPEG may move a channel by a level or two
        assert torch.allclose(x.mean((1, 2)), expected_pixel(colour), atol=3 / 255 / 0.224)
        assert x.std((1, 2)).max() < 0.05


def test_bicubic_resize_as_pillow_does_it(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    got = preprocess(tmp_path / "x.png", size=16)
    resized = np.asarray(Image.fromarray(pixels).resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float64)
    want = (resized / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert torch.allclose(got, torch.from_numpy(want.transpose(2, 0, 1)).float(), atol=1e-5)
    grey = tmp_path / "g.png"
    Image.fromarray(pixels[..., 0]).save(grey)                              # single channel -> RGB
    assert preprocess(grey, size=8).shape == (3, 8, 8)


def test_collate_and_cache(tmp_path):
    make_task(tmp_path)
    data = vtab_split(tmp_path, "toy", "test", num_classes=4, image_size=16, cache=True)
    batch = collate_images([data[0], data[1], data[2]])
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["labels"].tolist() == [0, 1, 2]
    (tmp_path / "toy" / "images" / "test" / "000000.jpg").unlink()         # served from the cache now
    assert torch.equal(data[0]["pixel_values"], batch["pixel_values"][0])


def test_known_vtab_tasks_have_their_class_counts(tmp_path):
    make_task(tmp_path, task="svhn")
    assert vtab_split(tmp_path, "svhn", "test", image_size=8).num_classes == 10
    assert len(VTAB_TASKS) == 19 and VTAB_TASKS["sun397"] == 397


def test_missing_image_names_the_list_and_line(tmp_path):
    folder = make_task(tmp_path)
    (folder / "images" / "test" / "000001.jpg").unlink()
    with pytest.raises(ConfigError, match=r"test\.txt:2: missing image .*000001\.jpg"):
        vtab_split(tmp_path, "toy", "test", num_classes=4)


def test_label_out_of_range_names_the_list_and_line(tmp_path):
    folder = make_task(tmp_path, task="svhn")
    lines = (folder / "test.txt").read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0] + " 10"
    (folder / "test.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"test\.txt:3: label 10 is out of range for 10 classes"):
        vtab_split(tmp_path, "svhn", "test")
    with pytest.raises(ConfigError, match="--num-classes 1 contradicts the 10 classes of the VTAB-1k task 'svhn'"):
        vtab_split(tmp_path, "svhn", "train", num_classes=1)
    make_task(tmp_path)
    with pytest.raises(ConfigError, match=r"train800val200\.txt:2: label 1 is out of range for 1 classes"):
        vtab_split(tmp_path, "toy", "train", num_classes=1)


def test_an_unknown_task_needs_its_class_count(tmp_path):
    """The head is never sized from the largest label seen: a class missing from the lists would be lost silently."""
    make_task(tmp_path, labels=(0, 1, 2, 0, 1, 2))
    with pytest.raises(ConfigError, match=r"'toy' is not one of the 19 VTAB-1k tasks.*labels 0\.\.2.*--num-classes"):
        vtab_split(tmp_path, "toy", "test")
    assert vtab_split(tmp_path, "toy", "test", num_classes=5).num_classes == 5


@pytest.mark.parametrize("line, message", [
    ("images/test/000000.jpg", "expected `images/<split>/NNNNNN.jpg <label>`"),
    ("images/test/000000.jpg 1 2", "expected `images/<split>/NNNNNN.jpg <label>`"),
    ("images/test/000000.jpg one", "the label 'one' is not an integer"),
    ("images/test/000000.jpg -1", "label -1 is negative"),
])
def test_malformed_line_names_the_list_and_line(tmp_path, line, message):
    folder = make_task(tmp_path)
    lines = (folder / "test.txt").read_text().splitlines()
    (folder / "test.txt").write_text("\n".join(lines[:1] + [line] + lines[1:]) + "\n")
    with pytest.raises(ConfigError, match=r"test\.txt:2: " + re.escape(message)):
        vtab_split(tmp_path, "toy", "test", num_classes=4)


def test_missing_task_split_and_list_are_clear(tmp_path):
    make_task(tmp_path)
    with pytest.raises(ConfigError, match="no VTAB task folder .*holds: toy"):
        vtab_split(tmp_path, "cifar", "test")
    with pytest.raises(ConfigError, match="unknown split 'valid'"):
        vtab_split(tmp_path, "toy", "valid", num_classes=4)
    (tmp_path / "toy" / "test.txt").unlink()
    with pytest.raises(ConfigError, match="no list file .*test.txt"):
        vtab_split(tmp_path, "toy", "test", num_classes=4)


def test_corrupt_image_names_the_line(tmp_path):
    folder = make_task(tmp_path)
    (folder / "images" / "test" / "000002.jpg").write_bytes(b"not an image")
    data = vtab_split(tmp_path, "toy", "test", num_classes=4)
    with pytest.raises(ConfigError, match=r"cannot read image .*000002\.jpg \(listed at .*test\.txt:3\)"):
        data[2]


def test_image_folder_one_subfolder_per_class(tmp_path):
    for name, colour in (("cat", COLOURS[0]), ("dog", COLOURS[1])):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (10, 10), colour).save(tmp_path / "train" / name / f"{i}.png")
    data = image_folder(tmp_path / "train", image_size=8)
    assert data.classes == ["cat", "dog"] and data.labels == [0, 0, 1, 1] and data.num_classes == 2
    assert torch.allclose(data[3]["pixel_values"][:, 0, 0], expected_pixel(COLOURS[1]), atol=1e-5)
    (tmp_path / "test" / "dog").mkdir(parents=True)
    Image.new("RGB", (10, 10), COLOURS[1]).save(tmp_path / "test" / "dog" / "0.png")
    test = image_folder(tmp_path / "test", classes=data.classes, image_size=8)
    assert test.labels == [1]
    with pytest.raises(ConfigError, match="no class sub-folders"):
        image_folder(tmp_path / "train" / "cat")


def test_builtin_task_has_the_vtab_layout_and_balanced_turns():
    from mambapeft.data.vtab import BUILTIN_ROOT, BUILTIN_TASK

    sizes = {"train": 1000, "test": 1200, "train800": 800, "val200": 200}
    for split, size in sizes.items():
        data = vtab_split(BUILTIN_ROOT, BUILTIN_TASK, split, image_size=32)
        assert len(data) == size and data.num_classes == 4
        assert sorted(set(data.labels)) == [0, 1, 2, 3] and data.labels.count(0) == size // 4
    lines = (BUILTIN_ROOT / BUILTIN_TASK / "test.txt").read_text().splitlines()
    assert re.fullmatch(r"images/test/\d{6}\.jpg [0-3]", lines[0])
    train = {line.split()[0] for name in ("train800", "val200") for line in
             (BUILTIN_ROOT / BUILTIN_TASK / f"{name}.txt").read_text().splitlines()}
    assert train.isdisjoint(line.split()[0] for line in lines)
