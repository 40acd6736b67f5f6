"""The federated loop of the simulator: sample, train clients, aggregate, evaluate, personalize.

The loop is algorithm-agnostic: it asks the algorithm which parts are shared and which are
personal, runs :meth:`~fedbabu.algorithms.base.Algorithm.client_update` for the clients it trains in a
round (``training_clients``: by default the sampled ones) on the :class:`~fedbabu.engine.pool.ClientPool`,
averages only the shared parts, and writes what the algorithm's ``collaborate`` computes for a client
over the personal state it keeps for that client.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedbabu.algorithms import ALGORITHMS, Algorithm
from fedbabu.config import Config
from fedbabu.data.datasets import Dataset
from fedbabu.data.partition import Partition
from fedbabu.data.transforms import Normalizer
from fedbabu.engine import hardware, privacy
from fedbabu.engine.checkpoint import Checkpointer
from fedbabu.engine.contract import evaluate_client, personal_shapes, start_global_model
from fedbabu.engine.params import Layout, flatten, flatten_tensors, load_flat
from fedbabu.engine.personal import Personal, PersonalStore
from fedbabu.engine.pool import ClientPool
from fedbabu.engine.round import ClientReply, ServerState, finish_round, held_out_of, plan_round, stream_seed
from fedbabu.engine.vectorized import choose_executor, vectorized_sgd
from fedbabu.errors import UserError
from fedbabu.models import BodyHead, build_model, part_of
from fedbabu.training import ClientData, Runtime, body_features, load_state

TRAIN_STREAM, PERSONALIZE_STREAM, HEAD_STREAM, CLIENT_ORDER_STREAM = 0x7E1, 0x9E2, 0x4EA, 0xC0D

ModelFactory = Callable[[Config, Dataset], BodyHead]
"""Builds a run's network from (config, dataset); called once for the server's template and once per worker
process, inherited through fork (never pickled), so it may be any closure. Its initial weights must be a
function of the config (the seed) alone; only the template's are used, the workers' copies are overwritten
from the global vector."""


def config_model(config: Config, dataset: Dataset) -> BodyHead:
    """The default :data:`ModelFactory`: the built-in network named by ``config.model``."""
    return build_model(config.resolved_model(), dataset.channels, dataset.image_size, dataset.num_classes,
                       config.head_init, config.seed)


def network(config: Config, dataset: Dataset, factory: ModelFactory = config_model,
            algorithm: Algorithm | None = None) -> BodyHead:
    """The run's network at its initial weights: the factory's body, with the head its algorithm uses.

    Every party builds it this way (server template, workers, Flower nodes, ``personalize``), so
    an algorithm's own head (:meth:`~fedbabu.algorithms.base.Algorithm.make_head`) is drawn from
    the seed alone and is the same everywhere.
    """
    model = factory(config, dataset)
    algorithm = algorithm or ALGORITHMS[config.algorithm](config)
    model.head = algorithm.make_head(model.head, torch.Generator().manual_seed(stream_seed(config.seed, 0, 0,
                                                                                           HEAD_STREAM)))
    return model


def client_generator(seed: int, round_index: int, client: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, round_index, client, stream))


def personalize_generator(config: Config, client: int) -> torch.Generator:
    """The generator of a client's final fine-tuning: the same in a run, ``personalize``, ``analyze`` and Flower."""
    return client_generator(config.seed, config.rounds, client, PERSONALIZE_STREAM)


def seeded_clients(seed: int, num_clients: int, count: int | str) -> list[int]:
    """The clients evaluated (``eval_clients``) or personalized (``personalize_clients``): all, or a seeded sample.

    A sample is the first ``count`` clients of one seeded order of the federation (a pure function
    of seed and size, the same in every round and every engine), sorted. Both keys read the same
    order, so the smaller sample lies inside the larger: the clients evaluated during training are
    among those personalized whenever ``eval_clients <= personalize_clients``.
    """
    if count == "all" or int(count) >= num_clients:
        return list(range(num_clients))
    order = np.random.default_rng(stream_seed(seed, 0, 0, CLIENT_ORDER_STREAM)).permutation(num_clients)
    return sorted(int(c) for c in order[:int(count)])


CLIENT_GROUPS = ("all", "seen", "unseen")
"""Which of a run's clients ``personalize`` and ``analyze`` work on: every one, those the federation could
train (seen), or its held-out ones (unseen, ``holdout_clients``)."""


def personalized_clients(config: Config, num_clients: int, group: str = "all") -> list[int]:
    """The clients a run (and everything that re-derives its personalization) fine-tunes and reports, or
    those of them in one of :data:`CLIENT_GROUPS`.

    A held-out client is personalized like every other: it starts from the final global model without
    personal state, which each algorithm's personalization already meets in a client never sampled.
    """
    clients = seeded_clients(config.seed, num_clients, config.personalize_clients)
    if group == "all":
        return clients
    if group not in CLIENT_GROUPS:
        raise ValueError(f"unknown client group {group!r}; expected one of {', '.join(CLIENT_GROUPS)}")
    unseen = set(held_out_of(config, num_clients))
    return [c for c in clients if (c in unseen) == (group == "unseen")]


def runtime_for(config: Config) -> Runtime:
    """The compute settings of a run; channels_last pays for convolutions on CPU (benchmarks/README.md).

    Not under the vectorized executor: its convolutions run grouped over the stacked clients, which
    are faster in NCHW (measured on CPU: 1.4x).
    """
    device = config.resolved_device()
    channels_last = config.channels_last == "on" or (
        config.channels_last == "auto" and device == "cpu" and config.executor != "vectorized")
    return Runtime(device=device, augment=config.augment_enabled(), precision=config.precision,
                   channels_last=channels_last, eval_batch_size=config.eval_batch_size)


def client_model(config: Config, dataset: Dataset, runtime: Runtime,
                 factory: ModelFactory = config_model) -> BodyHead:
    """The run's model at its seeded initial weights, on the run's device and memory format.

    Shared by the simulator's workers and the Flower ClientApp, so both train bit-identical models.
    """
    model = network(config, dataset, factory).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@dataclass
class Federation:
    """Everything the clients of one run share. Built once; worker processes inherit it by fork."""

    config: Config
    dataset: Dataset
    partition: Partition
    algorithm: Algorithm
    runtime: Runtime
    layout: Layout
    global_vector: torch.Tensor
    model_factory: ModelFactory = config_model
    normalizer: Normalizer = field(init=False)
    shared_mask: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.shared_mask = self.layout.mask(self.algorithm.shared_parts)
        self.normalizer = Normalizer(self.dataset.mean, self.dataset.std, self.runtime.channels_last)

    def new_model(self) -> BodyHead:
        return client_model(self.config, self.dataset, self.runtime, self.model_factory)

    def client_data(self, client: int) -> ClientData:
        return ClientData(self.dataset, self.partition.train[client], self.partition.test[client],
                          self.runtime, self.normalizer)

    def probe_data(self, test_indices: np.ndarray) -> ClientData:
        """Given test images as a client with no training data, for reading bodies' features on them."""
        return ClientData(self.dataset, np.zeros(0, dtype=np.int64), test_indices, self.runtime, self.normalizer)


class Worker:
    """What a worker process holds: the federation (inherited through fork, never pickled) and one model.

    The pool hands it to every task, so no task reads module state. Each process has its own copy
    (fork), hence its own model, which :meth:`model` re-loads from the shared-memory global vector
    for every task instead of deep-copying networks.
    """

    def __init__(self, federation: Federation) -> None:
        self.federation = federation
        self._model: BodyHead | None = None

    def model(self) -> BodyHead:
        if self._model is None:
            self._model = self.federation.new_model()
        load_flat(self._model, self.federation.global_vector)
        return self._model


def _to_numpy(state: dict[str, torch.Tensor]) -> Personal:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _to_torch(state: Personal | None) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in (state or {}).items()}


@dataclass(frozen=True)
class TrainTask:
    """One client's round: its update as a :class:`~fedbabu.engine.round.ClientReply`."""

    client: int
    round: int
    lr: float
    personal: Personal | None

    def __call__(self, worker: Worker) -> ClientReply:
        fed = worker.federation
        model = worker.model()
        generator = client_generator(fed.config.seed, self.round, self.client, TRAIN_STREAM)
        data = fed.client_data(self.client)
        update = fed.algorithm.client_update(model, data, _to_torch(self.personal), self.lr, generator)
        return ClientReply(self.client, flatten(model)[fed.shared_mask].numpy(), update.loss, data.num_train,
                           _to_numpy(update.personal), _to_numpy(update.statistics), _to_numpy(update.report))


@dataclass(frozen=True)
class EvalTask:
    """One client's accuracy under the current global model (and its personal parts)."""

    client: int
    personal: Personal | None

    def __call__(self, worker: Worker) -> float:
        fed = worker.federation
        return evaluate_client(worker.model(), fed.client_data(self.client), _to_torch(self.personal))


@dataclass(frozen=True)
class PersonalizeTask:
    """One client's personalization curve from the final model."""

    client: int
    personal: Personal | None

    def __call__(self, worker: Worker) -> list[float]:
        fed = worker.federation
        return fed.algorithm.personalize(worker.model(), fed.client_data(self.client), _to_torch(self.personal),
                                         personalize_generator(fed.config, self.client))


def _train_vectorized(worker: Worker, clients: list[int], round_index: int, lr: float,
                      personal: Mapping[int, Personal]) -> list[ClientReply]:
    """The round's clients trained together in this process; the same replies :class:`TrainTask` gives."""
    fed = worker.federation
    model = worker.model()
    device = fed.runtime.device
    base = {name: param.detach() for name, param in model.named_parameters()}
    starts = [{**base, **{k: v.to(device) for k, v in _to_torch(personal.get(c)).items()}} for c in clients]
    data = [fed.client_data(c) for c in clients]
    finals, losses = vectorized_sgd(
        model, data, starts, fed.algorithm.trained_parts, fed.algorithm.local_training(lr),
        [client_generator(fed.config.seed, round_index, c, TRAIN_STREAM) for c in clients])
    kept = fed.layout.names_of(fed.algorithm.personal_parts)
    return [
        ClientReply(client, flatten_tensors(final[n] for n in fed.layout.names)[fed.shared_mask].numpy(), loss,
                    client_data.num_train, _to_numpy({n: final[n] for n in kept}))
        for client, client_data, final, loss in zip(clients, data, finals, losses, strict=True)
    ]


def _run_task(worker: Worker, task: Callable[[Worker], Any]) -> Any:
    return task(worker)


@dataclass
class RunResult:
    """Everything a run produced, in memory; :mod:`fedbabu.results` turns it into files."""

    config: Config
    partition: Partition
    metrics: list[dict[str, Any]]
    clients: list[dict[str, Any]]
    final_state: dict[str, torch.Tensor]
    personal: Mapping[int, Personal]
    """client -> personal state: the run's :class:`PersonalStore` (its spilled states in files of the run)."""
    wall_time_s: float
    bytes_per_round_per_client: int

    def accuracy_curve(self) -> np.ndarray:
        """clients x (fine-tuning epochs + 1) accuracies; column 0 is the initial accuracy."""
        return np.array([c["accuracies"] for c in self.clients], dtype=np.float64)


class Observer:
    """Hooks for progress bars and incremental files; every method is optional."""

    def on_start(self, config: Config, partition: Partition, algorithm: Algorithm) -> None:
        """Before the first round (or the first resumed one): the setting is final, nothing has trained."""

    def on_round(self, record: dict[str, Any]) -> None:
        """After each round, with the record that goes to ``metrics.jsonl`` (plus its ``seconds``)."""

    def on_personalize_start(self, total: int) -> None:
        """Training is over; ``total`` clients are about to be fine-tuned and evaluated."""

    def on_personalized(self, done: int, total: int) -> None:
        """``done`` of ``total`` clients are personalized (called per chunk, so progress can be shown)."""

    def on_finish(self, summary: Mapping[str, Any]) -> None:
        """The run's results are final; ``summary`` is its ``summary.json`` (called by the runner, after the files)."""


def preflight(config: Config, dataset: Dataset, model_factory: ModelFactory = config_model,
              initial: bool = True) -> tuple[Algorithm, Runtime, BodyHead, bool]:
    """Everything that can refuse a run (algorithm settings, warm start, device, network, executor), checked cheaply.

    The runner calls it before it touches a run folder, so that ``--overwrite`` with a setting the
    algorithm refuses leaves the previous run intact; :func:`simulate` calls it to set up. Returns
    the algorithm, the runtime, the network at its initial weights and whether clients run vectorized.
    ``initial=False`` skips the algorithm's initial model (a warm start), which a trained federation
    personalized again does not need.
    """
    algorithm = ALGORITHMS[config.algorithm](config)
    privacy.check_algorithm(algorithm)
    runtime = runtime_for(config)
    template = network(config, dataset, model_factory, algorithm)
    if initial:
        start_global_model(algorithm, template)
    vectorized = choose_executor(config.executor, runtime.device, algorithm, template) == "vectorized"
    return algorithm, runtime, template, vectorized


def simulate(config: Config, dataset: Dataset, partition: Partition, observer: Observer | None = None,
             model_factory: ModelFactory = config_model, checkpoints: Checkpointer | None = None) -> RunResult:
    """Run one federated experiment on an already-loaded dataset and partition (and a user's network).

    With ``checkpoints`` the run folder is kept resumable, and a run restored from a checkpoint
    continues where it stopped. The clients' personal states live in a :class:`PersonalStore` holding
    at most ``personal_memory`` bytes in memory, the rest in the run folder's ``personal/`` (a
    temporary folder without checkpoints); the result keeps it.
    """
    observer = observer or Observer()
    started = time.perf_counter()
    algorithm, runtime, template, vectorized = preflight(config, dataset, model_factory)
    server = ServerState.of(algorithm, template)
    server.global_vector.share_memory_()
    federation = Federation(config, dataset, partition, algorithm, runtime, server.layout, server.global_vector,
                            model_factory)
    worker = Worker(federation)
    personal = PersonalStore(config.resolved_personal_memory(), checkpoints.personal_folder if checkpoints else None)
    metrics: list[dict[str, Any]] = []
    start_round = checkpoints.restore_into(server.global_vector, personal, metrics) if checkpoints else 0
    server.restore(config, metrics)
    # a resumed run reports its whole time: the restored records carry their rounds' seconds
    seconds_before = sum(m.get("seconds", 0.0) for m in metrics)
    layout = server.layout
    kept_shapes = personal_shapes(algorithm, dict(zip(layout.names, layout.shapes, strict=True)), layout.norms)
    observer.on_start(config, partition, algorithm)
    hardware.warn_if_bf16_is_emulated(runtime)
    evaluated = seeded_clients(config.seed, partition.num_clients, config.eval_clients)
    personalized = personalized_clients(config, partition.num_clients)
    last_round = privacy.rounds_to_run(config)  # fewer than rounds where dp.target_epsilon stops the run
    with ClientPool(functools.partial(_run_task, worker), config.resolved_workers()) as pool:
        for round_index in range(start_round, last_round):
            tick, busy_before = time.perf_counter(), pool.busy_seconds
            plan = plan_round(config, algorithm, round_index, partition.num_clients)
            if vectorized:
                replies = _train_vectorized(worker, plan.training, round_index, plan.lr, personal)
            else:
                replies = pool.map([TrainTask(c, round_index, plan.lr, personal.get(c)) for c in plan.training])
            outcome = finish_round(plan, replies, server, algorithm, config, kept_shapes)
            for reply in outcome.accepted:
                if reply.personal:
                    personal[reply.client] = dict(reply.personal)
            for client, values in outcome.server_personal.items():  # before evaluation and the checkpoint read it
                personal[client] = {**(personal.get(client) or {}), **_to_numpy(values)}
            record = outcome.record
            if config.eval_every and (plan.number % config.eval_every == 0 or plan.number == last_round):
                accuracies = list(_map_in_chunks(pool, evaluated, lambda c: EvalTask(c, personal.get(c))))
                record.test_accuracy = float(np.nanmean(accuracies))
            elapsed = time.perf_counter() - tick
            record.seconds = round(elapsed, 4)
            if not vectorized:
                record.utilization = round((pool.busy_seconds - busy_before) / (pool.workers * max(elapsed, 1e-9)), 4)
            metrics.append(record.to_json())
            observer.on_round(metrics[-1])
            if checkpoints:
                checkpoints.after_round(plan.number, server.global_vector, personal, metrics)
        if last_round < config.rounds:
            privacy.announce_stop(config, last_round)
            if checkpoints and checkpoints.saved_round != last_round:
                checkpoints.save(last_round, server.global_vector, personal, metrics)
        observer.on_personalize_start(len(personalized))
        curves = _personalize_all(pool, personal, personalized, observer)
    clients = client_records(partition, curves, personalized)
    return RunResult(
        config=config,
        partition=partition,
        metrics=metrics,
        clients=clients,
        final_state=layout.to_state(server.global_vector),
        personal=personal,
        wall_time_s=time.perf_counter() - started + seconds_before,
        bytes_per_round_per_client=2 * 4 * server.shared_floats(),
    )


def client_records(partition: Partition, curves: list[list[float]],
                   clients: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Per-client rows of a run (sizes, classes, accuracy curve), the same for every engine.

    ``curves[i]`` belongs to ``clients[i]`` (by default every client of the partition): a run that
    personalizes a sample reports only the clients it personalized.
    """
    classes = partition.classes_per_client()
    clients = range(partition.num_clients) if clients is None else clients
    return [
        {
            "client": c,
            "train_size": len(partition.train[c]),
            "test_size": len(partition.test[c]),
            "classes": int(classes[c]),
            "accuracies": curve,
        }
        for c, curve in zip(clients, curves, strict=True)
    ]


@contextlib.contextmanager
def _trained_federation(config: Config, dataset: Dataset, partition: Partition, global_vector: torch.Tensor,
                        model_factory: ModelFactory) -> Iterator[ClientPool]:
    """A worker pool over a trained federation, set up exactly as :func:`simulate` sets up its own.

    Same runtime, same worker models and the same per-client generators, so that what the clients
    do afterwards (personalize, be inspected) is bit-identical to the end of the run.
    """
    algorithm, runtime, template, _ = preflight(config, dataset, model_factory, initial=False)
    hardware.warn_if_bf16_is_emulated(runtime)
    layout = Layout(template)
    expected = flatten(template)
    if global_vector.shape != expected.shape or global_vector.dtype != expected.dtype:
        raise UserError(f"model: holds {tuple(global_vector.shape)} parameters, the network of this config has "
                        f"{tuple(expected.shape)}")
    shared = global_vector.detach().clone().share_memory_()
    worker = Worker(Federation(config, dataset, partition, algorithm, runtime, layout, shared, model_factory))
    with ClientPool(functools.partial(_run_task, worker), config.resolved_workers()) as pool:
        yield pool


def personalize_federation(config: Config, dataset: Dataset, partition: Partition, global_vector: torch.Tensor,
                           personal: Mapping[int, Personal], observer: Observer | None = None,
                           model_factory: ModelFactory = config_model, group: str = "all") -> list[list[float]]:
    """Personalize the clients of a trained federation again: what a run does after its last round.

    The clients are the run's own (:func:`personalized_clients`: all, or the run's seeded sample; only
    those of ``group`` where it is not ``all``), and the curves come in their order. With the run's own
    settings the accuracy curves are bit-identical to the run's, whatever the number of workers; with
    other fine-tuning settings only the fine-tuning differs.
    """
    observer = observer or Observer()
    clients = personalized_clients(config, partition.num_clients, group)
    with _trained_federation(config, dataset, partition, global_vector, model_factory) as pool:
        observer.on_personalize_start(len(clients))
        return _personalize_all(pool, personal, clients, observer)


@dataclass
class ClientInspection:
    """What one client's bodies make of its data, before and after personalization (fp32 features)."""

    client: int
    curve: list[float]
    global_train: np.ndarray
    global_test: np.ndarray
    personal_train: np.ndarray
    personal_test: np.ndarray
    personal_probe: np.ndarray
    personal_head: np.ndarray
    change: dict[str, float]


def relative_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], part: str) -> float:
    """||after - before|| / ||before|| over the parameters of one part (0 where the part is all zeros)."""
    names = [n for n in before if part_of(n) == part]
    moved = math.sqrt(sum(float((after[n].double() - before[n].double()).pow(2).sum()) for n in names))
    size = math.sqrt(sum(float(before[n].double().pow(2).sum()) for n in names))
    return moved / size if size > 0 else 0.0


@dataclass(frozen=True)
class ProbeTask:
    """The global body's features of a fixed set of test images, in one inference pass."""

    indices: np.ndarray

    def __call__(self, worker: Worker) -> np.ndarray:
        return body_features(worker.model(), worker.federation.probe_data(self.indices), "test").numpy()


@dataclass(frozen=True)
class InspectTask:
    """One client's features under the global body, then its personalization, then its personalized features.

    The personalization is the run's own (same generator as :class:`PersonalizeTask`), so its
    accuracy curve must equal the run's; the feature passes use no randomness and change nothing.
    """

    client: int
    personal: Personal | None
    probe: np.ndarray

    def __call__(self, worker: Worker) -> ClientInspection:
        fed = worker.federation
        model = worker.model()
        data = fed.client_data(self.client)
        global_train, global_test = body_features(model, data, "train"), body_features(model, data, "test")
        personal = _to_torch(self.personal)
        load_state(model, personal)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        curve = fed.algorithm.personalize(model, data, personal, personalize_generator(fed.config, self.client))
        after = dict(model.named_parameters())
        probe = fed.probe_data(self.probe)
        return ClientInspection(
            client=self.client, curve=curve, global_train=global_train.numpy(), global_test=global_test.numpy(),
            personal_train=body_features(model, data, "train").numpy(),
            personal_test=body_features(model, data, "test").numpy(),
            personal_probe=body_features(model, probe, "test").numpy(),
            personal_head=model.head.weight.detach().float().cpu().numpy().copy(),
            change={part: relative_change(start, after, part) for part in ("body", "head")})


def inspect_federation(config: Config, dataset: Dataset, partition: Partition, global_vector: torch.Tensor,
                       personal: Mapping[int, Personal], probe: np.ndarray,
                       consume: Callable[[ClientInspection, np.ndarray], None], observer: Observer | None = None,
                       model_factory: ModelFactory = config_model, group: str = "all") -> np.ndarray:
    """Inspect the run's personalized clients on the worker pool; return the global probe features.

    The clients are those the run personalized (:func:`personalized_clients`; only those of ``group``
    where it is not ``all``), in client order.
    The global body reads the probe images (test images given by index) first; then each client's
    :class:`ClientInspection` goes to ``consume``, with those global probe features, as soon as its
    chunk is done, so the caller keeps only what it needs (a federation's features may not fit).
    """
    observer = observer or Observer()
    clients = personalized_clients(config, partition.num_clients, group)
    with _trained_federation(config, dataset, partition, global_vector, model_factory) as pool:
        global_probe = pool.map([ProbeTask(probe)])[0]
        observer.on_personalize_start(len(clients))
        for inspection in _map_in_chunks(pool, clients, lambda c: InspectTask(c, personal.get(c), probe), observer):
            consume(inspection, global_probe)
    return global_probe


def _map_in_chunks(pool: ClientPool, clients: Sequence[int], task_for: Callable[[int], Callable[[], Any]],
                   observer: Observer | None = None) -> Iterator[Any]:
    """The clients' task results in order, computed a few per worker at a time.

    A chunk's tasks are made only when it starts, so only that chunk's personal states are read
    out of the store at once (a federation's may not fit in memory), and progress can be shown
    between chunks.
    """
    chunk = max(1, pool.workers * 4)
    for start in range(0, len(clients), chunk):
        yield from pool.map([task_for(c) for c in clients[start:start + chunk]])
        if observer is not None:
            observer.on_personalized(min(start + chunk, len(clients)), len(clients))


def _personalize_all(pool: ClientPool, personal: Mapping[int, Personal], clients: list[int],
                     observer: Observer) -> list[list[float]]:
    """Personalize the given clients on the pool; curves in their order."""
    return list(_map_in_chunks(pool, clients, lambda c: PersonalizeTask(c, personal.get(c)), observer))
