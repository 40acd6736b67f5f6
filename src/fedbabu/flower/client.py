"""The Flower ClientApp: one federated client running the project's algorithm hooks on its own data.

Every handler rebuilds the same objects as a simulator worker (model from the shared seed via
:func:`~fedbabu.engine.simulation.client_model`, partition via
:func:`~fedbabu.runner.partition_for`, :class:`~fedbabu.training.ClientData`, random streams
via :func:`~fedbabu.engine.simulation.client_generator`) and then calls
:meth:`~fedbabu.algorithms.base.Algorithm.client_update`, ``evaluate_client`` or ``personalize``.
Personal parts (a FedPer head, a Ditto model) stay on the node in ``context.state``; they never
travel, but for what an algorithm that collaborates reports (FedPAC's classifier) and the values the
server sends back for them, which the node writes over its kept state first thing. As in the
simulator, a round's personal parts are kept only if the server aggregated that round's update: they
wait in ``context.state`` until the next message says so. The node is told
which client it is by ``--node-config "partition-id=I num-partitions=N"`` (the simulation engine
sets both by itself).

A node reads the dataset files once to cut the seeded partition (every node must cut the same one),
then keeps in memory only its own client's training and test samples. A process that serves a
second client (a simulation-engine worker serves many virtual clients in turn) keeps the dataset
and its partition instead of reading the files again for every client it meets.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedbabu.algorithms import ALGORITHMS, Algorithm
from fedbabu.config import Config
from fedbabu.data.datasets import Dataset
from fedbabu.data.partition import Partition
from fedbabu.engine.contract import evaluate_client, start_global_model
from fedbabu.engine.pool import tune_process
from fedbabu.engine.round import held_out_of
from fedbabu.engine.simulation import (
    TRAIN_STREAM,
    client_generator,
    client_model,
    personalize_generator,
    runtime_for,
)
from fedbabu.errors import UserError
from fedbabu.flower.wire import (
    ACCEPTED_ROUND,
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    PENDING,
    PENDING_ROUND,
    PERSONAL,
    REPORT,
    SERVER_PERSONAL,
    STATISTICS,
    experiment_from,
    to_arrays,
    to_state,
)
from fedbabu.models import BodyHead
from fedbabu.training import ClientData, load_state, state_of

app = ClientApp()

_SHARES: dict[tuple[str, int], Dataset] = {}
"""(experiment, client) -> that client's samples, for the experiment this process last served.

A SuperNode serves one client, so it holds one share; a simulation-engine process serves several
virtual clients in turn and keeps each one's share (together at most the whole dataset)."""

_WHOLE: dict[str, tuple[Dataset, Partition]] = {}
"""experiment -> its whole dataset and partition, once this process serves a second of its clients.

A SuperNode never keeps them; a simulation-engine process reads the files twice, not once per
virtual client (with 1,000 clients, reading them per client dominated an evaluation round)."""


def partition_id(context: Context, config: Config) -> int:
    """Which client this node is, checked against the server's experiment."""
    node = context.node_config
    if PARTITION_ID not in node:
        raise UserError("node config: partition-id is missing; start the supernode with "
                        "--node-config \"partition-id=I num-partitions=N\"")
    client = int(node[PARTITION_ID])
    expected = int(node.get(NUM_PARTITIONS, config.num_clients))
    if expected != config.num_clients:
        raise UserError(f"node config: num-partitions={expected} but the experiment has num_clients="
                        f"{config.num_clients}")
    if not 0 <= client < config.num_clients:
        raise UserError(f"node config: partition-id={client} is outside 0..{config.num_clients - 1}")
    return client


def node_share(config: Config, client: int) -> Dataset:
    """This client's samples; the full dataset is read to cut the seeded partition, then dropped
    unless this process already serves another client of the experiment."""
    experiment = json.dumps(config.to_plain(), sort_keys=True)
    if (experiment, client) not in _SHARES:
        if any(key[0] != experiment for key in _SHARES):
            _SHARES.clear()
            _WHOLE.clear()
        whole = _WHOLE.get(experiment)
        if whole is None:
            whole = _read_whole(config)
            if _SHARES:  # a second client of this experiment: this process serves several
                _WHOLE[experiment] = whole
        _SHARES[experiment, client] = own_share(*whole, client)
    return _SHARES[experiment, client]


def _read_whole(config: Config) -> tuple[Dataset, Partition]:
    from fedbabu.runner import partition_for, prepare_data

    dataset = prepare_data(config)
    return dataset, partition_for(config, dataset)


def own_share(dataset: Dataset, partition: Partition, client: int) -> Dataset:
    """A dataset holding only this client's training and test samples (same order, same normalization).

    Gathering a batch by position from this copy reads exactly the samples the simulator reads by
    index from the full dataset, so training is bit-identical while the node keeps only its share.
    The tensors are copies (indexing by a tensor copies), so nothing refers to the full arrays.
    """
    train = torch.as_tensor(partition.train[client], dtype=torch.int64)
    test = torch.as_tensor(partition.test[client], dtype=torch.int64)
    return dataclasses.replace(dataset, train_x=dataset.train_x[train], train_y=dataset.train_y[train],
                               test_x=dataset.test_x[test], test_y=dataset.test_y[test])


@dataclasses.dataclass
class Client:
    """Everything one handler needs: the experiment, this client's data, the algorithm and a model."""

    config: Config
    client: int
    data: ClientData
    algorithm: Algorithm
    model: BodyHead


def client_for(message: Message, context: Context) -> Client:
    """Rebuild this node's client from the message's experiment and the node's configuration."""
    config = experiment_from(message.content[CONFIG])
    if "data-dir" in context.node_config:
        config = config.model_copy(update={"data_dir": Path(str(context.node_config["data-dir"]))})
    client = partition_id(context, config)
    settle_personal(context, message.content[CONFIG])
    receive_server_personal(context, message)
    tune_process(int(context.node_config.get("threads", 1)))
    share = node_share(config, client)
    runtime = runtime_for(config)
    data = ClientData(share, np.arange(share.train_y.shape[0]), np.arange(share.test_y.shape[0]), runtime)
    model = client_model(config, share, runtime)
    algorithm = ALGORITHMS[config.algorithm](config)
    start_global_model(algorithm, model)  # the server's initial model: the parts that never travel start from it too
    if ARRAYS in message.content.array_records:
        load_state(model, to_state(message.content.array_records[ARRAYS]))
    return Client(config, client, data, algorithm, model)


def settle_personal(context: Context, settings: ConfigRecord) -> None:
    """Keep the last round's personal parts if the server aggregated that round's update, else drop them.

    The simulator keeps a client's personal state only from accepted updates (a rejected or lost
    update changes nothing); the server says which round it last accepted from this client.
    """
    pending = context.state.array_records.get(PENDING)
    if pending is None:
        return
    round_index = int(context.state.config_records[PENDING_ROUND]["round-index"])
    if int(settings.get(ACCEPTED_ROUND, -1)) == round_index:
        context.state[PERSONAL] = pending
    del context.state[PENDING]
    del context.state[PENDING_ROUND]


def receive_server_personal(context: Context, message: Message) -> None:
    """Write the personal values the server computed for this client (``collaborate``) over its kept state.

    The simulator writes them right after the round that computed them; the server sends them with this
    client's next message, which is the first moment they can matter here. It sends them again until this
    client answers, and writing the same values twice changes nothing.
    """
    record = message.content.array_records.get(SERVER_PERSONAL)
    if record is not None:
        context.state[PERSONAL] = to_arrays(personal_state(context) | to_state(record))


def personal_state(context: Context) -> dict[str, torch.Tensor]:
    """This client's personal parts from earlier rounds (empty before its first round)."""
    record = context.state.array_records.get(PERSONAL)
    return to_state(record) if record is not None else {}


def _reply(message: Message, c: Client, metrics: dict, arrays: dict[str, torch.Tensor] | None = None) -> Message:
    content = RecordDict({METRICS: MetricRecord({PARTITION_ID: c.client, **metrics})})
    if arrays is not None:
        content[ARRAYS] = to_arrays(arrays)
    return Message(content, reply_to=message)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Tell the server which client this node is, so it can sample clients as the simulator does."""
    config = experiment_from(message.content[CONFIG])
    client = partition_id(context, config)
    return Message(RecordDict({METRICS: MetricRecord({PARTITION_ID: client})}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """One round of the algorithm's local update; only the shared parts go back, personal parts wait.

    A held-out client (``holdout_clients``) refuses: the round policy never asks one, so a train message
    to it can only come from another strategy, and training it would make its results those of a seen client.
    """
    c = client_for(message, context)
    if c.client in held_out_of(c.config, c.config.num_clients):
        raise UserError(f"client {c.client} is held out (holdout_clients={c.config.holdout_clients}) and never trains")
    settings = message.content[CONFIG]
    round_index = int(settings["round-index"])
    generator = client_generator(c.config.seed, round_index, c.client, TRAIN_STREAM)
    update = c.algorithm.client_update(c.model, c.data, personal_state(context), float(settings["lr"]), generator)
    if update.personal:
        context.state[PENDING] = to_arrays(update.personal)
        context.state[PENDING_ROUND] = ConfigRecord({"round-index": round_index})
    reply = _reply(message, c, {NUM_EXAMPLES: c.data.num_train, "train-loss": update.loss},
                   state_of(c.model, c.algorithm.shared_parts))
    if update.statistics:
        reply.content[STATISTICS] = to_arrays(update.statistics)
    if update.report:
        reply.content[REPORT] = to_arrays(update.report)
    return reply


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Accuracy of the current global model (with this client's personal parts) on its test set."""
    c = client_for(message, context)
    accuracy = evaluate_client(c.model, c.data, personal_state(context))
    return _reply(message, c, {NUM_EXAMPLES: c.data.num_test, "accuracy": accuracy})


@app.evaluate("personalize")
def personalize(message: Message, context: Context) -> Message:
    """The final task: fine-tune the final model on this client's data; accuracy after each epoch."""
    c = client_for(message, context)
    generator = personalize_generator(c.config, c.client)
    curve = c.algorithm.personalize(c.model, c.data, personal_state(context), generator)
    return _reply(message, c, {NUM_EXAMPLES: c.data.num_test, "accuracies": [float(a) for a in curve]})
