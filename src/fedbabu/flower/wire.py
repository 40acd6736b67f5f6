"""What travels between the Flower ServerApp and ClientApp, and how it maps to fedbabu objects.

The server sends the whole validated :class:`~fedbabu.config.Config` (as JSON, about a kilobyte)
with every message, so a client needs no copy of the experiment file and cannot drift from the
server's settings. Model state travels as named tensors of the algorithm's ``shared_parts`` only:
for FedBABU that is the body, and each client rebuilds the fixed head from the shared seed. An
algorithm that collaborates (FedPAC) adds a client's report to its train reply, and the server's
result for that client to its next message.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedbabu.config import Config, build_config

CONFIG = "config"
"""Key of the ConfigRecord in every message (the key Flower's strategies use)."""
ARRAYS = "arrays"
METRICS = "metrics"
EXPERIMENT = "fedbabu-config"
"""ConfigRecord entry holding the experiment as JSON."""
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
PERSONAL = "personal"
"""Key of the ArrayRecord in ``context.state`` holding a client's personal parts between rounds."""
STATISTICS = "statistics"
"""A train reply's per-client statistics for the algorithm's server step (summed by the server)."""
REPORT = "report"
"""A train reply's report for the algorithm's ``collaborate``, read for that client alone (only where non-empty)."""
SERVER_PERSONAL = "server-personal"
"""ArrayRecord of a message carrying personal values the server computed for the receiving client after one of
its rounds (``collaborate``): the node writes them over its kept personal state before anything else."""
PERSONALIZE = "evaluate.personalize"
"""Message type of the final task: fine-tune and test on every client."""
QUERY = "query"
ACCEPTED_ROUND = "accepted-round"
"""ConfigRecord entry: the last round index whose update from the receiving client the server aggregated."""
PENDING = "personal-pending"
"""Keys in ``context.state`` of the personal parts of a client's last round, kept until the server accepts it."""
PENDING_ROUND = "personal-pending-round"


def experiment_record(config: Config, **entries: int | float | str) -> ConfigRecord:
    """The ConfigRecord of a message: the experiment plus per-message entries (round, lr)."""
    return ConfigRecord({EXPERIMENT: json.dumps(config.to_plain()), **entries})


def experiment_from(record: ConfigRecord) -> Config:
    """The experiment a message carries, validated exactly like a local config file."""
    return build_config(json.loads(str(record[EXPERIMENT])), "flower message")


def to_arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """Named tensors as an ArrayRecord (logical element order, whatever the memory format)."""
    return ArrayRecord({name: t.detach().cpu().contiguous() for name, t in state.items()})


def to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def to_vector(record: ArrayRecord, names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """The named arrays concatenated in ``names`` order: positions match ``Layout.mask`` selections.

    Raises ``ValueError`` naming what does not match (names or a shape), so that a malformed reply is
    rejected with its reason. The dtype is kept as sent: the server's screening refuses a wrong one
    instead of silently converting it.
    """
    state = record.to_torch_state_dict()
    if sorted(state) != sorted(names):
        raise ValueError(f"expected arrays {list(names)}, got {list(state)}")
    for name, shape in zip(names, shapes, strict=True):
        if tuple(state[name].shape) != tuple(shape):
            raise ValueError(f"array {name!r} has shape {tuple(state[name].shape)}, expected {tuple(shape)}")
    return torch.cat([state[n].reshape(-1) for n in names]) if names else torch.zeros(0)
