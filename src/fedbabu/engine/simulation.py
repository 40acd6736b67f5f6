"""The federated loop of the simulator: sample, train clients, aggregate, evaluate, personalize.

The loop is algorithm-agnostic: it asks the algorithm which parts are shared and which are
personal, runs :meth:`~fedbabu.algorithms.base.Algorithm.client_update` for the clients it trains in a
round (``training_clients``: by default the sampled ones) on the :class:`~fedbabu.engine.pool.ClientPool`,
and averages only the shared parts.
"""

from __future__ import annotations

import contextlib
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
from fedbabu.engine import faults, hardware
from fedbabu.engine.checkpoint import Checkpointer
from fedbabu.engine.params import Layout, apply_server_update, flatten, flatten_tensors, load_flat, weighted_mean
from fedbabu.engine.personal import Personal, PersonalStore
from fedbabu.engine.pool import ClientPool
from fedbabu.engine.vectorized import choose_executor, vectorized_sgd
from fedbabu.errors import UserError
from fedbabu.models import BodyHead, build_model, in_parts, part_of
from fedbabu.training import ClientData, Runtime, body_features, load_state

SAMPLER_STREAM, TRAIN_STREAM, PERSONALIZE_STREAM, DROPOUT_STREAM, HEAD_STREAM = 0x5A3, 0x7E1, 0x9E2, 0xD20, 0x4EA
CLIENT_ORDER_STREAM = 0xC0D

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


def stream_seed(*words: int) -> int:
    """A 63-bit seed that depends on every word (seed, round, client, purpose) and nothing else."""
    state = np.random.SeedSequence([w & 0xFFFFFFFF for w in words]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def client_generator(seed: int, round_index: int, client: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, round_index, client, stream))


def personalize_generator(config: Config, client: int) -> torch.Generator:
    """The generator of a client's final fine-tuning: the same in a run, ``personalize``, ``analyze`` and Flower."""
    return client_generator(config.seed, config.rounds, client, PERSONALIZE_STREAM)


def sample_clients(seed: int, round_index: int, num_clients: int, fraction: float) -> list[int]:
    """The clients of a round: ``max(1, floor(f * N))`` of them, a pure function of (seed, round)."""
    count = max(1, int(fraction * num_clients))
    rng = np.random.default_rng(stream_seed(seed, round_index, 0, SAMPLER_STREAM))
    return sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False))


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


def personalized_clients(config: Config, num_clients: int) -> list[int]:
    """The clients a run (and everything that re-derives its personalization) fine-tunes and reports."""
    return seeded_clients(config.seed, num_clients, config.personalize_clients)


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


_FEDERATION: Federation | None = None
_MODEL: BodyHead | None = None


def _worker_model() -> BodyHead:
    """One model per process, re-loaded from the shared global vector for every task (no deep copies)."""
    global _MODEL
    if _MODEL is None:
        _MODEL = _FEDERATION.new_model()
    load_flat(_MODEL, _FEDERATION.global_vector)
    return _MODEL


def _to_numpy(state: dict[str, torch.Tensor]) -> Personal:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _to_torch(state: Personal | None) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in (state or {}).items()}


@dataclass(frozen=True)
class TrainTask:
    client: int
    round: int
    lr: float
    personal: Personal | None

    def __call__(self) -> tuple[np.ndarray, float, Personal, Personal]:
        fed = _FEDERATION
        model = _worker_model()
        generator = client_generator(fed.config.seed, self.round, self.client, TRAIN_STREAM)
        update = fed.algorithm.client_update(model, fed.client_data(self.client), _to_torch(self.personal),
                                             self.lr, generator)
        return (flatten(model)[fed.shared_mask].numpy(), update.loss, _to_numpy(update.personal),
                _to_numpy(update.statistics))


@dataclass(frozen=True)
class EvalTask:
    client: int
    personal: Personal | None

    def __call__(self) -> float:
        return _FEDERATION.algorithm.evaluate_client(_worker_model(), _FEDERATION.client_data(self.client),
                                                     _to_torch(self.personal))


@dataclass(frozen=True)
class PersonalizeTask:
    client: int
    personal: Personal | None

    def __call__(self) -> list[float]:
        fed = _FEDERATION
        return fed.algorithm.personalize(_worker_model(), fed.client_data(self.client), _to_torch(self.personal),
                                         personalize_generator(fed.config, self.client))


def _train_vectorized(clients: list[int], round_index: int, lr: float,
                      personal: Mapping[int, Personal]) -> list[tuple[np.ndarray, float, Personal, Personal]]:
    """The round's clients trained together in this process; the same triples a :class:`TrainTask` returns."""
    fed = _FEDERATION
    model = _worker_model()
    device = fed.runtime.device
    base = {name: param.detach() for name, param in model.named_parameters()}
    starts = [{**base, **{k: v.to(device) for k, v in _to_torch(personal.get(c)).items()}} for c in clients]
    finals, losses = vectorized_sgd(
        model, [fed.client_data(c) for c in clients], starts, fed.algorithm.trained_parts,
        fed.algorithm.local_training(lr),
        [client_generator(fed.config.seed, round_index, c, TRAIN_STREAM) for c in clients])
    kept = [name for name in fed.layout.names if in_parts(name, fed.algorithm.personal_parts)]
    return [
        (flatten_tensors(final[n] for n in fed.layout.names)[fed.shared_mask].numpy(), loss,
         _to_numpy({n: final[n] for n in kept}), {})
        for final, loss in zip(finals, losses, strict=True)
    ]


def _run_task(task: Callable[[], Any]) -> Any:
    return task()


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
    runtime = runtime_for(config)
    template = network(config, dataset, model_factory, algorithm)
    if initial:
        algorithm.initialize(template)
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
    global _FEDERATION, _MODEL
    observer = observer or Observer()
    started = time.perf_counter()
    algorithm, runtime, template, vectorized = preflight(config, dataset, model_factory)
    layout = Layout(template)
    global_vector = flatten(template).share_memory_()
    federation = Federation(config, dataset, partition, algorithm, runtime, layout, global_vector, model_factory)
    shared_mask = federation.shared_mask
    _FEDERATION, _MODEL = federation, None
    personal = PersonalStore(config.resolved_personal_memory(), checkpoints.personal_folder if checkpoints else None)
    metrics: list[dict[str, Any]] = []
    start_round = checkpoints.restore_into(global_vector, personal, metrics) if checkpoints else 0
    # a resumed run reports its whole time: the restored records carry their rounds' seconds
    seconds_before = sum(m.get("seconds", 0.0) for m in metrics)
    personal_shapes = algorithm.personal_shapes(dict(zip(layout.names, layout.shapes, strict=True)))
    observer.on_start(config, partition, algorithm)
    hardware.warn_if_bf16_is_emulated(runtime)
    evaluated = seeded_clients(config.seed, partition.num_clients, config.eval_clients)
    personalized = personalized_clients(config, partition.num_clients)
    try:
        with ClientPool(_run_task, config.resolved_workers()) as pool:
            for round_index in range(start_round, config.rounds):
                tick, busy_before = time.perf_counter(), pool.busy_seconds
                sampled = algorithm.training_clients(
                    sample_clients(config.seed, round_index, partition.num_clients, config.client_fraction),
                    partition.num_clients)
                dropped = faults.dropped_clients(sampled, config.client_failure_rate,
                                                 stream_seed(config.seed, round_index, 0, DROPOUT_STREAM))
                returned = [c for c in sampled if c not in dropped]
                lr = config.lr_at(round_index)
                if vectorized:
                    results = _train_vectorized(returned, round_index, lr, personal)
                else:
                    results = pool.map([TrainTask(c, round_index, lr, personal.get(c)) for c in returned])
                screening = faults.screen_round(round_index + 1, returned, [r[0] for r in results],
                                                [r[2] for r in results], global_vector[shared_mask].numpy(),
                                                personal_shapes, config.max_update_norm)
                accepted = [(returned[i], results[i]) for i in screening.accepted]
                weights = [len(partition.train[c]) for c, _ in accepted]
                if shared_mask.any() and accepted:
                    vectors = [torch.from_numpy(vector) for _, (vector, *_) in accepted]
                    previous = global_vector[shared_mask].clone()
                    global_vector[shared_mask] = weighted_mean(vectors, weights)
                    apply_server_update(algorithm, layout, global_vector, previous,
                                        [_to_torch(statistics) for _, (*_, statistics) in accepted])
                for client, (_, _, state, _) in accepted:
                    if state:
                        personal[client] = state
                losses = [loss for _, (_, loss, *_) in accepted]
                record: dict[str, Any] = {
                    "round": round_index + 1,
                    "lr": lr,
                    "train_loss": float(np.average(losses, weights=weights)) if losses else math.nan,
                    "clients": sampled,
                    "dropped": len(dropped),
                    "rejected": len(screening.rejected),
                }
                faults.check_divergence(round_index + 1, screening, bool(torch.isfinite(global_vector).all()),
                                        record["train_loss"])
                if not accepted:
                    faults.report_empty_round(round_index + 1)
                last = round_index + 1 == config.rounds
                if config.eval_every and ((round_index + 1) % config.eval_every == 0 or last):
                    accuracies = list(_map_in_chunks(pool, evaluated, lambda c: EvalTask(c, personal.get(c))))
                    record["test_accuracy"] = float(np.nanmean(accuracies))
                elapsed = time.perf_counter() - tick
                record["seconds"] = round(elapsed, 4)
                if not vectorized:
                    record["utilization"] = round(
                        (pool.busy_seconds - busy_before) / (pool.workers * max(elapsed, 1e-9)), 4)
                metrics.append(record)
                observer.on_round(record)
                if checkpoints:
                    checkpoints.after_round(round_index + 1, global_vector, personal, metrics)
            observer.on_personalize_start(len(personalized))
            curves = _personalize_all(pool, personal, personalized, observer)
    finally:
        _FEDERATION, _MODEL = None, None
    clients = client_records(partition, curves, personalized)
    shared_floats = layout.count(algorithm.shared_parts)
    return RunResult(
        config=config,
        partition=partition,
        metrics=metrics,
        clients=clients,
        final_state=layout.to_state(global_vector),
        personal=personal,
        wall_time_s=time.perf_counter() - started + seconds_before,
        bytes_per_round_per_client=2 * 4 * shared_floats,
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
    global _FEDERATION, _MODEL
    algorithm, runtime, template, _ = preflight(config, dataset, model_factory, initial=False)
    hardware.warn_if_bf16_is_emulated(runtime)
    layout = Layout(template)
    expected = flatten(template)
    if global_vector.shape != expected.shape or global_vector.dtype != expected.dtype:
        raise UserError(f"model: holds {tuple(global_vector.shape)} parameters, the network of this config has "
                        f"{tuple(expected.shape)}")
    shared = global_vector.detach().clone().share_memory_()
    _FEDERATION, _MODEL = Federation(config, dataset, partition, algorithm, runtime, layout, shared,
                                     model_factory), None
    try:
        with ClientPool(_run_task, config.resolved_workers()) as pool:
            yield pool
    finally:
        _FEDERATION, _MODEL = None, None


def personalize_federation(config: Config, dataset: Dataset, partition: Partition, global_vector: torch.Tensor,
                           personal: Mapping[int, Personal], observer: Observer | None = None,
                           model_factory: ModelFactory = config_model) -> list[list[float]]:
    """Personalize the clients of a trained federation again: what a run does after its last round.

    The clients are the run's own (:func:`personalized_clients`: all, or the run's seeded sample),
    and the curves come in their order. With the run's own settings the accuracy curves are
    bit-identical to the run's, whatever the number of workers; with other fine-tuning settings
    only the fine-tuning differs.
    """
    observer = observer or Observer()
    clients = personalized_clients(config, partition.num_clients)
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

    def __call__(self) -> np.ndarray:
        return body_features(_worker_model(), _FEDERATION.probe_data(self.indices), "test").numpy()


@dataclass(frozen=True)
class InspectTask:
    """One client's features under the global body, then its personalization, then its personalized features.

    The personalization is the run's own (same generator as :class:`PersonalizeTask`), so its
    accuracy curve must equal the run's; the feature passes use no randomness and change nothing.
    """

    client: int
    personal: Personal | None
    probe: np.ndarray

    def __call__(self) -> ClientInspection:
        fed = _FEDERATION
        model = _worker_model()
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
                       model_factory: ModelFactory = config_model) -> np.ndarray:
    """Inspect the run's personalized clients on the worker pool; return the global probe features.

    The clients are those the run personalized (:func:`personalized_clients`), in client order.
    The global body reads the probe images (test images given by index) first; then each client's
    :class:`ClientInspection` goes to ``consume``, with those global probe features, as soon as its
    chunk is done, so the caller keeps only what it needs (a federation's features may not fit).
    """
    observer = observer or Observer()
    clients = personalized_clients(config, partition.num_clients)
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
