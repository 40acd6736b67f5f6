import hashlib

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


def _fingerprint(p: Partition) -> str:
    digest = hashlib.sha256()
    for part in (*p.train, *p.test):
        digest.update(np.int64(len(part)).tobytes())
        digest.update(part.astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize(
    ("num_clients", "alpha", "seed", "fingerprint"),
    [
        (20, 0.5, 0, "40c7fc8fdf09a030"),  # the first draw is kept
        (100, 0.1, 0, "7c70ef25c0cebacd"),  # the 45th draw is the first without a short client
        (400, 0.3, 2, "6a85528766d0aa36"),  # the 97th
    ],
)
def test_dirichlet_partitions_of_earlier_builds_are_unchanged(num_clients, alpha, seed, fingerprint):
    p = make_partition("dirichlet", TRAIN, TEST, num_clients, 10, seed=seed, alpha=alpha)
    assert _fingerprint(p) == fingerprint


@pytest.mark.timeout(60)
def test_dirichlet_tiny_alpha_over_10000_clients_gives_every_client_data():
    labels = np.random.default_rng(1).integers(0, 10, 50_000)  # CIFAR-10's size
    test = np.random.default_rng(2).integers(0, 10, 10_000)
    a = make_partition("dirichlet", labels, test, 10_000, 10, seed=0, alpha=0.01)
    sizes = np.array([len(t) for t in a.train])
    assert sizes.min() >= 2
    all_train = np.concatenate(a.train)
    assert len(all_train) == len(labels) and len(np.unique(all_train)) == len(labels)
    for cid in range(0, 10_000, 997):
        assert np.array_equal(np.bincount(labels[a.train[cid]], minlength=10), a.train_counts[cid])
    b = make_partition("dirichlet", labels, test, 10_000, 10, seed=0, alpha=0.01)
    assert all(np.array_equal(x, y) for x, y in zip(a.train, b.train, strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(a.test, b.test, strict=True))
    other = make_partition("dirichlet", labels, test, 10_000, 10, seed=1, alpha=0.01)
    assert not all(np.array_equal(x, y) for x, y in zip(a.train, other.train, strict=True))


def test_dirichlet_short_clients_are_filled_from_the_largest():
    p = make_partition("dirichlet", TRAIN, TEST, 2000, 10, seed=0, alpha=0.01)
    _invariants(p, len(TRAIN), len(TEST))
    assert min(len(t) for t in p.train) == 2 and len(np.concatenate(p.train)) == len(TRAIN)


def test_the_fill_rule_takes_the_largest_clients_highest_sample():
    from fedbabu.data.partition import _fill_short_clients

    clients = [np.array([0, 1, 2, 3, 4]), np.zeros(0, dtype=np.int64), np.array([7]), np.array([5, 6, 8])]
    filled = _fill_short_clients(clients, min_size=2)
    expected = [[0, 1], [3, 4], [2, 7], [5, 6, 8]]  # client 0 gives 4, 3, then 2 (tied with client 3: lower id)
    assert [t.tolist() for t in filled] == expected
