import numpy as np
import pytest

from fedbabu.data.partition import Partition, make_partition
from fedbabu.errors import PartitionError

rng = np.random.default_rng(123)
TRAIN = np.repeat(np.arange(10), 500)[rng.permutation(5000)]
TEST = np.repeat(np.arange(10), 100)


def _invariants(p: Partition, n_train: int, n_test: int) -> None:
    all_train = np.concatenate(p.train)
    all_test = np.concatenate(p.test)
    assert len(np.unique(all_train)) == len(all_train), "train sets overlap"
    assert len(np.unique(all_test)) == len(all_test), "test sets overlap"
    assert all_train.max() < n_train and all_test.max() < n_test
    for cid in range(p.num_clients):
        assert np.array_equal(np.bincount(TRAIN[p.train[cid]], minlength=10), p.train_counts[cid])
        # the test set has exactly the classes of the train set
        assert set(np.flatnonzero(p.test_counts[cid])) <= set(np.flatnonzero(p.train_counts[cid]))


def test_shards_follow_the_paper():
    p = make_partition("shards", TRAIN, TEST, num_clients=50, num_classes=10, seed=0, shards_per_client=2)
    _invariants(p, len(TRAIN), len(TEST))
    # 100 shards of 50 images, each one class: every client 100 images of at most 2 classes
    assert all(len(t) == 100 for t in p.train)
    assert p.classes_per_client().max() <= 2
    assert all(set(np.unique(p.train_counts[c])) <= {0, 50, 100} for c in range(50))
    # complete: the whole training set is used; test sets are one fifth, per class
    assert len(np.concatenate(p.train)) == len(TRAIN)
    assert np.array_equal(p.test_counts * 5, p.train_counts)


def test_same_seed_same_partition_other_seed_differs():
    a = make_partition("shards", TRAIN, TEST, 50, 10, seed=7, shards_per_client=2)
    b = make_partition("shards", TRAIN, TEST, 50, 10, seed=7, shards_per_client=2)
    c = make_partition("shards", TRAIN, TEST, 50, 10, seed=8, shards_per_client=2)
    assert all(np.array_equal(x, y) for x, y in zip(a.train, b.train, strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(a.test, b.test, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.train, c.train, strict=True))


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_balanced():
    skewed = make_partition("dirichlet", TRAIN, TEST, 20, 10, seed=0, alpha=0.1)
    balanced = make_partition("dirichlet", TRAIN, TEST, 20, 10, seed=0, alpha=100.0)
    _invariants(skewed, len(TRAIN), len(TEST))
    _invariants(balanced, len(TRAIN), len(TEST))
    assert len(np.concatenate(skewed.train)) == len(TRAIN)
    assert skewed.classes_per_client().mean() < balanced.classes_per_client().mean()
    assert balanced.classes_per_client().min() == 10


def test_iid_gives_equal_sizes_and_all_classes():
    p = make_partition("iid", TRAIN, TEST, 10, 10, seed=0)
    _invariants(p, len(TRAIN), len(TEST))
    assert {len(t) for t in p.train} == {500}
    assert p.classes_per_client().min() == 10


def test_json_round_trip():
    p = make_partition("shards", TRAIN, TEST, 10, 10, seed=1, shards_per_client=3)
    q = Partition.from_json(p.to_json())
    assert all(np.array_equal(x, y) for x, y in zip(p.train, q.train, strict=True))
    assert np.array_equal(p.test_counts, q.test_counts)
    assert "10 clients" in p.summary()


@pytest.mark.parametrize(
    ("kind", "kwargs", "fragment"),
    [
        ("shards", {"num_clients": 7, "shards_per_client": 3}, "cannot be split evenly"),
        ("shards", {"num_clients": 1000, "shards_per_client": 10}, "smallest class"),
        ("iid", {"num_clients": 6000}, "only 5000"),
        ("dirichlet", {"num_clients": 4000}, "at least"),
        ("zipf", {"num_clients": 10}, "unknown partition"),
    ],
)
def test_impossible_requests_are_explained(kind, kwargs, fragment):
    with pytest.raises(PartitionError, match=fragment):
        make_partition(kind, TRAIN, TEST, num_classes=10, seed=0, **kwargs)


@pytest.mark.parametrize("kind", ["shards", "iid", "dirichlet"])
def test_samples_per_client_caps_train_and_keeps_the_test_ratio(kind):
    p = make_partition(kind, TRAIN, TEST, num_clients=10, num_classes=10, seed=0, shards_per_client=2,
                       alpha=1.0, samples_per_client=60)
    _invariants(p, len(TRAIN), len(TEST))
    assert max(len(t) for t in p.train) <= 60
    if kind == "shards":
        assert {len(t) for t in p.train} == {60}
        assert np.array_equal(p.test_counts * 5, p.train_counts)
    # test:train is the dataset's 1:5 per client, up to rounding
    assert abs(sum(len(t) for t in p.test) * 5 - sum(len(t) for t in p.train)) <= 5 * 10
