"""data=fashion_mnist: found in data.root (torchvision's layout) or in the Debian package's folder (flat, gzipped),
verified, else downloaded; on small generated IDX files standing in for the real ones (no package, no network)."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from normsweep import data

NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file, written independently of the module under test."""
    return struct.pack(f">BBBB{array.ndim}I", 0, 0, 0x08, array.ndim, *array.shape) + array.astype(">u1").tobytes()


def tiny_set(seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 10, 6), rng.integers(0, 256, (4, 28, 28)),
            rng.integers(0, 10, 4))


def write_set(folder: Path, arrays: tuple[np.ndarray, ...], gz: bool) -> dict[str, str]:
    """The four files in `folder` (as name.gz when gz, as Debian ships them); returns their uncompressed MD5s."""
    folder.mkdir(parents=True, exist_ok=True)
    md5 = {}
    for name, array in zip(NAMES, arrays):
        content = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (folder / name).write_bytes(content)
        md5[name] = hashlib.md5(content).hexdigest()
    return md5


def no_download(root: Path, raw_dir: Path) -> None:
    raise RuntimeError("no network in tests")


@pytest.fixture
def system_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for /usr/share/datasets/fashion-mnist holding tiny_set(0), whose MD5s become the official ones."""
    folder = tmp_path / "usr-share-datasets-fashion-mnist"
    md5 = write_set(folder, tiny_set(0), gz=True)
    monkeypatch.setattr(data, "_FASHION_MNIST", dataclasses.replace(data._FASHION_MNIST, md5=md5, system_dir=folder))
    monkeypatch.setattr(data, "_fetch_torchvision", no_download)
    return folder


def assert_is(dataset: data.Dataset, arrays: tuple[np.ndarray, ...]) -> None:
    for tensor, array in zip((dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels),
                             arrays):
        np.testing.assert_array_equal(tensor.numpy(), array)
    assert dataset.train_images.dtype == torch.uint8 and dataset.train_labels.dtype == torch.int64


def test_reads_the_system_package_in_place(tmp_path, system_dir, caplog):
    root = tmp_path / "data"
    with caplog.at_level(logging.INFO, logger="normsweep.data"):
        dataset = data.load_data("fashion_mnist", root)
    assert_is(dataset, tiny_set(0))
    assert dataset.class_names == CLASS_NAMES
    assert (dataset.mean, dataset.std) == (0.2860, 0.3530)
    assert f"dataset-fashion-mnist files in {system_dir}" in caplog.text
    assert not root.exists()  # nothing copied or downloaded


def test_files_in_data_root_come_first(tmp_path, system_dir, monkeypatch):
    root = tmp_path / "data"
    mine = tiny_set(1)
    md5 = write_set(root / "FashionMNIST" / "raw", mine, gz=False)  # torchvision's layout, extracted
    monkeypatch.setattr(data, "_FASHION_MNIST", dataclasses.replace(data._FASHION_MNIST, md5=md5))
    assert_is(data.load_data("fashion_mnist", root, train_limit=5, test_limit=3),
              (mine[0][:5], mine[1][:5], mine[2][:3], mine[3][:3]))


def test_corrupt_copy_in_data_root_stops_the_run(tmp_path, system_dir):
    raw_dir = tmp_path / "data" / "FashionMNIST" / "raw"
    write_set(raw_dir, tiny_set(1), gz=True)  # parses, but not the official files
    with pytest.raises(data.DataError, match="MD5") as error:  # never silently replaced by the package's copy
        data.load_data("fashion_mnist", tmp_path / "data")
    assert str(raw_dir / f"{NAMES[0]}.gz") in str(error.value)


def test_corrupt_system_files_fall_back_to_a_download(tmp_path, system_dir, monkeypatch, caplog):
    (system_dir / f"{NAMES[1]}.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(6))))  # wrong labels
    downloads = []

    def download(root: Path, raw_dir: Path) -> None:
        downloads.append(raw_dir)
        write_set(raw_dir, tiny_set(0), gz=False)

    monkeypatch.setattr(data, "_fetch_torchvision", download)
    with caplog.at_level(logging.INFO, logger="normsweep.data"):
        dataset = data.load_data("fashion_mnist", tmp_path / "data")
    assert downloads == [tmp_path / "data" / "FashionMNIST" / "raw"]
    assert_is(dataset, tiny_set(0))
    assert "dataset-fashion-mnist files unusable" in caplog.text and NAMES[1] in caplog.text
    assert "via torchvision download" in caplog.text


def test_nowhere_names_every_way_to_get_it(tmp_path, system_dir):
    for path in system_dir.iterdir():
        path.unlink()
    with pytest.raises(data.DataError) as error:
        data.load_data("fashion_mnist", tmp_path / "data")
    message = str(error.value)
    assert "\n" not in message and "no network in tests" in message
    assert f"into {tmp_path / 'data' / 'FashionMNIST' / 'raw'}" in message
    assert f"install dataset-fashion-mnist (it puts them in {system_dir})" in message
    assert all(name in message for name in NAMES)


def test_download_asks_torchvision_for_fashion_mnist(tmp_path, monkeypatch):
    calls = []

    class FakeFashionMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            write_set(Path(root) / "FashionMNIST" / "raw", tiny_set(2), gz=False)

    md5 = {name: hashlib.md5(idx_bytes(a)).hexdigest() for name, a in zip(NAMES, tiny_set(2))}
    # the loader imports torchvision when it downloads: it gets this stand-in (the real one is slow to import)
    torchvision = SimpleNamespace(datasets=SimpleNamespace(FashionMNIST=FakeFashionMNIST))
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setattr(data, "_FASHION_MNIST",
                        dataclasses.replace(data._FASHION_MNIST, md5=md5, system_dir=tmp_path / "no-package"))
    assert_is(data.load_data("fashion_mnist", tmp_path / "data"), tiny_set(2))
    assert calls == [(str(tmp_path / "data"), False, True)]

