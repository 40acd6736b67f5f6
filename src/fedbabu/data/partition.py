"""Seeded partitions of a dataset into clients: the paper's label shards, Dirichlet, and IID.

Every partition gives each client a training set and a test set with the *same label
distribution* (the test split is divided class by class in proportion to the clients' training
counts), so personalized accuracy measures the client's own task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedbabu.errors import PartitionError


@dataclass(frozen=True)
class Partition:
    """Which training and test samples belong to each client (indices into the dataset's splits)."""

    kind: str
    train: list[np.ndarray]
    test: list[np.ndarray]
    train_counts: np.ndarray
    test_counts: np.ndarray

    @property
    def num_clients(self) -> int:
        return len(self.train)

    def classes_per_client(self) -> np.ndarray:
        return (self.train_counts > 0).sum(axis=1)

    def summary(self) -> str:
        """One line a user reads before a long run to see that the federation is what they meant."""
        classes = self.classes_per_client()
        sizes = np.array([len(t) for t in self.train])
        tests = np.array([len(t) for t in self.test])
        return (
            f"partition {self.kind}: {self.num_clients} clients, classes per client "
            f"mean {classes.mean():.1f} min {classes.min()} max {classes.max()}, train samples per client "
            f"mean {sizes.mean():.1f} min {sizes.min()} max {sizes.max()}, test mean {tests.mean():.1f}"
        )

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "num_clients": self.num_clients,
            "clients": [
                {
                    "client": cid,
                    "train_label_counts": self.train_counts[cid].tolist(),
                    "test_label_counts": self.test_counts[cid].tolist(),
                    "train_indices": self.train[cid].tolist(),
                    "test_indices": self.test[cid].tolist(),
                }
                for cid in range(self.num_clients)
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> Partition:
        clients = data["clients"]
        return cls(
            kind=data["kind"],
            train=[np.asarray(c["train_indices"], dtype=np.int64) for c in clients],
            test=[np.asarray(c["test_indices"], dtype=np.int64) for c in clients],
            train_counts=np.asarray([c["train_label_counts"] for c in clients], dtype=np.int64),
            test_counts=np.asarray([c["test_label_counts"] for c in clients], dtype=np.int64),
        )

    @classmethod
    def load(cls, path: Path) -> Partition:
        return cls.from_json(json.loads(Path(path).read_text()))


def make_partition(
    kind: str,
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    num_classes: int,
    seed: int,
    shards_per_client: int = 2,
    alpha: float = 0.5,
    samples_per_client: int | None = None,
) -> Partition:
    """Split the training labels among clients, then give each client a test set shaped like its train set.

    ``samples_per_client`` caps each client's training set (shards get smaller, IID and Dirichlet
    clients are subsampled), for federations that use part of a dataset.
    """
    train_labels = np.asarray(train_labels)
    test_labels = np.asarray(test_labels)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A4D]))
    if kind == "shards":
        train = _shards(train_labels, num_clients, num_classes, shards_per_client, rng, samples_per_client)
    elif kind == "dirichlet":
        train = _dirichlet(train_labels, num_clients, num_classes, alpha, rng)
    elif kind == "iid":
        train = _iid(train_labels, num_clients, rng)
    else:
        raise PartitionError(f"partition: unknown partition {kind!r}; expected shards, dirichlet or iid")
    if samples_per_client is not None and kind != "shards":
        train = [np.sort(rng.permutation(t)[:samples_per_client]) for t in train]
    train_counts = np.stack([np.bincount(train_labels[t], minlength=num_classes) for t in train])
    class_totals = np.bincount(train_labels, minlength=num_classes)
    test = _test_like_train(train_counts, class_totals, test_labels, num_classes, rng)
    test_counts = np.stack([np.bincount(test_labels[t], minlength=num_classes) for t in test])
    return Partition(kind, train, test, train_counts, test_counts)


def _shards(labels: np.ndarray, num_clients: int, num_classes: int, per_client: int,
            rng: np.random.Generator, samples_per_client: int | None = None) -> list[np.ndarray]:
    """The paper's partition: label-sorted data cut into ``num_clients * s`` one-class shards."""
    total_shards = num_clients * per_client
    if total_shards % num_classes != 0:
        raise PartitionError(
            f"shards_per_client: {num_clients} clients x {per_client} shards = {total_shards} shards cannot be "
            f"split evenly over {num_classes} classes (each shard holds one class); choose num_clients x "
            f"shards_per_client divisible by {num_classes}"
        )
    per_class = total_shards // num_classes
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    shard_size = min(len(m) for m in members) // per_class
    if samples_per_client is not None:
        shard_size = min(shard_size, samples_per_client // per_client)
    if shard_size < 1:
        smallest = min(len(m) for m in members)
        raise PartitionError(
            f"shards_per_client: {total_shards} shards need {per_class} per class, but the smallest class has "
            f"only {smallest} samples; use fewer clients or fewer shards per client"
        )
    shards = [m[i * shard_size:(i + 1) * shard_size] for m in members for i in range(per_class)]
    order = rng.permutation(total_shards)
    return [np.sort(np.concatenate([shards[s] for s in order[c * per_client:(c + 1) * per_client]]))
            for c in range(num_clients)]


def _dirichlet(labels: np.ndarray, num_clients: int, num_classes: int, alpha: float,
               rng: np.random.Generator, min_size: int = 2, attempts: int = 100) -> list[np.ndarray]:
    """Each class is divided among clients with proportions drawn from Dirichlet(alpha).

    Up to ``attempts`` draws are made and the first that gives every client ``min_size`` samples
    is kept (the partition of earlier builds, bit for bit). A small alpha over many clients leaves
    most clients empty in every draw, so after the last one the draw is repaired instead of refused:
    see :func:`_fill_short_clients`. Only a dataset too small for ``min_size`` samples per client
    is refused. A draw is counted, not materialized, so 100 draws of 10,000 clients take seconds.
    """
    if len(labels) < num_clients * min_size:
        raise PartitionError(
            f"num_clients: {num_clients} clients need at least {num_clients * min_size} training samples, "
            f"the dataset has {len(labels)}"
        )
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    client_ids = np.arange(num_clients)
    for attempt in range(attempts):
        members, owners = [], []
        for indices in by_class:
            shuffled = rng.permutation(indices)
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(shuffled)).astype(int)
            bounds = np.concatenate(([0], np.clip(cuts, 0, len(shuffled)), [len(shuffled)]))
            members.append(shuffled)
            owners.append(np.repeat(client_ids, np.diff(bounds)))
        owner = np.concatenate(owners)
        sizes = np.bincount(owner, minlength=num_clients)
        if sizes.min() >= min_size or attempt == attempts - 1:
            break
    samples = np.concatenate(members)
    order = np.lexsort((samples, owner))
    clients = np.split(samples[order], np.cumsum(sizes)[:-1])
    return _fill_short_clients(clients, min_size) if sizes.min() < min_size else clients


def _fill_short_clients(clients: list[np.ndarray], min_size: int) -> list[np.ndarray]:
    """Give every client ``min_size`` samples, each taken from the client that holds the most.

    The rule, deterministic given the draw: clients short of ``min_size`` are served in id order,
    one sample at a time, each the highest-indexed sample of the currently largest client (the
    lowest id among equals). The donor always has more than ``min_size`` samples while someone is
    short (the dataset holds at least ``min_size`` per client), so no client is emptied to fill another.
    """
    clients = list(clients)
    sizes = np.array([len(c) for c in clients])
    for cid in np.flatnonzero(sizes < min_size):
        while sizes[cid] < min_size:
            donor = int(np.argmax(sizes))
            clients[cid] = np.sort(np.append(clients[cid], clients[donor][-1]))
            clients[donor] = clients[donor][:-1]
            sizes[cid] += 1
            sizes[donor] -= 1
    return clients


def _iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    if len(labels) < num_clients:
        raise PartitionError(f"num_clients: {num_clients} clients but only {len(labels)} training samples")
    order = rng.permutation(len(labels))
    per_client = len(labels) // num_clients
    return [np.sort(order[c * per_client:(c + 1) * per_client]) for c in range(num_clients)]


def _test_like_train(train_counts: np.ndarray, class_totals: np.ndarray, test_labels: np.ndarray,
                     num_classes: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Give each client test samples of each class in the dataset's test:train ratio for that class.

    With the paper's shards this gives every client one fifth as many test images per class as
    training images (CIFAR: 50,000 train / 10,000 test); allocation by largest remainder keeps
    the test sets disjoint and uses each class's test samples at most once.
    """
    buckets: list[list[np.ndarray]] = [[] for _ in range(len(train_counts))]
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(test_labels == c))
        want = train_counts[:, c].astype(np.float64)
        if want.sum() == 0:
            continue
        quota = want * len(members) / class_totals[c]
        give = np.floor(quota).astype(int)
        remainder = min(len(members), round(quota.sum())) - give.sum()
        if remainder > 0:
            order = np.argsort(-(quota - give), kind="stable")
            give[order[:remainder]] += 1
        give[want == 0] = 0
        start = 0
        for cid, n in enumerate(give):
            buckets[cid].append(members[start:start + n])
            start += n
    return [np.sort(np.concatenate(b)) if b else np.zeros(0, dtype=np.int64) for b in buckets]
