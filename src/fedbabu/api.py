"""The Python API: FedBABU and its baselines on your own data and network, from a script or a notebook.

::

    import fedbabu

    data = fedbabu.from_arrays(images, labels, client_ids=writer_of_each_image)
    config = fedbabu.load_config(extra={"rounds": 20, "algorithm": "fedbabu"})
    results = fedbabu.run(config, data=data, model=lambda: MyNet(), head="classifier")
    print(results.initial_accuracy, results.personalized_accuracy, results.folder)

:func:`run` and :func:`compare` go through the same runner as the ``fedbabu`` command line, so they
leave the same run folder; the returned objects add what a notebook wants in memory: per-round
metrics, per-client accuracies and the trained models. Bad arguments raise a ``ValueError``
(:class:`~fedbabu.errors.UserError`) whose message starts with the argument's name.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedbabu.algorithms import ALGORITHMS
from fedbabu.config import DATASETS, Config, build_config, load_config
from fedbabu.data.custom import FederatedData, from_arrays, from_torch
from fedbabu.data.datasets import Dataset
from fedbabu.data.partition import Partition
from fedbabu.engine.simulation import ModelFactory, Observer, config_model, network
from fedbabu.errors import UserError
from fedbabu.files import check_output_dir
from fedbabu.models import BodyHead
from fedbabu.models.custom import ModelSpec, check_body_head, example_batch, model_factory
from fedbabu.runner import Experiment, default_out_dir, prepare_data, run_comparison, run_experiment
from fedbabu.training import load_state

ConfigLike = Config | str | Path | None
"""A :class:`~fedbabu.config.Config`, the path of a YAML config, or ``None`` for the embedded digits experiment."""


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise ImportError("to_dataframe() needs pandas, which is not installed: pip install pandas "
                          "(everything else in fedbabu works without it)") from None
    return pandas


@dataclass(repr=False)
class Results:
    """One finished run, in memory and on disk.

    Attributes:
        config: the resolved configuration (also in ``folder/config.yaml``).
        summary: the headline numbers (``folder/summary.json``).
        metrics: one dict per round: ``round``, ``lr``, ``train_loss``, ``clients``, and
            ``test_accuracy`` on evaluation rounds (``folder/metrics.jsonl``).
        clients: one dict per personalized client (every client, or the seeded sample of
            ``personalize_clients``): ``client``, ``train_size``, ``test_size``, ``classes`` and
            ``accuracies`` (before fine-tuning, then after each fine-tuning epoch; ``folder/clients.csv``).
        partition: which samples each client held.
        model: the final global model (for FedBABU its head is still the initial one).
        personal: per-client parameters kept out of aggregation (empty for FedAvg and FedBABU).
        folder: the run folder, the same as ``fedbabu run --out`` writes.
    """

    config: Config
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    clients: list[dict[str, Any]]
    partition: Partition
    model: BodyHead
    personal: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    folder: Path | None = None

    @property
    def initial_accuracy(self) -> float:
        """Mean over clients of the global model's accuracy on each client's test set."""
        return float(self.summary["initial_accuracy"]["mean"])

    @property
    def personalized_accuracy(self) -> float:
        """Mean over clients of the accuracy after fine-tuning on each client's own training data."""
        return float(self.summary["personalized_accuracy"]["mean"])

    def accuracy_curve(self) -> np.ndarray:
        """Clients x (fine-tuning epochs + 1) accuracies; column 0 is the initial accuracy."""
        return np.array([c["accuracies"] for c in self.clients], dtype=np.float64)

    def client_model(self, client: int) -> BodyHead:
        """The model client ``client`` starts personalization from: the global one with its personal parts."""
        total = self.partition.num_clients
        if not 0 <= client < total:
            raise UserError(f"client: expected a client index in 0..{total - 1}, got {client!r}")
        model = copy.deepcopy(self.model)
        load_state(model, {k: torch.from_numpy(v) for k, v in self.personal.get(client, {}).items()})
        return model

    def to_dataframe(self, table: str = "clients") -> Any:
        """A pandas DataFrame of the ``"clients"`` table (one row per client) or the ``"rounds"`` table.

        Raises ``ImportError`` with an install hint when pandas is not installed.
        """
        if table not in ("clients", "rounds"):
            raise UserError(f"table: expected 'clients' or 'rounds', got {table!r}")
        pandas = _pandas()
        if table == "rounds":
            return pandas.DataFrame(self.metrics)
        rows = []
        for c in self.clients:
            row = {k: c[k] for k in ("client", "train_size", "test_size", "classes")}
            row["initial_accuracy"] = c["accuracies"][0]
            row.update({f"accuracy_after_epoch_{e}": a for e, a in enumerate(c["accuracies"][1:], start=1)})
            rows.append(row)
        return pandas.DataFrame(rows)

    def __repr__(self) -> str:
        total = self.partition.num_clients
        clients = f"{total} clients" if len(self.clients) == total else f"{len(self.clients)} of {total} clients"
        return (f"Results({self.config.algorithm} on {self.config.dataset}, {clients}: initial "
                f"{100 * self.initial_accuracy:.2f}%, personalized {100 * self.personalized_accuracy:.2f}%, "
                f"folder={str(self.folder)!r})")


@dataclass(repr=False)
class ComparisonResults:
    """Several algorithms on the same partitions and seeds.

    Attributes:
        rows: one dict per algorithm (the table ``fedbabu compare`` prints; ``folder/comparison.csv``).
        runs: algorithm -> its :class:`Results`, one per seed.
        folder: the comparison folder (``comparison.md``, plots, and one run folder per algorithm).
    """

    rows: list[dict[str, Any]]
    runs: dict[str, list[Results]]
    folder: Path

    def to_dataframe(self) -> Any:
        """The comparison table as a pandas DataFrame; ``ImportError`` with a hint without pandas."""
        return _pandas().DataFrame(self.rows)

    def __repr__(self) -> str:
        table = ", ".join(f"{r['algorithm']} {100 * r['initial_mean']:.2f}% -> {100 * r['personalized_mean']:.2f}%"
                          for r in self.rows)
        return f"ComparisonResults({table}; folder={str(self.folder)!r})"


@dataclass
class _Setup:
    config: Config
    dataset: Dataset
    partition: Partition | None
    factory: ModelFactory


def _config(config: ConfigLike) -> Config:
    if config is None or isinstance(config, (str, Path)):
        return load_config(Path(config) if config is not None else None)
    if isinstance(config, Config):
        return config
    raise UserError(f"config: expected a fedbabu.Config, a YAML path or None, got {type(config).__name__}")


def _data(data: Any) -> FederatedData | None:
    if data is None or isinstance(data, FederatedData):
        return data
    if isinstance(data, Dataset):
        return FederatedData(data)
    if isinstance(data, tuple) and len(data) == 2:
        return from_arrays(*data)
    if isinstance(data, torch.utils.data.Dataset):
        return from_torch(data)
    raise UserError(f"data: expected fedbabu.from_arrays(...)/from_torch(...), an (x, y) pair or a torch "
                    f"Dataset, got {type(data).__name__}")


def _setup(config: ConfigLike, data: Any, model: ModelSpec | None, head: str | None) -> _Setup:
    """Resolve the arguments of run/compare, and check a user's network on a batch before any training."""
    resolved = _config(config)
    given = _data(data)
    updates: dict[str, Any] = {}
    if given is not None:
        known = given.dataset.name in DATASETS
        updates["dataset"] = given.dataset.name if known else "custom"
        if given.partition is not None:
            updates.update(partition="natural", num_clients=given.partition.num_clients)
    if model is not None:
        updates["model"] = "custom"
    elif head is not None:
        raise UserError("head: names a layer of your own network, so it needs model= as well")
    elif resolved.model == "custom":
        raise UserError("model: 'custom' means a network given in Python; pass it as fedbabu.run(config, model=...)")
    if updates:
        resolved = build_config({**resolved.to_plain(), **updates}, "config")
    dataset = given.dataset if given is not None else prepare_data(resolved)
    images = dataset.train_x.dtype == torch.uint8
    if not images and model is None:
        raise UserError("model: feature vectors (2-D x) need your own network; pass model= (e.g. an MLP) and head=")
    if not images and resolved.augment_enabled():
        raise UserError("config: augment crops and flips images, but the data are feature vectors; set augment: off")
    if images and model is None and dataset.train_x.shape[1] != dataset.train_x.shape[2]:
        raise UserError(f"data: the built-in models need square images, got {tuple(dataset.train_x.shape[1:3])}; "
                        "pass model= with your own network")
    factory = model_factory(model, head) if model is not None else config_model
    if model is not None or given is not None:
        try:
            network = factory(resolved, dataset)
        except ValueError as exc:
            if model is not None or isinstance(exc, UserError):
                raise
            raise UserError(f"model: {exc}; choose another model in the config or pass model=") from None
        check_body_head(network, example_batch(dataset), dataset.num_classes)
    return _Setup(resolved, dataset, given.partition if given is not None else None, factory)


def _check_progress(progress: Any) -> None:
    if not isinstance(progress, (bool, Observer)):
        raise UserError(f"progress: expected True, False or a fedbabu.Observer, got {type(progress).__name__}")


def _observer(progress: bool | Observer, label: str) -> Observer | None:
    """Live rich bars where they can redraw (a terminal, Jupyter with ipywidgets), plain lines elsewhere."""
    if isinstance(progress, Observer):
        return progress
    if not progress:
        return None
    from rich.console import Console

    from fedbabu.progress import progress_display

    return progress_display(label, Console())


def _results(experiment: Experiment, dataset: Dataset, factory: ModelFactory) -> Results:
    result = experiment.result
    model = network(result.config, dataset, factory)
    load_state(model, result.final_state)
    return Results(result.config, experiment.summary, result.metrics, result.clients, result.partition, model,
                   result.personal, experiment.folder)


def run(config: ConfigLike = None, *, data: Any = None, model: ModelSpec | None = None, head: str | None = None,
        out: str | Path | None = None, overwrite: bool = False, progress: bool | Observer = True) -> Results:
    """Run one federated experiment and return its :class:`Results`; its folder is written to ``out``.

    Args:
        config: a :class:`~fedbabu.config.Config` (e.g. ``fedbabu.load_config(extra={...})``), a YAML
            path, or ``None`` for the embedded digits experiment.
        data: your data (:func:`~fedbabu.data.custom.from_arrays`, :func:`~fedbabu.data.custom.from_torch`,
            an ``(x, y)`` pair or a ``torch.utils.data.Dataset``); ``None`` loads ``config.dataset``.
            A natural partition (``client_ids``) replaces ``num_clients`` and ``partition``.
        model: your network: an ``nn.Module`` (its weights are the initial ones, e.g. pretrained) or a
            function returning one (called with torch seeded from ``config.seed``, so the initial
            weights follow the seed); a :class:`~fedbabu.models.BodyHead` or split at ``head``.
            ``None`` builds ``config.model``.
        head: the name of the network's final ``nn.Linear`` layer, e.g. ``"fc"``.
        out: the run folder (default ``runs/<time>-<algorithm>``), which must be empty unless ``overwrite``.
        progress: ``True`` for live progress bars (rich) in a terminal or in Jupyter with ipywidgets, and
            one line per evaluation round elsewhere (logs, notebooks without ipywidgets); ``False``
            for silence; or your own :class:`~fedbabu.engine.simulation.Observer`.
    """
    _check_progress(progress)
    if out is not None:
        check_output_dir(Path(out), overwrite, "out", "overwrite=True")
    setup = _setup(config, data, model, head)
    folder = Path(out) if out is not None else default_out_dir(setup.config.algorithm)
    experiment = run_experiment(setup.config, folder, _observer(progress, setup.config.algorithm), overwrite,
                                dataset=setup.dataset, partition=setup.partition, model_factory=setup.factory)
    return _results(experiment, setup.dataset, setup.factory)


def compare(config: ConfigLike = None, algorithms: Sequence[str] = ("fedavg", "fedbabu"), *,
            seeds: Sequence[int] | None = None, data: Any = None, model: ModelSpec | None = None,
            head: str | None = None, out: str | Path | None = None, overwrite: bool = False,
            progress: bool | Observer = True) -> ComparisonResults:
    """Run several algorithms on the same partitions and seeds, like ``fedbabu compare``.

    ``config``, ``data``, ``model``, ``head``, ``overwrite`` and ``progress`` are as in :func:`run`
    (the config's ``algorithm`` is replaced by each of ``algorithms``); ``seeds`` defaults to the
    config's seed; ``out`` defaults to ``runs/<time>-compare``.
    """
    if isinstance(algorithms, str) or not algorithms or not all(isinstance(a, str) for a in algorithms):
        raise UserError(f"algorithms: expected a list of algorithm names such as ['fedavg', 'fedbabu'], got "
                        f"{algorithms!r}")
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise UserError(f"algorithms: unknown {unknown}; expected names from {', '.join(sorted(ALGORITHMS))}")
    if seeds is not None and (isinstance(seeds, (str, int)) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise UserError(f"seeds: expected a list of integers >= 0, got {seeds!r}")
    _check_progress(progress)
    if out is not None:
        check_output_dir(Path(out), overwrite, "out", "overwrite=True")
    setup = _setup(config, data, model, head)
    folder = Path(out) if out is not None else default_out_dir("compare")

    def observer_for(algorithm: str, seed: int) -> Observer | None:
        return _observer(progress, f"{algorithm} seed {seed}")

    comparison = run_comparison(setup.config, list(algorithms), folder, list(seeds) if seeds else None,
                                observer_for, overwrite, dataset=setup.dataset, partition=setup.partition,
                                model_factory=setup.factory)
    runs = {a: [_results(e, setup.dataset, setup.factory) for e in experiments]
            for a, experiments in comparison.experiments.items()}
    return ComparisonResults(comparison.rows, runs, comparison.folder)


def personalize(run_dir: str | Path, *, finetune: dict[str, Any] | None = None, out: str | Path | None = None,
                overwrite: bool = False, workers: int | str | None = None, device: str | None = None,
                data_dir: str | Path | None = None, progress: bool | Observer = True,
                clients: str = "all", model: str = "final") -> Results:
    """Personalize every client of a finished run again, like ``fedbabu personalize RUN_DIR``.

    ``finetune`` changes fine-tuning settings (``{"part": "head", "epochs": 20}``); nothing that
    shaped the training may change. Results go to ``out`` (default ``<run_dir>/personalize/<settings>``);
    the run's own files are never written. With the run's own settings the result equals the run's.
    ``clients`` (``--clients``): ``all``, or only the ``seen`` or the ``unseen`` (held-out) clients.
    ``model`` (``--model``): ``final``, or ``initial`` to start them from the run's untrained initial model.
    """
    from fedbabu.personalization import personalize_run

    if finetune is not None and not isinstance(finetune, dict):
        raise UserError(f"finetune: expected a dict of fine-tuning settings such as {{'epochs': 10}}, got "
                        f"{type(finetune).__name__}")
    _check_progress(progress)
    if out is not None:
        check_output_dir(Path(out), overwrite, "out", "overwrite=True")
    overrides: dict[str, Any] = {"finetune": dict(finetune)} if finetune else {}
    for key, value in (("workers", workers), ("device", device), ("data_dir", data_dir)):
        if value is not None:
            overrides[key] = str(value) if isinstance(value, Path) else value
    experiment, dataset = personalize_run(Path(run_dir), overrides, Path(out) if out is not None else None,
                                          overwrite, _observer(progress, f"personalize {run_dir}"), source="finetune",
                                          group=clients, model=model)
    return _results(experiment, dataset, config_model)


def analyze(run_dirs: str | Path | Sequence[str | Path], *, out: str | Path | None = None, probe_size: int = 1000,
            pair_clients: int = 20, overwrite: bool = False, workers: int | str | None = None,
            device: str | None = None, data_dir: str | Path | None = None,
            progress: bool | Observer = True, clients: str = "all") -> Any:
    """Measure the bodies and heads of finished runs, like ``fedbabu analyze RUN_DIR ...``.

    ``clients`` (``--clients``): ``all``, or only the ``seen`` or the ``unseen`` (held-out) clients.

    Returns an :class:`~fedbabu.analysis.Analysis`: ``folder`` (where ``analysis.json``,
    ``analysis.md`` and the plots are) and ``runs``, one dict per run with every number of its
    ``analysis.json``. Several runs also get one comparison (``comparison.md``) and overlaid plots.
    """
    from fedbabu.analysis import analyze as analyze_runs

    folders = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(f) for f in run_dirs]
    _check_progress(progress)
    for name, value in (("probe_size", probe_size), ("pair_clients", pair_clients)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{name}: expected an integer, got {value!r}")
    if out is not None:
        check_output_dir(Path(out), overwrite, "out", "overwrite=True")
    overrides: dict[str, Any] = {}
    for key, value in (("workers", workers), ("device", device), ("data_dir", data_dir)):
        if value is not None:
            overrides[key] = str(value) if isinstance(value, Path) else value
    return analyze_runs(folders, Path(out) if out is not None else None, probe_size, pair_clients, overrides,
                        overwrite, lambda label: _observer(progress, f"analyze {label}"), group=clients)
