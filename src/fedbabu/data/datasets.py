"""Readers for the datasets in their official on-disk formats, kept in memory as uint8 NHWC tensors.

Images stay uint8 until a batch is drawn: 50,000 CIFAR images take 150 MB instead of 600 MB, and
worker processes inherit them through fork without copying. Every reader checks sample and class
counts, so a truncated or foreign file is caught at load time rather than as a silent accuracy drop.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedbabu.errors import DataError


@dataclass(frozen=True)
class Dataset:
    """Train and test split of a labelled image dataset, with its normalization constants."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    provenance: str

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[3])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[1])


CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)

ARCHIVES = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
    ),
}
FMNIST_BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FMNIST_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "fmnist": "fashion-mnist"}
SYSTEM_LOCATIONS = {"fmnist": [Path("/usr/share/datasets")]}
"""Where distributions install datasets (Debian's ``dataset-fashion-mnist``), searched last."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedbabu"


def search_roots(data_dir: Path | None) -> list[Path]:
    """Where a dataset is looked for, in order: ``--data-dir``, ``$FEDBABU_DATA``, the user cache."""
    roots = []
    if data_dir is not None:
        roots.append(Path(data_dir))
    if os.environ.get("FEDBABU_DATA"):
        roots.append(Path(os.environ["FEDBABU_DATA"]))
    roots.append(default_cache_dir())
    return roots


def load_dataset(name: str, data_dir: Path | None = None, download: bool = False) -> Dataset:
    """Load a dataset by name, downloading (md5-verified) only when asked to."""
    if name == "digits":
        return load_digits()
    if name not in FOLDERS:
        raise DataError(f"dataset: unknown dataset {name!r}; expected one of digits, fmnist, cifar10, cifar100")
    roots = search_roots(data_dir)
    if data_dir is not None and not Path(data_dir).exists() and not download:
        raise DataError(f"data_dir: {data_dir} does not exist")
    found = _find(name, roots + SYSTEM_LOCATIONS.get(name, []))
    if found is None:
        found = _extract_local_archive(name, roots)
    if found is None:
        if not download:
            looked = ", ".join(str(r / FOLDERS[name]) for r in roots + SYSTEM_LOCATIONS.get(name, []))
            raise DataError(
                f"{name}: data not found (looked in {looked}); pass --download to fetch the official files, "
                f"or --data-dir DIR where DIR contains {FOLDERS[name]}/"
            )
        found = _download(name, roots[0])
    reader = {"cifar10": read_cifar10, "cifar100": read_cifar100, "fmnist": read_fmnist}[name]
    return reader(found)


def _find(name: str, roots: list[Path]) -> Path | None:
    for root in roots:
        candidate = root / FOLDERS[name]
        if candidate.is_dir():
            return candidate
        if name == "fmnist" and (root / "train-images-idx3-ubyte.gz").exists():
            return root
    return None


def _extract_local_archive(name: str, roots: list[Path]) -> Path | None:
    """Use an official archive that the user put in a data folder by hand, once its md5 checks out."""
    if name not in ARCHIVES:
        return None
    url, md5 = ARCHIVES[name]
    for root in roots:
        archive = root / url.rsplit("/", 1)[1]
        if archive.is_file():
            actual = md5sum(archive)
            if actual != md5:
                raise DataError(f"{archive}: md5 mismatch (expected {md5} for the official {name} archive, got "
                                f"{actual}); the file is truncated or not the official one: fetch it again")
            try:
                with tarfile.open(archive, "r:gz") as tar:
                    tar.extractall(root, filter="data")
            except (OSError, tarfile.TarError) as exc:
                raise DataError(f"{archive}: cannot extract into {root} ({exc})") from None
            return root / FOLDERS[name]
    return None


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits, split 80/20 per class with a fixed seed.

    The split is fixed (not the run's seed) so that every run and every test sees the same
    train/test images; only the federation on top of it varies with the seed.
    """
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(0)
    train_idx, test_idx = [], []
    for cls in range(10):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cut = round(0.8 * len(members))
        train_idx.extend(members[:cut])
        test_idx.extend(members[cut:])
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    train_x = images[train_idx]
    scaled = train_x.astype(np.float64) / 255.0
    return Dataset(
        name="digits",
        train_x=torch.from_numpy(np.ascontiguousarray(train_x)),
        train_y=torch.from_numpy(labels[train_idx]),
        test_x=torch.from_numpy(np.ascontiguousarray(images[test_idx])),
        test_y=torch.from_numpy(labels[test_idx]),
        num_classes=10,
        mean=(float(scaled.mean()),),
        std=(float(scaled.std()),),
        provenance="scikit-learn load_digits (UCI optical recognition of handwritten digits), 8x8, fixed 80/20 split",
    )


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches contain (dicts, lists, bytes and numpy arrays).

    A pickle can name any callable; refusing every other global means a foreign or malicious
    file in the data folder is reported, never executed.
    """

    ALLOWED: frozenset[tuple[str, str]] = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("builtins", "bytearray"), ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which CIFAR files never do")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            content = _CifarUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: file missing from the dataset folder") from None
    except Exception as exc:
        raise DataError(f"{path}: not a readable CIFAR pickle ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(content, dict):
        raise DataError(f"{path}: not a CIFAR batch (expected a dict, got {type(content).__name__})")
    return content


def _cifar_arrays(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    content = _unpickle(path)
    if b"data" not in content or label_key not in content:
        raise DataError(f"{path}: not a CIFAR batch (missing b'data' or {label_key!r})")
    data = np.asarray(content[b"data"], dtype=np.uint8)
    labels = np.asarray(content[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
        raise DataError(f"{path}: expected N x 3072 uint8 images with N labels, got {data.shape}/{labels.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _check_counts(name: str, path: Path, labels: np.ndarray, expected_total: int, classes: int) -> None:
    if len(labels) != expected_total:
        raise DataError(f"{path}: {name} should hold {expected_total} samples, found {len(labels)}")
    counts = np.bincount(labels, minlength=classes)
    if len(counts) != classes or counts.min() != counts.max():
        raise DataError(
            f"{path}: {name} should hold {expected_total // classes} samples of each of {classes} classes, "
            f"found counts from {counts.min()} to {counts.max()} over {len(counts)} labels"
        )


def _cifar(folder: Path, name: str, train_files: list[str], test_file: str, label_key: bytes,
           classes: int, mean: tuple, std: tuple, train_total: int = 50000, test_total: int = 10000) -> Dataset:
    parts = [_cifar_arrays(folder / f, label_key) for f in train_files]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _cifar_arrays(folder / test_file, label_key)
    _check_counts(f"{name} train", folder, train_y, train_total, classes)
    _check_counts(f"{name} test", folder / test_file, test_y, test_total, classes)
    return Dataset(
        name=name,
        train_x=torch.from_numpy(np.ascontiguousarray(train_x)),
        train_y=torch.from_numpy(train_y),
        test_x=torch.from_numpy(np.ascontiguousarray(test_x)),
        test_y=torch.from_numpy(test_y),
        num_classes=classes,
        mean=mean,
        std=std,
        provenance=f"official python-format files in {folder}",
    )


def read_cifar10(folder: Path, train_total: int = 50000, test_total: int = 10000) -> Dataset:
    """Read ``cifar-10-batches-py`` (five training batches and ``test_batch``)."""
    return _cifar(folder, "cifar10", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels",
                  10, CIFAR10_MEAN, CIFAR10_STD, train_total, test_total)


def read_cifar100(folder: Path, train_total: int = 50000, test_total: int = 10000) -> Dataset:
    """Read ``cifar-100-python`` (``train`` and ``test``, fine labels)."""
    return _cifar(folder, "cifar100", ["train"], "test", b"fine_labels",
                  100, CIFAR100_MEAN, CIFAR100_STD, train_total, test_total)


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST family's format): magic, dimensions, then raw uint8."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file missing from the dataset folder") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_dims:
        raise DataError(f"{path}: not an IDX file of {expected_dims}-dimensional uint8 data")
    header = 4 + 4 * expected_dims
    dims = struct.unpack(f">{expected_dims}I", raw[4:header])
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise DataError(f"{path}: truncated IDX file (header says {size} bytes, found {len(raw) - header})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_fmnist(folder: Path) -> Dataset:
    """Read Fashion-MNIST from its four IDX ``.gz`` files."""
    train_x = _read_idx(folder / "train-images-idx3-ubyte.gz", 3)
    train_y = _read_idx(folder / "train-labels-idx1-ubyte.gz", 1).astype(np.int64)
    test_x = _read_idx(folder / "t10k-images-idx3-ubyte.gz", 3)
    test_y = _read_idx(folder / "t10k-labels-idx1-ubyte.gz", 1).astype(np.int64)
    if train_x.shape[0] != len(train_y) or test_x.shape[0] != len(test_y):
        raise DataError(f"{folder}: Fashion-MNIST image and label counts differ")
    _check_counts("fmnist train", folder, train_y, 60000, 10)
    _check_counts("fmnist test", folder, test_y, 10000, 10)
    return Dataset(
        name="fmnist",
        train_x=torch.from_numpy(np.ascontiguousarray(train_x[..., None])),
        train_y=torch.from_numpy(train_y),
        test_x=torch.from_numpy(np.ascontiguousarray(test_x[..., None])),
        test_y=torch.from_numpy(test_y),
        num_classes=10,
        mean=FMNIST_MEAN,
        std=FMNIST_STD,
        provenance=f"Fashion-MNIST IDX files in {folder}",
    )


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_verified(url: str, md5: str, destination: Path) -> Path:
    """Download ``url`` to ``destination`` only if its md5 matches; a partial file never stays behind."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=".download-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out)
        actual = md5sum(tmp)
        if actual != md5:
            raise DataError(f"{url}: md5 mismatch (expected {md5}, got {actual}); the download is corrupt")
        os.replace(tmp, destination)
    except OSError as exc:
        raise DataError(f"{url}: download failed ({exc}); fetch it by hand and pass --data-dir") from None
    finally:
        tmp.unlink(missing_ok=True)
    return destination


def _download(name: str, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if name == "fmnist":
        folder = root / FOLDERS[name]
        for filename, md5 in FMNIST_FILES.items():
            fetch_verified(FMNIST_BASE_URL + filename, md5, folder / filename)
        return folder
    url, md5 = ARCHIVES[name]
    archive = fetch_verified(url, md5, root / url.rsplit("/", 1)[1])
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(root, filter="data")
    archive.unlink()
    return root / FOLDERS[name]
