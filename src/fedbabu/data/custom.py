"""Users' own labelled data: arrays, tensors, ``torch.utils.data.Dataset`` objects and image folders.

Everything becomes the in-memory :class:`~fedbabu.data.datasets.Dataset` the simulator already uses
(images as uint8 NHWC, so worker processes share them for free), optionally with a *natural*
partition: a per-sample client id, as in FEMNIST's writers, instead of one drawn by our
partitioners. Every mistake raises a :class:`~fedbabu.errors.UserError` (a ``ValueError``) naming
the argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedbabu.data.datasets import Dataset
from fedbabu.data.partition import Partition, _test_like_train
from fedbabu.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class FederatedData:
    """A user's data, ready for :func:`fedbabu.run`: the dataset and, if it has one, its natural partition.

    ``partition`` is ``None`` when the config's partitioner (shards, Dirichlet, IID) should divide the
    data among clients. ``client_names`` maps client index -> the id given in ``client_ids``, and
    ``class_names`` label -> name, when known.
    """

    dataset: Dataset
    partition: Partition | None = None
    client_names: list[Any] | None = None
    class_names: list[str] | None = None

    @property
    def is_images(self) -> bool:
        """True for images (uint8 NHWC), False for float feature vectors."""
        return self.dataset.train_x.dtype == torch.uint8

    @property
    def num_clients(self) -> int | None:
        """The number of clients of the natural partition, or ``None`` if the config decides."""
        return self.partition.num_clients if self.partition is not None else None


def _numpy(value: Any, argument: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{argument}: cannot be read as an array ({exc})") from None


def _inputs(value: Any, argument: str, channels_first: bool | None) -> np.ndarray:
    """Images -> uint8 NHWC; 2-D arrays -> float32 feature rows."""
    x = _numpy(value, argument)
    if x.ndim == 0 or len(x) == 0:
        raise UserError(f"{argument}: expected a non-empty array of samples, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise UserError(f"{argument}: expected numbers, got dtype {x.dtype}")
    if x.ndim == 2:
        return np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    elif x.ndim == 4:
        if channels_first is None:
            if x.shape[-1] in (1, 3, 4):
                channels_first = False
            elif x.shape[1] in (1, 3, 4):
                channels_first = True
            else:
                raise UserError(f"{argument}: cannot tell the channel axis of shape {x.shape}; pass "
                                "channels_first=True (N, C, H, W) or False (N, H, W, C)")
        if channels_first:
            x = x.transpose(0, 2, 3, 1)
    else:
        raise UserError(f"{argument}: expected images (N, H, W[, C]) or features (N, D), got {x.ndim} dimensions")
    return np.ascontiguousarray(_to_uint8(x, argument))


def _to_uint8(x: np.ndarray, argument: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    low, high = float(x.min()), float(x.max())
    if np.issubdtype(x.dtype, np.floating):
        if low < 0 or high > 1:
            raise UserError(f"{argument}: float images must be in [0, 1] (found values from {low:g} to {high:g}); "
                            "pass uint8 images, or 2-D float arrays for feature vectors")
        return np.round(x * 255.0).astype(np.uint8)
    if low < 0 or high > 255:
        raise UserError(f"{argument}: integer images must be in 0..255 (found {low:g} to {high:g})")
    return x.astype(np.uint8)


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 images on the [0, 1] scale, in chunks (no float copy of the data)."""
    if x.dtype != np.uint8:
        return (0.0,), (1.0,)
    total = np.zeros(x.shape[-1])
    squares = np.zeros(x.shape[-1])
    for start in range(0, len(x), 4096):
        chunk = x[start:start + 4096].reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
        total += chunk.sum(axis=0)
        squares += (chunk * chunk).sum(axis=0)
    count = x.size // x.shape[-1]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    std[std < 1e-6] = 1.0
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _labels(train_y: Any, test_y: Any | None, num_classes: int | None,
            class_names: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray | None, int, list[str] | None]:
    """Integer labels 0..K-1; other labels (strings) are numbered in sorted order and become class names."""
    y = _numpy(train_y, "y")
    t = _numpy(test_y, "test_y") if test_y is not None else None
    for array, argument in ((y, "y"), (t, "test_y")):
        if array is not None and array.ndim != 1:
            raise UserError(f"{argument}: expected one label per sample (a 1-D array), got shape {array.shape}")
    names = list(class_names) if class_names is not None else None
    if not np.issubdtype(y.dtype, np.integer):
        if num_classes is not None or names is not None:
            raise UserError("y: labels that are not integers name their own classes; leave num_classes and "
                            "class_names out")
        names = sorted({str(v) for v in y.tolist()})
        index = {name: i for i, name in enumerate(names)}
        y = np.array([index[str(v)] for v in y.tolist()], dtype=np.int64)
        if t is not None:
            unknown = sorted({str(v) for v in t.tolist()} - set(index))
            if unknown:
                raise UserError(f"test_y: classes {unknown[:5]} do not occur in y")
            t = np.array([index[str(v)] for v in t.tolist()], dtype=np.int64)
    elif t is not None and not np.issubdtype(t.dtype, np.integer):
        raise UserError(f"test_y: expected integer labels like y, got dtype {t.dtype}")
    y = y.astype(np.int64)
    t = t.astype(np.int64) if t is not None else None
    highest = max(int(y.max()), int(t.max()) if t is not None and len(t) else 0)
    lowest = min(int(y.min()), int(t.min()) if t is not None and len(t) else 0)
    if lowest < 0:
        raise UserError(f"y: labels must be >= 0, found {lowest}")
    if num_classes is None:
        num_classes = len(names) if names is not None else highest + 1
    if num_classes < 2:
        raise UserError(f"num_classes: a classifier needs at least 2 classes, got {num_classes}")
    if highest >= num_classes:
        raise UserError(f"num_classes: labels go up to {highest}, so num_classes must be at least {highest + 1}")
    if names is not None and len(names) != num_classes:
        raise UserError(f"class_names: expected {num_classes} names, got {len(names)}")
    return y, t, num_classes, names


def _stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of every class (at least one sample of classes with two or more)."""
    train, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cut = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        test.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _client_index(ids: Any, argument: str, expected: int) -> tuple[np.ndarray, list[Any]]:
    array = _numpy(ids, argument)
    if array.ndim != 1 or len(array) != expected:
        raise UserError(f"{argument}: expected one client id per sample ({expected}), got shape {array.shape}")
    names, inverse = np.unique(array, return_inverse=True)
    return inverse.astype(np.int64), names.tolist()


def from_arrays(
    x: Any,
    y: Any,
    *,
    test_x: Any | None = None,
    test_y: Any | None = None,
    client_ids: Any | None = None,
    test_client_ids: Any | None = None,
    test_fraction: float = 0.2,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    channels_first: bool | None = None,
    name: str = "custom",
    split_seed: int = 0,
) -> FederatedData:
    """Labelled arrays or tensors -> :class:`FederatedData` for :func:`fedbabu.run`.

    ``x`` holds images, ``(N, H, W)`` or ``(N, H, W, C)`` / ``(N, C, H, W)`` (the channel axis is guessed
    from a size of 1, 3 or 4, or set by ``channels_first``), as uint8 or floats in [0, 1]; or feature
    vectors ``(N, D)``, given to the model as float32 unchanged (scale them yourself). ``y`` holds the
    labels: integers ``0..num_classes-1``, or any values (e.g. strings), numbered in sorted order.

    Test data: ``test_x``/``test_y`` if given; otherwise ``test_fraction`` of each class (or, with
    ``client_ids``, of each client's samples) is held out with the fixed ``split_seed``, so every run
    tests on the same samples.

    ``client_ids`` (one per training sample, any values) gives the *natural* partition: each distinct
    id is a client that keeps exactly its own samples, and the config's ``num_clients`` and
    ``partition`` are replaced by it. ``test_client_ids`` assigns the given test samples to clients;
    without it they are divided among the clients in proportion to their training labels.

    ``num_classes`` defaults to the highest label + 1; ``class_names`` names integer labels (e.g.
    :attr:`ImageFolder.class_names`); ``name`` labels the dataset in summaries.
    """
    if not 0 < test_fraction < 1:
        raise UserError(f"test_fraction: expected a fraction strictly between 0 and 1, got {test_fraction!r}")
    if (test_x is None) != (test_y is None):
        raise UserError("test_y: give test_x and test_y together (or neither, to hold out test_fraction)")
    if test_client_ids is not None and (client_ids is None or test_x is None):
        raise UserError("test_client_ids: needs client_ids for the training samples and test_x/test_y")
    inputs = _inputs(x, "x", channels_first)
    labels, test_labels, num_classes, names = _labels(y, test_y, num_classes, class_names)
    if len(labels) != len(inputs):
        raise UserError(f"y: expected one label per sample of x ({len(inputs)}), got {len(labels)}")
    if test_x is not None:
        test_inputs = _inputs(test_x, "test_x", channels_first)
        if len(test_labels) != len(test_inputs):
            raise UserError(f"test_y: expected one label per sample of test_x ({len(test_inputs)}), "
                            f"got {len(test_labels)}")
        if test_inputs.shape[1:] != inputs.shape[1:] or test_inputs.dtype != inputs.dtype:
            raise UserError(f"test_x: samples of shape {test_inputs.shape[1:]} differ from x's {inputs.shape[1:]}")
    rng = np.random.default_rng(np.random.SeedSequence([split_seed, 0x0C57]))
    partition, client_names = None, None
    if client_ids is None:
        if test_x is None:
            train_idx, test_idx = _stratified_split(labels, test_fraction, rng)
            inputs, test_inputs = inputs[train_idx], inputs[test_idx]
            labels, test_labels = labels[train_idx], labels[test_idx]
    else:
        clients, client_names = _client_index(client_ids, "client_ids", len(labels))
        if test_x is None:
            inputs, labels, test_inputs, test_labels, clients, test_clients = _split_per_client(
                inputs, labels, clients, test_fraction, rng)
        elif test_client_ids is not None:
            test_clients = _test_clients(test_client_ids, client_names, len(test_labels))
        else:
            test_clients = None
        partition = _natural_partition(labels, test_labels, clients, test_clients, len(client_names), num_classes,
                                       rng)
    mean, std = _channel_stats(inputs)
    dataset = Dataset(
        name=name,
        train_x=torch.from_numpy(np.ascontiguousarray(inputs)),
        train_y=torch.from_numpy(labels),
        test_x=torch.from_numpy(np.ascontiguousarray(test_inputs)),
        test_y=torch.from_numpy(test_labels),
        num_classes=num_classes,
        mean=mean,
        std=std,
        provenance=f"{name}: arrays given to fedbabu.from_arrays",
    )
    return FederatedData(dataset, partition, client_names, names)


def _split_per_client(inputs: np.ndarray, labels: np.ndarray, clients: np.ndarray, fraction: float,
                      rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Hold out ``fraction`` of every client's own samples as that client's test set."""
    train, test = [], []
    for client in range(int(clients.max()) + 1):
        members = rng.permutation(np.flatnonzero(clients == client))
        cut = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        test.append(members[:cut])
        train.append(members[cut:])
    train_idx, test_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    return (inputs[train_idx], labels[train_idx], inputs[test_idx], labels[test_idx], clients[train_idx],
            clients[test_idx])


def _test_clients(test_client_ids: Any, client_names: list[Any], expected: int) -> np.ndarray:
    array = _numpy(test_client_ids, "test_client_ids")
    if array.ndim != 1 or len(array) != expected:
        raise UserError(f"test_client_ids: expected one client id per test sample ({expected}), got shape "
                        f"{array.shape}")
    index = {name: i for i, name in enumerate(client_names)}
    unknown = sorted({v for v in array.tolist() if v not in index}, key=str)
    if unknown:
        raise UserError(f"test_client_ids: clients {unknown[:5]} have no training samples in client_ids")
    return np.array([index[v] for v in array.tolist()], dtype=np.int64)


def _natural_partition(labels: np.ndarray, test_labels: np.ndarray, clients: np.ndarray,
                       test_clients: np.ndarray | None, num_clients: int, num_classes: int,
                       rng: np.random.Generator) -> Partition:
    train = [np.flatnonzero(clients == c) for c in range(num_clients)]
    train_counts = np.stack([np.bincount(labels[t], minlength=num_classes) for t in train])
    if test_clients is None:
        test = _test_like_train(train_counts, np.bincount(labels, minlength=num_classes), test_labels, num_classes,
                                rng)
    else:
        test = [np.flatnonzero(test_clients == c) for c in range(num_clients)]
    test_counts = np.stack([np.bincount(test_labels[t], minlength=num_classes) for t in test])
    return Partition("natural", train, test, train_counts, test_counts)


def from_torch(train: Any, test: Any | None = None, **options: Any) -> FederatedData:
    """A ``torch.utils.data.Dataset`` of ``(input, label)`` pairs (and optionally a test one) -> :class:`FederatedData`.

    Inputs may be tensors (e.g. from ``ToTensor()``: float CHW in [0, 1]), PIL images or arrays; they are
    read once into memory. ``options`` are those of :func:`from_arrays` (``client_ids``,
    ``test_fraction``, ``channels_first``, ...).
    """
    x, y = _materialize(train, "train")
    if test is not None:
        options["test_x"], options["test_y"] = _materialize(test, "test")
    return from_arrays(x, y, **options)


def _materialize(dataset: Any, argument: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        size = len(dataset)
        items = [dataset[i] for i in range(size)]
    except TypeError:
        raise UserError(f"{argument}: expected a map-style torch Dataset (with __len__ and __getitem__), got "
                        f"{type(dataset).__name__}") from None
    if not items:
        raise UserError(f"{argument}: the dataset is empty")
    if not (isinstance(items[0], (tuple, list)) and len(items[0]) == 2):
        raise UserError(f"{argument}: expected (input, label) pairs, got {type(items[0]).__name__}")
    inputs = [np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x) for x, _ in items]
    labels = [int(y) if isinstance(y, torch.Tensor) else y for _, y in items]
    shapes = {a.shape for a in inputs}
    if len(shapes) != 1:
        raise UserError(f"{argument}: inputs differ in shape ({sorted(shapes)[:3]}); resize them to one shape")
    return np.stack(inputs), np.asarray(labels)


@dataclass(frozen=True)
class ImageFolder:
    """Images read by :func:`read_image_folder`: uint8 NHWC images, labels, class names and file paths.

    Pass ``images`` and ``labels`` to :func:`from_arrays`; ``paths`` let you derive client ids
    (e.g. a writer id in the file name) for a natural partition.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    paths: list[Path]


def read_image_folder(root: str | Path, *, size: tuple[int, int] | None = None, mode: str | None = None,
                      classes: Sequence[str] | None = None) -> ImageFolder:
    """Read ``root/<class name>/*.png`` (or .jpg, .bmp, ...) with Pillow; classes are numbered in sorted order.

    All images must share one size unless ``size=(height, width)`` resizes them. ``mode`` is ``"L"``
    (grayscale) or ``"RGB"``; by default grayscale if every image is, RGB otherwise. ``classes`` fixes
    the class list and order, e.g. to read a test folder with the training folder's classes.
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(root)
    if not folder.is_dir():
        raise UserError(f"root: {folder} is not a folder (expected root/<class name>/<image files>)")
    if mode not in (None, "L", "RGB"):
        raise UserError(f"mode: expected 'L', 'RGB' or None, got {mode!r}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise UserError(f"size: expected (height, width) in pixels, got {size!r}")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = list(classes) if classes is not None else found
    if not names:
        raise UserError(f"root: {folder} has no class folders (expected root/<class name>/<image files>)")
    missing = [n for n in names if not (folder / n).is_dir()]
    if missing:
        raise UserError(f"classes: {folder} has no folder for {missing[:5]}")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"root: class folder {folder / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        paths.extend(files)
        labels.extend([label] * len(files))
    headers = []
    for path in paths:
        try:
            with Image.open(path) as image:
                headers.append((image.mode, image.size))
        except (OSError, UnidentifiedImageError) as exc:
            raise UserError(f"root: cannot read image {path} ({exc.__class__.__name__})") from None
    if mode is None:
        mode = "L" if all(m in ("1", "L", "LA", "I", "I;16") for m, _ in headers) else "RGB"
    if size is None:
        sizes = {s for _, s in headers}
        if len(sizes) > 1:
            first = next(p for p, (_, s) in zip(paths, headers, strict=True) if s != headers[0][1])
            raise UserError(f"root: images differ in size ({paths[0].name} is {headers[0][1][1]}x{headers[0][1][0]}, "
                            f"{first} is not); pass size=(height, width) to resize them")
    images = np.stack([_load(path, mode, size) for path in paths])
    if images.ndim == 3:
        images = images[..., None]
    return ImageFolder(images, np.asarray(labels, dtype=np.int64), names, paths)


def _load(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        converted = image.convert(mode)
        if size is not None and converted.size != (size[1], size[0]):
            converted = converted.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return np.asarray(converted, dtype=np.uint8)
