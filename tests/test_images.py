"""The data sources of data.dataset, read from files the tests write in each source's own format (no network):
an RGB image folder, a grey one without train/test, torchvision's FashionMNIST idx files, the rendered
symbols; the size rule, the tint, the caches, and the one-line errors for what is missing or broken."""

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icm_dist.config import DataConfig
from icm_dist.data.images import fit_size, load_images, tint
from icm_dist.data.mnist import to_float_32x32
from icm_dist.errors import DataError


def _png(path: Path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def rgb_folder(root: Path, classes=("cat", "ant", "bee"), train=5, test=2, size=20, seed=0) -> dict:
    """ImageFolder layout with train/ and test/: random RGB images; returns {(part, class, i): array}."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for part, n in (("train", train), ("test", test)):
        for c in classes:
            for i in range(n):
                a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                _png(root / part / c / f"{i:03d}.png", a)
                arrays[(part, c, i)] = a
    return arrays


def test_rgb_folder_with_train_and_test(tmp_path):
    arrays = rgb_folder(tmp_path / "imgs")
    cfg = DataConfig(dataset=f"folder:{tmp_path / 'imgs'}", root=str(tmp_path / "cache"))
    d = load_images(cfg)
    assert d.classes == ["ant", "bee", "cat"] and d.channels == 3
    assert d.train_x.shape == (15, 3, 32, 32) and d.test_x.shape == (6, 3, 32, 32)
    assert d.train_labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5  # sorted classes, sorted files
    # 20x20 is zero-padded, centred, to 32x32: 6 pixels each side; the centre holds the PNG's pixels / 255.
    want = torch.from_numpy(arrays[("train", "ant", 0)]).permute(2, 0, 1).float() / 255
    assert torch.equal(d.train_x[0, :, 6:26, 6:26], want)
    assert float(d.train_x[:, :, :6].abs().max()) == 0 and float(d.train_x[:, :, :, 26:].abs().max()) == 0
    caches = list((tmp_path / "cache").glob("icm_dist_folder_*_32.safetensors"))
    assert len(caches) == 1
    again = load_images(cfg)  # from the cache
    assert torch.equal(again.train_x, d.train_x) and again.classes == d.classes
    # A changed file changes the folder's fingerprint: the data set is read afresh.
    _png(tmp_path / "imgs" / "train" / "ant" / "000.png", np.zeros((20, 20, 3), np.uint8))
    assert float(load_images(cfg).train_x[0].abs().max()) == 0


def test_grey_folder_without_test_part_is_split_fixed_and_larger_images_shrink(tmp_path):
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        for i in range(7):
            _png(tmp_path / "g" / c / f"{i}.png", rng.integers(0, 256, (48, 64), dtype=np.uint8))
    cfg = DataConfig(dataset=f"folder:{tmp_path / 'g'}", root=str(tmp_path / "cache"))
    d = load_images(cfg)
    assert d.channels == 1 and d.train_x.shape == (12, 1, 32, 32) and d.test_x.shape == (2, 1, 32, 32)
    d2 = load_images(DataConfig(dataset=cfg.dataset, root=str(tmp_path / "cache2")))  # rebuilt: the same split
    assert torch.equal(d.test_x, d2.test_x) and torch.equal(d.train_labels, d2.train_labels)


def test_size_rule_by_hand():
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(fit_size(x, 32), torch.nn.functional.pad(x, (2, 2, 2, 2)))
    wide = torch.ones(1, 3, 48, 64)
    y = fit_size(wide, 32)  # shorter side 48 -> 32 (64 -> 43), then the centre 32 columns
    assert y.shape == (1, 3, 32, 32) and torch.allclose(y, torch.ones_like(y))
    assert torch.equal(fit_size(x, 28), x)


def test_mnist_source_is_the_paper_protocol(mnist, data_root):
    from icm_dist.data.mnist import load_mnist

    raw = load_mnist(data_root)
    assert torch.equal(mnist.train_x, to_float_32x32(raw["train_images"], raw["denominator"]))
    assert mnist.classes == [str(i) for i in range(10)] and mnist.channels == 1 and mnist.test_x.shape[0] == 10000


def test_tint_colours_each_example_by_its_id():
    x = torch.rand(6, 1, 8, 8)
    y = tint(x, torch.arange(6))
    assert y.shape == (6, 3, 8, 8)
    colour = y / x.clamp(min=1e-6)  # the same RGB colour at every pixel of an example
    assert torch.allclose(colour.amin(dim=(2, 3)), colour.amax(dim=(2, 3)), atol=1e-4)
    assert float(colour.amax(dim=(2, 3)).max(1).values.min()) == pytest.approx(1.0, abs=1e-5)  # saturated, full value
    assert torch.equal(tint(x[3:4], torch.tensor([3])), y[3:4])  # keyed by the id, not the position
    reds = tint(torch.ones(200, 1, 1, 1), torch.arange(200), 0.1)[:, :, 0, 0]  # hues in [0, 0.1): red to orange
    assert float(reds[:, 0].min()) == 1.0 and float(reds[:, 1].max()) < 0.61 and float(reds[:, 2].max()) == 0.0
    with pytest.raises(DataError, match="grey images"):
        tint(torch.rand(1, 3, 4, 4), torch.arange(1))


def _idx(path: Path, arr: np.ndarray) -> None:
    """An MNIST-format idx file (uint8 data), as torchvision's MNIST family reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def fashion_mnist_files(root: Path, n_train=40, n_test=20, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    raw = root / "FashionMNIST" / "raw"
    data = {"train": (rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train)),
            "t10k": (rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test))}
    for split, (x, y) in data.items():
        _idx(raw / f"{split}-images-idx3-ubyte", x)
        _idx(raw / f"{split}-labels-idx1-ubyte", y)
    return data


def test_torchvision_class_reads_its_own_files(tmp_path):
    data = fashion_mnist_files(tmp_path)
    d = load_images(DataConfig(dataset="torchvision:FashionMNIST", root=str(tmp_path)))
    assert d.channels == 1 and d.train_x.shape == (40, 1, 32, 32) and d.test_x.shape == (20, 1, 32, 32)
    assert d.classes[0] == "T-shirt/top" and len(d.classes) == 10
    assert d.train_labels.tolist() == data["train"][1].tolist()
    want = torch.from_numpy(data["t10k"][0][3].astype(np.float32)) / 255
    assert torch.equal(d.test_x[3, 0, 2:30, 2:30], want)  # 28x28 padded to 32 as MNIST is
    assert (tmp_path / "icm_dist_torchvision_FashionMNIST_32.safetensors").is_file()


def test_missing_torchvision_files_say_which_and_how(tmp_path):
    with pytest.raises(DataError) as e:
        load_images(DataConfig(dataset="torchvision:KMNIST", root=str(tmp_path)))
    msg = str(e.value)
    assert "\n" not in msg and "KMNIST" in msg and "train-images-idx3-ubyte" in msg and "download=True" in msg
    with pytest.raises(DataError, match="has no data set class 'NoSuchSet'"):
        load_images(DataConfig(dataset="torchvision:NoSuchSet", root=str(tmp_path)))


def test_symbols_render_jittered_classes(tmp_path):
    d = load_images(DataConfig(dataset="symbols", symbol_classes=3, root=str(tmp_path)))
    assert d.train_x.shape == (18000, 1, 32, 32) and d.test_x.shape == (3000, 1, 32, 32)
    assert torch.bincount(d.train_labels).tolist() == [6000] * 3 and len(d.classes) == 3
    assert 0 <= float(d.train_x.min()) and float(d.train_x.max()) <= 1
    a, b = d.train_x[d.train_labels == 0], d.train_x[d.train_labels == 1]
    assert not torch.equal(a[0], a[1])  # jittered copies of one symbol differ
    assert float((a.mean(0) - b.mean(0)).abs().mean()) > 0.02  # two symbols differ
    again = load_images(DataConfig(dataset="symbols", symbol_classes=3, root=str(tmp_path / "other")))
    assert torch.equal(again.test_x, d.test_x)  # deterministic


@pytest.mark.parametrize("what", ["no_folder", "no_classes", "empty_class", "broken_png", "test_only_class"])
def test_bad_folders_stop_with_one_line(tmp_path, what):
    root = tmp_path / "f"
    expect = {"no_folder": "no such folder", "no_classes": "no class sub-folders", "empty_class": "holds no",
              "broken_png": "cannot read image", "test_only_class": "that"}[what]
    if what != "no_folder":
        root.mkdir()
    if what == "empty_class":
        (root / "a").mkdir()
    if what == "broken_png":
        _png(root / "a" / "0.png", np.zeros((8, 8), np.uint8))
        (root / "a" / "1.png").write_bytes(b"not a png")
    if what == "test_only_class":
        _png(root / "train" / "a" / "0.png", np.zeros((8, 8), np.uint8))
        _png(root / "test" / "b" / "0.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError) as e:
        load_images(DataConfig(dataset=f"folder:{root}", root=str(tmp_path / "cache")))
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_a_gzip_only_torchvision_file_is_not_mistaken_for_data(tmp_path):
    """torchvision's MNIST family reads unpacked idx files: a folder of .gz files only is reported missing."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"x")
    with pytest.raises(DataError, match="missing"):
        load_images(DataConfig(dataset="torchvision:FashionMNIST", root=str(tmp_path)))
    assert os.listdir(tmp_path) == ["FashionMNIST"]  # no cache written for a failed read


def test_the_census_counts_near_blank_and_repeated_images(tmp_path):
    """A faulty renderer's near-blank images (a few specks) and exact copies are counted at load, with a warning
    once they are more than 1% of the images; clean digits-like images count as neither."""
    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        for i in range(50):
            a = np.zeros((16, 16), np.uint8)
            if i < 7:  # 14% nearly blank: two specks
                a[3, 4] = a[9, 9] = 255
            else:
                a[4:12, 4:12] = rng.integers(60, 256, (8, 8), dtype=np.uint8)
            _png(tmp_path / "f" / c / f"{i}.png", a)
    _png(tmp_path / "f" / "a" / "copy.png", np.asarray(Image.open(tmp_path / "f" / "a" / "20.png")))
    d = load_images(DataConfig(dataset=f"folder:{tmp_path / 'f'}", image_size=16, root=str(tmp_path / "cache")))
    assert d.census() == {"train": 87, "test": 14, "classes": 2, "near_blank": 14, "duplicates": 14}  # specks, a copy
    line = d.describe()
    assert "14 hold almost nothing, 14 repeat another exactly (warning: 14% of the images" in line
    clean = load_images(DataConfig(dataset="symbols", symbol_classes=2, image_size=32, root=str(tmp_path / "c2")))
    c = clean.census()
    assert c["near_blank"] == 0 and "warning" not in clean.describe()


def test_one_class_is_refused(tmp_path):
    for i in range(4):
        _png(tmp_path / "f" / "only" / f"{i}.png", np.full((8, 8), 40 * i, np.uint8))
    with pytest.raises(DataError, match="has one class \\('only'\\)"):
        load_images(DataConfig(dataset=f"folder:{tmp_path / 'f'}", root=str(tmp_path / "cache")))
