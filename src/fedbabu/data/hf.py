"""Labelled image datasets in the Hugging Face format (``dataset: hf``): from the Hub or saved with ``save_to_disk``.

This is how the datasets Flower Datasets serves (FEMNIST with its writers, CIFAR-100, Tiny-ImageNet)
reach the simulator without a reader of their own. The ``datasets`` library (the ``hf`` extra) is
imported only here and only when such a dataset is asked for, so the core install runs without it.

The images are decoded once into the uint8 NHWC arrays of :func:`~fedbabu.data.custom.from_arrays`, which
does the rest as for any user's arrays: labels to ``0..K-1``, the seeded held-out test samples of a
dataset with one split, the natural partition (one client per value of a column) and the channel
mean/std of the training images. Every other partition is drawn by :mod:`fedbabu.data.partition` from
the labels, exactly as for the built-in datasets.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedbabu.config import Config, HfConfig
from fedbabu.data.custom import FederatedData, from_arrays
from fedbabu.data.partition import Partition
from fedbabu.errors import DataError, UserError

GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")
"""Pillow modes read as one channel; every other mode is read as RGB."""

_last: tuple[tuple[Any, ...], FederatedData] | None = None
"""The last dataset converted, with what it was converted from: decoding every image is the slow part of
loading (FEMNIST has about 800,000), and a run asks for the data and then for the natural partition that
comes with them."""


def load_hf(config: Config) -> FederatedData:
    """The dataset of ``config.hf`` and, with ``partition: natural``, its natural partition.

    Raises :class:`~fedbabu.errors.UserError` (one line naming the ``hf`` key) for a missing ``hf``
    extra, a dataset or split that is not there, a column that is not there or not what it should be.
    """
    global _last
    hf = config.hf
    natural = config.partition == "natural"
    train, test = _splits(hf)
    image_column = _image_column(hf, train)
    _check_columns(hf, train, hf.split_train, image_column, natural)
    if test is not None:
        _check_columns(hf, test, str(hf.split_test), image_column, False)
    key = (hf.model_dump_json(), natural, _files(train), _files(test) if test is not None else None)
    if _last is None or _last[0] != key:
        _last = None  # the previous dataset's memory is given back before the next one is decoded
        _last = (key, _convert(hf, train, test, image_column, natural))
    return _last[1]


def natural_partition(config: Config) -> Partition:
    """The natural partition of ``config.hf`` (one client per value of ``hf.partition_column``).

    Its number of clients is the data's, not a setting: a config whose ``num_clients`` differs is
    refused with the number to set, so that the run's ``config.yaml`` says how many clients it had.
    """
    partition = load_hf(config).partition
    if partition.num_clients != config.num_clients:
        raise UserError(f"num_clients: partition: natural by hf.partition_column={config.hf.partition_column!r} "
                        f"gives {partition.num_clients} clients, not {config.num_clients}; set "
                        f"num_clients={partition.num_clients}")
    return partition


def _library() -> Any:
    try:
        import datasets
    except ImportError:
        raise UserError("dataset: hf needs the Hugging Face datasets library, the hf extra: "
                        "pip install 'fedbabu[hf]'") from None
    return datasets


def _looks_like_path(name: str) -> bool:
    """A name that can only be a folder (a Hub id is ``owner/name`` or ``name``), so it is never sent to the Hub."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or name.count("/") > 1


def _open(hf: HfConfig) -> Any:
    """The dataset's splits: a folder saved with ``save_to_disk``, else a Hub id (downloaded once, then cached)."""
    datasets = _library()
    name = str(hf.name)
    folder = Path(name).expanduser()
    if folder.exists():
        try:
            loaded = datasets.load_from_disk(str(folder))
        except (OSError, ValueError) as exc:
            raise DataError(f"hf.name: {folder} is not a dataset saved with save_to_disk ({exc})") from None
    elif _looks_like_path(name):
        raise DataError(f"hf.name: {folder} does not exist (expected the folder of a dataset saved with "
                        "save_to_disk, or a Hugging Face Hub id such as flwr/femnist)")
    else:
        try:
            loaded = datasets.load_dataset(name)
        except (OSError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise DataError(f"hf.name: cannot load {name!r} from the Hugging Face Hub ({reason}); check the id, "
                            "or save it with save_to_disk where there is internet and give its folder") from None
    if isinstance(loaded, datasets.Dataset):
        return {hf.split_train: loaded}
    return loaded


def _splits(hf: HfConfig) -> tuple[Any, Any | None]:
    splits = _open(hf)
    names = ", ".join(splits) or "none"
    if hf.split_train not in splits:
        raise DataError(f"hf.split_train: no split {hf.split_train!r} in {hf.name} (splits: {names})")
    if hf.split_test is not None and hf.split_test not in splits:
        raise DataError(f"hf.split_test: no split {hf.split_test!r} in {hf.name} (splits: {names}); name one, or "
                        "set hf.split_test=null to hold out hf.test_fraction of the samples for testing")
    if hf.split_test == hf.split_train:
        raise DataError(f"hf.split_test: {hf.split_test!r} is also hf.split_train; the clients would be tested on "
                        "their training samples (set hf.split_test=null to hold out a part of them)")
    return splits[hf.split_train], splits[hf.split_test] if hf.split_test is not None else None


def _columns(split: Any) -> str:
    return ", ".join(split.column_names)


def _image_column(hf: HfConfig, train: Any) -> str:
    """``hf.image_column``, or the one column of images when it is unset."""
    if hf.image_column is not None:
        return hf.image_column
    image = _library().Image
    found = [name for name, feature in train.features.items() if isinstance(feature, image)]
    if len(found) != 1:
        which = "no column" if not found else f"{len(found)} columns ({', '.join(found)})"
        raise DataError(f"hf.image_column: {hf.name} has {which} of images (columns: {_columns(train)}); name the "
                        "column of images")
    return found[0]


def _check_columns(hf: HfConfig, split: Any, split_name: str, image_column: str, needs_clients: bool) -> None:
    """Each named column exists in ``split`` and holds what its key says, before any image is decoded."""
    datasets = _library()
    where = f"{hf.name} split {split_name!r}"
    wanted = [("hf.image_column", image_column), ("hf.label_column", hf.label_column)]
    if needs_clients:
        wanted.append(("hf.partition_column", str(hf.partition_column)))
    for key, column in wanted:
        if column not in split.column_names:
            raise DataError(f"{key}: no column {column!r} in {where} (columns: {_columns(split)})")
    image = split.features[image_column]
    if not isinstance(image, datasets.Image):
        raise DataError(f"hf.image_column: column {image_column!r} of {where} holds {image}, not images")
    label = split.features[hf.label_column]
    integers_or_strings = isinstance(label, datasets.Value) and (
        label.dtype.startswith(("int", "uint")) or label.dtype in ("string", "large_string"))
    if not (isinstance(label, datasets.ClassLabel) or integers_or_strings):
        raise DataError(f"hf.label_column: column {hf.label_column!r} of {where} holds {label}, not class labels "
                        "(expected a ClassLabel, integers or strings)")


def _files(split: Any) -> tuple[tuple[str, int, int], ...]:
    """What a split was read from, to tell whether a folder saved again since is still the same data."""
    stats = []
    for entry in split.cache_files:
        status = os.stat(entry["filename"])
        stats.append((entry["filename"], status.st_mtime_ns, status.st_size))
    return tuple(stats)


def _convert(hf: HfConfig, train: Any, test: Any | None, image_column: str, natural: bool) -> FederatedData:
    """Decode the images and hand everything to :func:`from_arrays`, the path every user's arrays take."""
    x = _images(hf, train, hf.split_train, image_column)
    y, names = _labels(hf, train, hf.split_train)
    options: dict[str, Any] = {}
    if test is not None:
        test_x = _images(hf, test, str(hf.split_test), image_column)
        if test_x.shape[1:3] != x.shape[1:3]:
            raise DataError(f"hf.image_size: the images of {hf.split_test!r} are {test_x.shape[1]}x{test_x.shape[2]}, "
                            f"those of {hf.split_train!r} {x.shape[1]}x{x.shape[2]}; set hf.image_size to resize "
                            "both to one square size")
        x, test_x = _same_channels(x, test_x)
        test_y, _ = _labels(hf, test, str(hf.split_test))
        options.update(test_x=test_x, test_y=test_y)
    if natural:
        options["client_ids"] = np.asarray(train[hf.partition_column])
        if test is not None and hf.partition_column in test.column_names:
            options["test_client_ids"] = _test_clients(hf, options["client_ids"], test)
    if names is not None:
        options.update(num_classes=len(names), class_names=names)
    data = from_arrays(x, y, test_fraction=hf.test_fraction, channels_first=False, name=str(hf.name),
                       split_seed=hf.split_seed, **options)
    source = f"Hugging Face dataset {hf.name}, split {hf.split_train!r}" + (
        f", tested on {hf.split_test!r}" if hf.split_test is not None else
        f", {hf.test_fraction:g} held out for testing (split_seed {hf.split_seed})")
    return dataclasses.replace(data, dataset=dataclasses.replace(data.dataset, provenance=source))


def _labels(hf: HfConfig, split: Any, split_name: str) -> tuple[np.ndarray, list[str] | None]:
    """A split's labels, and the class names of a ``ClassLabel`` column; a sample without a label is refused."""
    feature = split.features[hf.label_column]
    labels = np.asarray(split[hf.label_column])
    names = list(feature.names) if isinstance(feature, _library().ClassLabel) else None
    if names is not None and len(labels) and labels.min() < 0:
        missing = int((labels < 0).sum())
        raise DataError(f"hf.label_column: {missing} samples of {hf.name} split {split_name!r} have no label "
                        f"(-1 in {hf.label_column!r}); every sample a client trains or is tested on needs one")
    return labels, names


def _test_clients(hf: HfConfig, clients: np.ndarray, test: Any) -> np.ndarray:
    """The test split's client ids, each of which must be a client of the training split."""
    ids = np.asarray(test[hf.partition_column])
    unknown = sorted(set(ids.tolist()) - set(clients.tolist()), key=str)
    if unknown:
        raise DataError(f"hf.partition_column: {len(unknown)} {hf.partition_column} values of {hf.name} split "
                        f"{hf.split_test!r} have no sample in {hf.split_train!r} (e.g. {unknown[0]!r}); every "
                        "client tested must train")
    return ids


def _images(hf: HfConfig, split: Any, split_name: str, column: str) -> np.ndarray:
    """A split's images as uint8 NHWC: one channel if every image is grayscale, else three."""
    from PIL import Image

    size = (hf.image_size, hf.image_size) if hf.image_size is not None else None
    arrays: list[np.ndarray] = []
    for batch in split.select_columns([column]).iter(batch_size=1024):
        for image in batch[column]:
            if not isinstance(image, Image.Image):
                raise DataError(f"hf.image_column: sample {len(arrays)} of {hf.name} split {split_name!r} has "
                                f"no image in {column!r} (got {type(image).__name__})")
            converted = image.convert("L" if image.mode in GRAYSCALE_MODES else "RGB")
            if size is not None and converted.size != size:
                converted = converted.resize(size, Image.Resampling.BILINEAR)
            arrays.append(np.asarray(converted, dtype=np.uint8).reshape(converted.height, converted.width, -1))
    if not arrays:
        raise DataError(f"hf.name: split {split_name!r} of {hf.name} is empty")
    shapes = {a.shape[:2] for a in arrays}
    if len(shapes) > 1:
        first, other = sorted(shapes)[:2]
        raise DataError(f"hf.image_size: the images of {hf.name} split {split_name!r} differ in size "
                        f"({first[0]}x{first[1]} and {other[0]}x{other[1]}); set hf.image_size to resize them to one "
                        "square size")
    if len({a.shape[2] for a in arrays}) > 1:
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    return np.stack(arrays)


def _same_channels(x: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grayscale images of one split made RGB when the other split has colour."""
    if x.shape[3] == test_x.shape[3]:
        return x, test_x
    return (np.repeat(x, 3, axis=3) if x.shape[3] == 1 else x,
            np.repeat(test_x, 3, axis=3) if test_x.shape[3] == 1 else test_x)

