"""``dataset: hf``: Hugging Face datasets saved with ``save_to_disk``, partitioned by us or by a column.

Every dataset here is built in a temporary folder and named by its path, so nothing is downloaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets", reason="the hf extra (pip install 'fedbabu[hf]') is not installed")

import fedbabu  # noqa: E402
from fedbabu.cli import main  # noqa: E402
from fedbabu.config import load_config  # noqa: E402
from fedbabu.data.hf import load_hf  # noqa: E402
from fedbabu.data.partition import make_partition  # noqa: E402
from fedbabu.runner import partition_for, prepare_data  # noqa: E402

CLASSES = ["circle", "cross", "line", "square"]
WRITERS = 10
SAMPLES = 200


def _arrays(count: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8x8 grayscale images whose first pixel tells the writer and whose brightness tells the class."""
    rng = np.random.default_rng(7 + offset)
    labels = np.arange(count) % len(CLASSES)
    writers = (np.arange(count) // len(CLASSES)) % WRITERS
    images = rng.integers(0, 40, size=(count, 8, 8), dtype=np.uint8) + (50 * labels)[:, None, None].astype(np.uint8)
    images[:, 0, 0] = 10 * writers
    return images, labels, writers


def _split(images: np.ndarray, labels: np.ndarray, writers: np.ndarray, with_labels: bool = True) -> object:
    from PIL import Image

    columns = {"image": [Image.fromarray(image, mode="L") for image in images],
               "writer_id": [f"w{w:02d}" for w in writers]}
    features = {"image": datasets.Image(), "writer_id": datasets.Value("string")}
    if with_labels:
        columns["label"] = labels.tolist()
        features["label"] = datasets.ClassLabel(names=CLASSES)
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Three datasets on disk: one split, train + test splits, and one split without a label column."""
    root = tmp_path_factory.mktemp("hf")
    images, labels, writers = _arrays(SAMPLES)
    datasets.DatasetDict({"train": _split(images, labels, writers)}).save_to_disk(root / "one-split")
    test = _arrays(40, offset=1)
    datasets.DatasetDict({"train": _split(images, labels, writers), "test": _split(*test)}).save_to_disk(
        root / "two-splits")
    datasets.DatasetDict({"train": _split(images, labels, writers, with_labels=False)}).save_to_disk(
        root / "unlabelled")
    return {"root": root, **{name: root / name for name in ("one-split", "two-splits", "unlabelled")}}


def _config(path: Path, **extra):
    values = {"dataset": "hf", "model": "digitcnn", "num_clients": 4, "partition": "shards", "shards_per_client": 2,
              "rounds": 2, "eval_every": 1, "client_fraction": 0.5, "batch_size": 10, "lr": 0.05, "workers": 1,
              "finetune": {"epochs": 1, "batch_size": 10}}
    hf = {"name": str(path), **extra.pop("hf", {})}
    return load_config(extra={**values, **extra, "hf": hf})


def test_images_become_our_uint8_nhwc_tensors(saved):
    images, labels, _ = _arrays(SAMPLES)
    test_images, test_labels, _ = _arrays(40, offset=1)
    dataset = load_hf(_config(saved["two-splits"])).dataset
    assert dataset.train_x.dtype == torch.uint8 and dataset.train_x.shape == (SAMPLES, 8, 8, 1)
    np.testing.assert_array_equal(dataset.train_x.numpy()[..., 0], images)
    np.testing.assert_array_equal(dataset.train_y.numpy(), labels)
    np.testing.assert_array_equal(dataset.test_x.numpy()[..., 0], test_images)
    np.testing.assert_array_equal(dataset.test_y.numpy(), test_labels)
    assert dataset.num_classes == len(CLASSES) and (dataset.channels, dataset.image_size) == (1, 8)
    scaled = images.astype(np.float64) / 255
    assert dataset.mean == pytest.approx((scaled.mean(),)) and dataset.std == pytest.approx((scaled.std(),))


def test_our_seeded_partition_is_the_same_as_for_the_same_arrays(saved):
    """The HF data partitioned by shards equals the same arrays through the normal path (make_partition)."""
    images, labels, _ = _arrays(SAMPLES)
    _, test_labels, _ = _arrays(40, offset=1)
    for partition, seed in (("shards", 0), ("dirichlet", 3), ("iid", 1)):
        config = _config(saved["two-splits"], partition=partition, seed=seed)
        ours = partition_for(config, prepare_data(config))
        expected = make_partition(partition, labels, test_labels, num_clients=4, num_classes=len(CLASSES), seed=seed,
                                  shards_per_client=2, alpha=config.dirichlet_alpha)
        assert ours.to_json() == expected.to_json()
    custom = fedbabu.from_arrays(images, labels, test_x=_arrays(40, offset=1)[0], test_y=test_labels)
    assert partition_for(config, custom.dataset).to_json() == ours.to_json()


def test_a_two_round_run_with_shards_through_the_cli(saved, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--set", "dataset=hf", "--set", f"hf.name={saved['one-split']}", "--set", "hf.split_test=null",
                 "--set", "model=digitcnn", "--set", "num_clients=4", "--set", "shards_per_client=2",
                 "--set", "rounds=2", "--set", "eval_every=1", "--set", "batch_size=10", "--set", "workers=1",
                 "--set", "finetune.epochs=1", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partition"].startswith("partition shards: 4 clients")
    assert (out / "config.yaml").read_text().count(f"name: {saved['one-split']}") == 1


def test_natural_partition_gives_one_client_per_writer(saved, tmp_path):
    config = _config(saved["one-split"], partition="natural", num_clients=WRITERS,
                     hf={"partition_column": "writer_id", "split_test": None})
    results = fedbabu.run(config, out=tmp_path / "natural", progress=False)
    dataset = prepare_data(config)
    partition = results.partition
    assert partition.kind == "natural" and partition.num_clients == WRITERS
    writers = set()
    for train, test in zip(partition.train, partition.test, strict=True):
        marks = {int(v) for v in dataset.train_x[train, 0, 0, 0]} | {int(v) for v in dataset.test_x[test, 0, 0, 0]}
        assert len(marks) == 1, "a client holds samples of several writers"
        writers |= marks
        assert (len(train), len(test)) == (16, 4)  # 20 samples per writer, 0.2 held out of each
    assert writers == {10 * w for w in range(WRITERS)}
    assert len(results.clients) == WRITERS


def test_natural_partition_with_a_test_split_keeps_each_writers_samples(saved):
    config = _config(saved["two-splits"], partition="natural", num_clients=WRITERS,
                     hf={"partition_column": "writer_id"})
    dataset, partition = prepare_data(config), partition_for(config, prepare_data(config))
    for test in partition.test:
        assert len({int(v) for v in dataset.test_x[test, 0, 0, 0]}) == 1


def test_the_held_out_split_is_seeded(saved):
    def split(partition: str, seed: int) -> np.ndarray:
        extra = {"partition_column": "writer_id"} if partition == "natural" else {}
        config = _config(saved["one-split"], partition=partition, num_clients=WRITERS if partition == "natural" else 4,
                         hf={"split_test": None, "split_seed": seed, **extra})
        return load_hf(config).dataset.test_x.numpy()

    for partition in ("natural", "shards"):
        np.testing.assert_array_equal(split(partition, 0), split(partition, 0))
        assert not np.array_equal(split(partition, 0), split(partition, 1))


def test_a_natural_partition_names_its_number_of_clients(saved, capsys):
    code = main(["run", "--set", "dataset=hf", "--set", f"hf.name={saved['one-split']}", "--set", "hf.split_test=null",
                 "--set", "partition=natural", "--set", "hf.partition_column=writer_id", "--set", "num_clients=3",
                 "--out", str(saved["root"] / "never"), "--quiet"])
    _one_line(capsys, code, "num_clients: partition: natural by hf.partition_column='writer_id' gives 10 clients",
              "set num_clients=10")
    assert not (saved["root"] / "never").exists()


def _one_line(capsys, code: int, *fragments: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize(("sets", "fragments"), [
    (["hf.label_column=digit"], ["hf.label_column: no column 'digit'", "(columns: image, writer_id, label)"]),
    (["hf.image_column=picture"], ["hf.image_column: no column 'picture'", "columns: image, writer_id, label"]),
    (["hf.image_column=label"], ["hf.image_column: column 'label'", "not images"]),
    (["partition=natural", "num_clients=10", "hf.partition_column=writer"],
     ["hf.partition_column: no column 'writer'", "columns: image, writer_id, label"]),
    (["hf.split_test=test"], ["hf.split_test: no split 'test'", "(splits: train)", "hf.split_test=null"]),
    (["hf.split_train=training"], ["hf.split_train: no split 'training'", "(splits: train)"]),
    (["partition=natural", "num_clients=10"], ["hf.partition_column: partition: natural needs the column"]),
    (["hf.partition_column=writer_id"], ["hf.partition_column: only partition: natural reads it"]),
], ids=["label column", "image column", "image column of labels", "partition column", "test split", "train split",
        "natural without a column", "column without natural"])
def test_bad_names_are_refused_in_one_line(saved, tmp_path, capsys, sets, fragments):
    args = ["run", "--set", "dataset=hf", "--set", f"hf.name={saved['one-split']}", "--set", "hf.split_test=null"]
    for value in sets:
        args += ["--set", value]
    code = main([*args, "--out", str(tmp_path / "never"), "--quiet"])
    _one_line(capsys, code, *fragments)
    assert not (tmp_path / "never").exists()


def test_a_dataset_without_labels_is_refused(saved, tmp_path, capsys):
    code = main(["run", "--set", "dataset=hf", "--set", f"hf.name={saved['unlabelled']}", "--set",
                 "hf.split_test=null", "--out", str(tmp_path / "never"), "--quiet"])
    _one_line(capsys, code, "hf.label_column: no column 'label'", "(columns: image, writer_id)")


@pytest.mark.parametrize(("sets", "fragments"), [
    (["dataset=hf"], ["hf.name: dataset: hf needs a dataset"]),
    (["dataset=hf", "hf.name=/nonexistent/femnist"], ["hf.name: /nonexistent/femnist does not exist"]),
], ids=["no name", "missing folder"])
def test_a_dataset_that_is_not_named_or_not_there(tmp_path, capsys, sets, fragments):
    args = ["run"]
    for value in sets:
        args += ["--set", value]
    _one_line(capsys, main([*args, "--out", str(tmp_path / "never"), "--quiet"]), *fragments)


def test_a_folder_that_is_not_a_saved_dataset(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["run", "--set", "dataset=hf", "--set", f"hf.name={tmp_path / 'empty'}", "--quiet",
                 "--out", str(tmp_path / "never")])
    _one_line(capsys, code, f"hf.name: {tmp_path / 'empty'} is not a dataset saved with save_to_disk")


def test_without_the_extra_the_user_is_told_what_to_install(saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` meets when it is not installed
    code = main(["run", "--set", "dataset=hf", "--set", f"hf.name={saved['one-split']}", "--quiet",
                 "--out", str(tmp_path / "never")])
    _one_line(capsys, code, "dataset: hf needs the Hugging Face datasets library", "pip install 'fedbabu[hf]'")
