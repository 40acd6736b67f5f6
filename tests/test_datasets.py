import functools
import gzip
import pickle
import shutil

import numpy as np
import pytest
import torch
from conftest import small_config

from fedbabu.data import datasets
from fedbabu.data.datasets import (
    fetch_verified,
    load_dataset,
    load_digits,
    md5sum,
    read_cifar10,
    read_cifar100,
    read_fmnist,
)
from fedbabu.errors import DataError
from fedbabu.runner import prepare_data


def test_cifar10_real_files(cifar10_dir):
    ds = read_cifar10(cifar10_dir)
    assert ds.train_x.shape == (50000, 32, 32, 3) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (10000, 32, 32, 3)
    assert ds.train_y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert np.bincount(ds.train_y[:10000].numpy()).tolist() == [1005, 974, 1032, 1016, 999, 937, 1030, 1001,
                                                               1025, 981]
    assert np.bincount(ds.test_y.numpy()).tolist() == [1000] * 10
    # channel means of real CIFAR-10 (to JPEG precision)
    means = ds.train_x.double().mean(dim=(0, 1, 2)) / 255
    assert torch.allclose(means, torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64), atol=2e-3)


def test_fmnist_real_files(fmnist_dir):
    ds = read_fmnist(fmnist_dir)
    assert ds.train_x.shape == (60000, 28, 28, 1) and ds.test_x.shape == (10000, 28, 28, 1)
    assert ds.train_y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert np.bincount(ds.train_y.numpy()).tolist() == [6000] * 10
    assert np.bincount(ds.test_y.numpy()).tolist() == [1000] * 10


def test_digits_split_is_fixed_and_stratified():
    a, b = load_digits(), load_digits()
    assert torch.equal(a.train_x, b.train_x)
    assert len(a.train_y) + len(a.test_y) == 1797
    counts = np.bincount(a.test_y.numpy())
    assert counts.min() >= 34 and counts.max() <= 37
    assert a.train_x.shape[1:] == (8, 8, 1) and int(a.train_x.max()) == 255


def _write_cifar100(folder, n_train=200, n_test=100):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        data = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"fine_labels": list(np.arange(n) % 100), b"coarse_labels": list(np.arange(n) % 20)}
        (folder / name).write_bytes(pickle.dumps(data, protocol=2))
    return folder


def test_cifar100_reader_on_official_format(tmp_path):
    folder = _write_cifar100(tmp_path / "cifar-100-python")
    ds = read_cifar100(folder, train_total=200, test_total=100)
    assert ds.num_classes == 100 and ds.train_x.shape == (200, 32, 32, 3)
    raw = pickle.loads((folder / "train").read_bytes())[b"data"][1]
    # channel planes (R, G, B) become the last axis
    assert ds.train_x[1, 0, 0].tolist() == [raw[0], raw[1024], raw[2048]]
    with pytest.raises(DataError, match="should hold 50000"):
        read_cifar100(folder)


def test_broken_cifar_files_are_named(tmp_path):
    folder = _write_cifar100(tmp_path / "cifar-100-python")
    (folder / "train").write_bytes((folder / "train").read_bytes()[:5000])
    with pytest.raises(DataError, match=r"train: not a readable CIFAR pickle"):
        read_cifar100(folder, 200, 100)
    (folder / "train").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match="not a CIFAR batch"):
        read_cifar100(folder, 200, 100)
    (folder / "train").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"fine_labels": [0, 1]}))
    with pytest.raises(DataError, match="3072"):
        read_cifar100(folder, 200, 100)


def test_broken_idx_files_are_named(tmp_path, fmnist_dir):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for f in fmnist_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    raw = gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: truncated"):
        read_fmnist(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a readable gzip"):
        read_fmnist(folder)


def test_missing_data_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDBABU_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "given").mkdir()
    with pytest.raises(DataError) as err:
        load_dataset("cifar100", tmp_path / "given")
    message = str(err.value)
    assert str(tmp_path / "given" / "cifar-100-python") in message
    assert str(tmp_path / "env") in message and "--download" in message
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", tmp_path / "nowhere")


@pytest.fixture
def three_data_roots(tmp_path, monkeypatch):
    """Small CIFAR-100 copies under a --data-dir, $FEDBABU_DATA and the user cache; each load names its folder."""
    roots = {name: tmp_path / name for name in ("given", "env", "cache")}
    for root in roots.values():
        _write_cifar100(root / "cifar-100-python")
    monkeypatch.setenv("FEDBABU_DATA", str(roots["env"]))
    monkeypatch.setattr(datasets, "default_cache_dir", lambda: roots["cache"])
    monkeypatch.setattr(datasets, "read_cifar100", functools.partial(read_cifar100, train_total=200, test_total=100))
    return roots


def _loaded_from(dataset):
    return dataset.provenance.removeprefix("official python-format files in ")


def test_data_dir_lookup_order(three_data_roots, monkeypatch):
    roots = three_data_roots
    assert _loaded_from(load_dataset("cifar100", roots["given"])) == str(roots["given"] / "cifar-100-python")
    config = small_config(dataset="cifar100", data_dir=str(roots["given"]))
    assert _loaded_from(prepare_data(config)) == str(roots["given"] / "cifar-100-python")  # the config key
    assert _loaded_from(load_dataset("cifar100", None)) == str(roots["env"] / "cifar-100-python")
    empty = roots["given"].parent / "empty"
    empty.mkdir()
    assert _loaded_from(load_dataset("cifar100", empty)) == str(roots["env"] / "cifar-100-python")
    monkeypatch.delenv("FEDBABU_DATA")
    assert _loaded_from(load_dataset("cifar100", empty)) == str(roots["cache"] / "cifar-100-python")
    shutil.rmtree(roots["cache"])
    with pytest.raises(DataError, match="cifar100: data not found"):
        load_dataset("cifar100", empty)


def test_download_is_md5_verified(tmp_path):
    source = tmp_path / "archive.bin"
    source.write_bytes(b"payload")
    good = fetch_verified(source.as_uri(), md5sum(source), tmp_path / "out" / "a.bin")
    assert good.read_bytes() == b"payload"
    with pytest.raises(DataError, match="md5 mismatch"):
        fetch_verified(source.as_uri(), "0" * 32, tmp_path / "out" / "b.bin")
    assert not (tmp_path / "out" / "b.bin").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.bin"]
