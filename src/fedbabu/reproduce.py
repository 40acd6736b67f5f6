"""The paper's experiments as presets: grids of cells, each cell a set of algorithms x seeds.

A preset is a YAML file in ``configs/paper/`` (base config, grid over config keys, rounds per
local-epoch setting, a ``quick`` variant). Every run of a cell is an ordinary run folder; a run
whose folder already holds a complete result for the same configuration is skipped, so an
interrupted grid continues where it stopped.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedbabu.algorithms import ALGORITHMS
from fedbabu.algorithms.base import PERSONALIZATION_PROTOCOL, recorded_versions
from fedbabu.config import Config, build_config, merge_dicts, nested, parse_value, read_yaml
from fedbabu.engine.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint
from fedbabu.engine.faults import TrainingDiverged
from fedbabu.errors import UserError
from fedbabu.files import atomic_write_text
from fedbabu.results import holdout
from fedbabu.results.paired import PairedDifference, paired_difference, paired_reference
from fedbabu.results.plots import plot_comparison, plot_finetune_curves, plot_paired_differences
from fedbabu.results.rebuild import read_clients
from fedbabu.results.report import epsilon_cell, largest_epsilon, seed_standard_error

PRESET_DIR = Path(__file__).resolve().parent / "presets"
"""Shipped with the package, so `reproduce` works from an installed wheel; `configs/paper` links here."""


class QuickScale(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rounds_divisor: int = Field(16, ge=1)
    set: dict[str, Any] = Field(default_factory=dict)


class PresetOverrides(BaseModel):
    """How one algorithm of a preset departs from its cell: the authors run some baselines with their
    own lr or budget (LG-FedAvg after FedAvg at lr 0.001 for a quarter of the rounds, local training
    for 160 epochs)."""

    model_config = ConfigDict(extra="forbid")
    set: dict[str, Any] = Field(default_factory=dict)
    rounds_per_local_epochs: dict[int, int] = Field(default_factory=dict)
    """Its rounds by the cell's ``local_epochs``, in place of the preset's table."""


CELL_KEYS = ("algorithm", *Config.keys_with_role("data"))
"""Keys an algorithm's settings cannot change: the algorithms of a cell share its data, partition and seeds
(the ``data`` role)."""


class Preset(BaseModel):
    """One experiment of the paper: which algorithms, seeds and config cells it runs."""

    model_config = ConfigDict(extra="forbid")
    title: str
    algorithms: list[str]
    seeds: list[int]
    base: dict[str, Any]
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    rounds_per_local_epochs: dict[int, int] = Field(default_factory=dict)
    algorithm_settings: dict[str, PresetOverrides] = Field(default_factory=dict)
    quick: QuickScale = Field(default_factory=QuickScale)

    @model_validator(mode="after")
    def _settings_of_own_algorithms(self) -> Preset:
        for algorithm, settings in self.algorithm_settings.items():
            if algorithm not in self.algorithms:
                raise ValueError(f"algorithm_settings: {algorithm!r} is not one of the preset's algorithms")
            fixed = [key for key in CELL_KEYS if key in settings.set]
            if fixed:
                raise ValueError(f"algorithm_settings.{algorithm}.set: {fixed[0]} is shared by every algorithm of "
                                 "a cell (set it in base or grid)")
            if "rounds" in settings.set and settings.rounds_per_local_epochs:
                raise ValueError(f"algorithm_settings.{algorithm}: give rounds in set or rounds_per_local_epochs, "
                                 "not both")
        return self


@dataclass(frozen=True)
class Cell:
    """One point of a grid: a name like ``local_epochs=1,shards_per_client=10``, its grid coordinates
    and its full config values (``own``: those of the algorithms with settings of their own)."""

    name: str
    values: dict[str, Any]
    point: dict[str, Any]
    own: dict[str, dict[str, Any]] = field(default_factory=dict)

    def values_for(self, algorithm: str) -> dict[str, Any]:
        return self.own.get(algorithm, self.values)


def list_presets(folder: Path | None = None) -> dict[str, Preset]:
    folder = folder or PRESET_DIR
    return {path.stem: load_preset(path.stem, folder) for path in sorted(folder.glob("*.yaml"))}


def load_preset(name: str, folder: Path | None = None) -> Preset:
    folder = folder or PRESET_DIR
    path = folder / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise UserError(f"reproduce: unknown experiment {name!r}; expected one of {known}")
    try:
        return Preset.model_validate(read_yaml(path))
    except ValidationError as err:
        first = err.errors()[0]
        where = "".join(f"{part}: " for part in [".".join(map(str, first["loc"]))] if part)
        raise UserError(f"{path}: {where}{first['msg'].removeprefix('Value error, ')}") from None


def cells(preset: Preset, scale: str = "full") -> list[Cell]:
    """Expand the grid; rounds follow ``local_epochs`` so every cell does the same local computation."""
    keys = list(preset.grid)
    result = []
    for combo in itertools.product(*(preset.grid[k] for k in keys)) if keys else [()]:
        values = merge_dicts(preset.base, nested(dict(zip(keys, combo, strict=True))))
        tau = values.get("local_epochs", 1)
        if "rounds" not in values:
            if tau not in preset.rounds_per_local_epochs:
                raise UserError(f"preset: no rounds given for local_epochs={tau} (rounds_per_local_epochs)")
            values["rounds"] = preset.rounds_per_local_epochs[tau]
        own = {a: _own_values(a, settings, values, tau) for a, settings in preset.algorithm_settings.items()}
        if scale == "quick":
            values = _quick(preset, values)
            own = {a: _quick(preset, v) for a, v in own.items()}
        point = dict(zip(keys, combo, strict=True))
        name = ",".join(f"{k}={v}" for k, v in point.items()) or "default"
        result.append(Cell(name, values, point, own))
    return result


def _own_values(algorithm: str, settings: PresetOverrides, values: dict[str, Any], tau: int) -> dict[str, Any]:
    """A cell's values for an algorithm with settings of its own; its rounds follow the cell's tau."""
    own = merge_dicts(values, settings.set)
    if settings.rounds_per_local_epochs:
        if tau not in settings.rounds_per_local_epochs:
            raise UserError(f"preset: algorithm_settings.{algorithm}: no rounds given for local_epochs={tau} "
                            "(rounds_per_local_epochs)")
        own["rounds"] = settings.rounds_per_local_epochs[tau]
    return own


def _quick(preset: Preset, values: dict[str, Any]) -> dict[str, Any]:
    values = merge_dicts(values, preset.quick.set)
    values["rounds"] = max(2, values["rounds"] // preset.quick.rounds_divisor)
    return values


def parse_selection(preset: Preset, pairs: list[str]) -> dict[str, list[Any]]:
    """``["local_epochs=1,10"]`` as ``{"local_epochs": [1, 10]}``, checked against the grid (and
    ``algorithm`` against the preset's algorithms): a typo must stop the command rather than quietly
    select no run at all."""
    selection: dict[str, list[Any]] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--only {pair!r}: expected key=value[,value...], e.g. --only local_epochs=10")
        choices = preset.algorithms if key == "algorithm" else preset.grid.get(key)
        if choices is None:
            keys = ", ".join(preset.grid) or "none, the preset is a single cell"
            raise UserError(f"--only {pair!r}: {key!r} is not a grid key of this preset "
                            f"(grid keys: {keys}; or algorithm)")
        values = [part.strip() if key == "algorithm" else parse_value(part.strip()) for part in raw.split(",")]
        if any(value not in choices for value in values):
            raise UserError(f"--only {pair!r}: {key} takes one of {', '.join(map(str, choices))} in this preset")
        selection.setdefault(key, []).extend(values)
    return selection


def _selected(cell: Cell, algorithm: str, selection: dict[str, list[Any]]) -> bool:
    """Whether ``--only`` picks this algorithm's runs on this cell."""
    return algorithm in selection.get("algorithm", [algorithm]) and \
        all(cell.point[key] in values for key, values in selection.items() if key != "algorithm")


EVALUATION_KEYS = Config.keys_with_role("evaluation", "runtime")
"""Keys that cannot change what a run trained (the ``evaluation`` and ``runtime`` roles): a finished run is
reused when only these differ."""

RUNTIME_KEYS = Config.keys_with_role("runtime")
"""Where a run computes: a personalization made elsewhere is reused whatever its own values were."""


def training_values(config: Config) -> dict[str, Any]:
    """What shaped a run's training: its config less the evaluation-only keys and the settings of
    other algorithms (a default changed for Ditto does not make a FedAvg run stale)."""
    others = set(ALGORITHMS) - {config.algorithm}
    values = {k: v for k, v in config.to_plain().items() if k not in EVALUATION_KEYS and k not in others}
    for key in ALGORITHMS[config.algorithm].Settings.evaluation_keys:
        values[config.algorithm].pop(key, None)
    return values


def _moved_warm_start(saved: Config, planned: Config, folder: Path) -> Config:
    """``saved`` starting from the planned warm-start run when it started from the run at the same place
    of a preset folder that has moved since (copied into a repository, onto another disk).

    A run records its warm start as an absolute path, but within a preset the start is the cell's own
    run (``<cell>/fedavg/seed-N``, or ``<cell>/<algorithm>/fedavg-phase/seed-N``): the path's place in
    the preset folder, not where that folder lies, is what shaped the training. A warm start outside the
    preset folder (one a user named) is still compared by its path.
    """
    warm = ALGORITHMS[saved.algorithm].warm_start
    if warm is None or saved.algorithm != planned.algorithm:
        return saved
    old, new = warm.folder(saved), warm.folder(planned)
    if old is None or new is None:
        return saved
    cell = folder.resolve().parents[1]  # a run folder is <out>/<cell>/<algorithm>/seed-N
    try:
        place = (cell.name, *Path(new).resolve().relative_to(cell).parts)
    except ValueError:
        return saved
    return warm.with_folder(saved, Path(new)) if Path(old).parts[-len(place):] == place else saved


def _recorded(folder: Path) -> dict[str, int]:
    """The algorithm versions a finished run records (1 for a run of a build that recorded none)."""
    try:
        return recorded_versions(json.loads((folder / "summary.json").read_text()))
    except (OSError, json.JSONDecodeError):
        return {"training": 0, "evaluation": 0}


def _current(folder: Path, algorithm: str, kind: str) -> bool:
    """Whether a finished run (or personalization folder) was made by this build's ``kind`` (``training`` or
    ``evaluation``) version of its algorithm."""
    return _recorded(folder)[kind] == getattr(ALGORITHMS[algorithm], f"{kind}_version")


def _state(folder: Path, config: Config) -> str:
    """``done`` (finished, trained as this config trains), ``stale`` (finished with this config by a
    build whose algorithm trained differently), ``diverged`` (stopped by divergence, same config),
    ``resumable`` (checkpointed, same config up to the keys a resume may change, such as the number of
    workers) or ``new``."""
    from fedbabu.runner import config_differences

    saved = folder / "config.yaml"
    if not saved.exists():
        return "new"
    try:
        saved_config = _moved_warm_start(build_config(yaml.safe_load(saved.read_text()), str(saved)), config, folder)
    except (UserError, yaml.YAMLError):
        return "new"
    if training_values(saved_config) != training_values(config):
        return "new"
    if (folder / "summary.json").exists():
        return "done" if _current(folder, config.algorithm, "training") else "stale"
    if config_differences(saved_config, config):
        return "new"
    events = folder / "events.log"
    if events.exists() and "training diverged" in events.read_text():
        return "diverged"
    return "resumable" if (folder / CHECKPOINT).exists() and _current_checkpoint(folder, config) else "new"


def _current_checkpoint(folder: Path, config: Config) -> bool:
    """Whether the run's checkpoint was written by this build's training of its algorithm (else it starts over)."""
    try:
        checkpoint = load_checkpoint(folder / CHECKPOINT)
    except CheckpointError:
        return True  # resuming says what is wrong with it, in one line
    return checkpoint.training_version == ALGORITHMS[config.algorithm].training_version


@dataclass
class CellResult:
    """One algorithm on one cell: the seeds it finished, with their summaries and accuracy curves."""

    cell: Cell
    algorithm: str
    summaries: list[dict[str, Any]]
    curves: list[np.ndarray]
    diverged: int = 0
    groups: list[np.ndarray | None] = field(default_factory=list)
    """Each seed's client groups (seen or unseen) in ``clients.csv`` order; None without held-out clients."""

    @property
    def seeds(self) -> list[int]:
        return [summary["seed"] for summary in self.summaries]

    def add(self, folder: Path) -> None:
        self.summaries.append(json.loads((folder / "summary.json").read_text()))
        curves, groups = read_clients(folder / "clients.csv")
        self.curves.append(curves)
        self.groups.append(groups)


def run_preset(
    name: str,
    out: Path,
    scale: str = "full",
    seeds: list[int] | None = None,
    settings: dict[str, Any] | None = None,
    only: list[str] | None = None,
    observer_for: Callable[[str], Any] | None = None,
    log: Callable[[str], None] = print,
) -> list[CellResult]:
    """Run (or continue) the cells of a preset and write ``results.md`` beside the run folders.

    ``settings`` change every cell (a data folder, a device); ``only`` (``key=value[,value]``, a grid
    key or ``algorithm``) runs a subset of the grid or of the algorithms, so a preset can be split
    across machines or processes or continued one cell at a time. The table still covers every cell
    and algorithm: those not selected show what their folders already hold. The
    config of every run to do is built before the first one starts, so a bad value in the last cell
    stops the command at once rather than hours into the grid. An algorithm that starts from another
    one's run (LG-FedAvg from FedAvg's) starts from the cell's run of it, which goes first, or from
    one made for it (see :func:`_phase`).
    """
    preset = load_preset(name)
    seeds = seeds or preset.seeds
    selection = parse_selection(preset, only or [])
    extra = settings or {}
    grid = cells(preset, scale)
    to_run = {(cell.name, algorithm): seeds if _selected(cell, algorithm, selection) else []
              for cell in grid for algorithm in preset.algorithms}
    configs = {(cell.name, algorithm, seed): _planned_config(preset, name, out, cell, extra, algorithm, seed)
               for cell in grid for algorithm in preset.algorithms for seed in to_run[cell.name, algorithm]}
    by_name = {cell.name: cell for cell in grid}
    phases = {key: phase for key in configs
              if (phase := _phase(preset, name, out, by_name[key[0]], extra, key[1], key[2])) is not None}
    starts = {phase[1].algorithm for phase in phases.values()}
    order = sorted(preset.algorithms, key=lambda a: a not in starts)  # a run others start from goes first
    out.mkdir(parents=True, exist_ok=True)
    trained: dict[tuple[str, str], CellResult] = {}
    for index, cell in enumerate(grid, 1):
        for algorithm in order:
            outcome = trained[cell.name, algorithm] = CellResult(cell, algorithm, [], [])
            for seed in to_run[cell.name, algorithm]:
                config = configs[cell.name, algorithm, seed]
                folder = out / _slug(cell.name) / algorithm / f"seed-{seed}"
                label = f"[{index}/{len(grid)}] {cell.name} {algorithm} seed {seed}"
                observer = observer_for(f"{algorithm} s{seed}") if observer_for else None
                try:
                    phase = phases.get((cell.name, algorithm, seed))
                    if phase is not None and _state(folder, config) != "done" and _state(*phase) != "done":
                        start = phase[1].algorithm
                        _complete(*phase, observer_for(f"{start} phase s{seed}") if observer_for else None,
                                  f"{label}: its {start} phase", log)
                    _complete(folder, config, observer, label, log)
                except TrainingDiverged as err:
                    log(f"{label}: {err}; recorded as diverged")
                    outcome.diverged += 1
                    continue
                outcome.add(results_folder(folder, config, label, log, observer))
    # The runs this call did not make are read only now, after its training, so that the table has
    # those another process (the other algorithm, with --only) finished in the meantime.
    outcomes: list[CellResult] = []
    for index, cell in enumerate(grid, 1):
        for algorithm in order:
            outcome = trained[cell.name, algorithm]
            for seed, folder in _other_seeds(out / _slug(cell.name) / algorithm, to_run[cell.name, algorithm]):
                other = _planned_config(preset, name, out, cell, extra, algorithm, seed)
                state = _state(folder, other)
                if state == "done":
                    label = f"[{index}/{len(grid)}] {cell.name} {algorithm} seed {seed}"
                    outcome.add(results_folder(folder, other, label, log))
                elif state == "diverged":
                    outcome.diverged += 1
            outcomes.append(outcome)
    write_results(preset, name, scale, outcomes, out)
    return outcomes


def results_folder(run: Path, config: Config, label: str, log: Callable[[str], None], observer: Any = None,
                   always: bool = False) -> Path:
    """Where a finished run's results under the current protocol and the cell's fine-tuning (and its
    algorithm's evaluation settings) are.

    That is the run itself when it was personalized so; otherwise (a run made under an older
    personalization protocol, or other fine-tuning settings) its personalization folder for these
    settings, made now if it is not there yet: minutes, no training. ``always`` makes that folder
    even for a current run (``--personalize-only``).
    """
    from fedbabu.personalization import default_out, personalization_config, personalize_run, saved_config

    saved = build_config(read_yaml(run / "config.yaml"), str(run / "config.yaml"))
    protocol = json.loads((run / "summary.json").read_text()).get("personalization_protocol")
    keys = ALGORITHMS[saved.algorithm].Settings.evaluation_keys
    evaluation = {key: getattr(config.settings_for(saved.algorithm), key) for key in keys}
    same = saved.finetune == config.finetune and all(getattr(saved.settings_for(saved.algorithm), key) == value
                                                     for key, value in evaluation.items())
    if not always and protocol == PERSONALIZATION_PROTOCOL and same and _current(run, saved.algorithm, "evaluation"):
        return run
    # the cell's fine-tuning and where to compute; eval_batch_size, a memory bound whose default has
    # changed between builds, stays the run's own (with which its results were made) unless one is asked for
    asked = config.eval_batch_size != Config.model_fields["eval_batch_size"].default
    overrides = {"finetune": config.finetune.model_dump(),
                 **{key: value for key, value in config.to_plain().items() if key in RUNTIME_KEYS},
                 **({"eval_batch_size": config.eval_batch_size} if asked else {}),
                 **({saved.algorithm: evaluation} if evaluation else {})}
    wanted = personalization_config(saved, overrides, f"--set (for {run})")
    target = default_out(run, wanted)
    made = saved_config(target)
    if made is not None and _without_free_keys(made) == _without_free_keys(wanted) and \
            _current(target, saved.algorithm, "evaluation"):
        if always:
            log(f"{label}: already personalized with these settings, skipped")
        return target
    reason = "" if always else (" (made under an older personalization protocol or evaluation, or other fine-tuning "
                                "settings)")
    log(f"{label}: personalizing again{reason}")
    personalize_run(run, overrides, target, overwrite=True, observer=observer)
    return target


def _without_free_keys(config: Config) -> dict[str, Any]:
    return {k: v for k, v in config.to_plain().items() if k not in RUNTIME_KEYS}


def personalize_preset(
    name: str,
    out: Path,
    scale: str = "full",
    seeds: list[int] | None = None,
    settings: dict[str, Any] | None = None,
    only: list[str] | None = None,
    observer_for: Callable[[str], Any] | None = None,
    log: Callable[[str], None] = print,
) -> list[CellResult]:
    """Personalize every finished run of a preset folder again, then rebuild its ``results.md``.

    Each run keeps its training; its clients are fine-tuned again with the cell's fine-tuning
    settings (changed by ``settings``, which may hold only the ``evaluation`` and ``runtime`` keys
    (fine-tuning, ``eval_batch_size``, workers, device, data), and the evaluation settings of the
    algorithms' own sections, each applied to its algorithm's runs), into ``<run>/personalize/<settings>``.
    A run that has not finished is skipped and named; one already personalized with the same settings is
    not redone.
    """
    from fedbabu.personalization import personalization_config

    preset = load_preset(name)
    selection = parse_selection(preset, only or [])
    if not Path(out).is_dir():
        raise UserError(f"{out}: no folder of runs to personalize; run fedbabu reproduce {name} first (or give --out)")
    extra = settings or {}
    grid = cells(preset, scale)
    outcomes: list[CellResult] = []
    for index, cell in enumerate(grid, 1):
        for algorithm in preset.algorithms:
            outcome = CellResult(cell, algorithm, [], [])
            for seed, folder in _other_seeds(out / _slug(cell.name) / algorithm, []):
                if not _selected(cell, algorithm, selection) or (seeds and seed not in seeds):
                    continue
                label = f"[{index}/{len(grid)}] {cell.name} {algorithm} seed {seed}"
                if not (folder / "summary.json").is_file():
                    log(f"{label}: not finished, skipped ({folder})")
                    continue
                run = build_config(read_yaml(folder / "config.yaml"), str(folder / "config.yaml"))
                own = {k: v for k, v in extra.items() if k not in ALGORITHMS or k == run.algorithm}
                values = merge_dicts({"finetune": cell.values_for(algorithm).get("finetune", {})}, own)
                config = personalization_config(run, values, f"preset {name} [{cell.name}]")
                observer = observer_for(f"{algorithm} s{seed}") if observer_for else None
                outcome.add(results_folder(folder, config, label, log, observer, always=True))
            outcomes.append(outcome)
    write_results(preset, name, scale, outcomes, out)
    return outcomes


def _run_config(preset: str, cell: Cell, extra: dict[str, Any], algorithm: str, seed: int) -> Config:
    values = merge_dicts(merge_dicts(cell.values_for(algorithm), extra), {"algorithm": algorithm, "seed": seed})
    return build_config(values, f"preset {preset} [{cell.name}]")


def _phase(preset: Preset, name: str, out: Path, cell: Cell, extra: dict[str, Any], algorithm: str,
           seed: int) -> tuple[Path, Config] | None:
    """Folder and config of the run ``algorithm`` starts from when its settings name none (LG-FedAvg:
    FedAvg's): the cell's own run of that algorithm, or, in a preset without one, a run made for it
    beside its seeds. None for an algorithm without a warm start or with one named."""
    warm = ALGORITHMS[algorithm].warm_start
    if warm is None or warm.folder(_run_config(name, cell, extra, algorithm, seed)) is not None:
        return None
    cell_folder = out.resolve() / _slug(cell.name)
    folder = cell_folder / warm.algorithm if warm.algorithm in preset.algorithms else \
        cell_folder / algorithm / f"{warm.algorithm}-phase"
    return folder / f"seed-{seed}", _run_config(name, cell, extra, warm.algorithm, seed)


def _planned_config(preset: Preset, name: str, out: Path, cell: Cell, extra: dict[str, Any], algorithm: str,
                    seed: int) -> Config:
    """A run's config, starting from its phase's folder (see :func:`_phase`) when it has one."""
    config = _run_config(name, cell, extra, algorithm, seed)
    phase = _phase(preset, name, out, cell, extra, algorithm, seed)
    return config if phase is None else ALGORITHMS[algorithm].warm_start.with_folder(config, phase[0])


def _complete(folder: Path, config: Config, observer: Any, label: str, log: Callable[[str], None]) -> None:
    """Leave ``folder`` holding a finished run of ``config``: skip it, resume it or run it.

    Raises :class:`TrainingDiverged` for a run that diverged, now or in an earlier attempt.
    """
    from fedbabu.runner import resume_experiment, run_experiment

    state = _state(folder, config)
    if state == "diverged":
        raise TrainingDiverged(f"diverged in an earlier attempt (see {folder / 'events.log'})")
    if state == "done":
        log(f"{label}: already complete, skipped")
    elif state == "stale":
        log(f"{label}: trained by an older build of {config.algorithm} (training version "
            f"{_recorded(folder)['training']}, now {ALGORITHMS[config.algorithm].training_version}): training again")
        run_experiment(config, folder, observer, overwrite=True)
    elif state == "resumable":
        log(f"{label}: resuming from its checkpoint")
        resume_experiment(folder, config, observer, overrides=config.to_plain())
    else:
        log(f"{label}: running")
        run_experiment(config, folder, observer, overwrite=True)


def _other_seeds(folder: Path, requested: list[int]) -> list[tuple[int, Path]]:
    """Seeds run by earlier invocations (``--seeds 0`` yesterday, ``--seeds 1`` today, another cell
    with ``--only``), so that the results table grows with the grid instead of showing only the
    seeds of the last call."""
    found = []
    for path in folder.glob("seed-*"):
        suffix = path.name.removeprefix("seed-")
        if suffix.isdigit() and int(suffix) not in requested:
            found.append((int(suffix), path))
    return sorted(found)


def _slug(name: str) -> str:
    return name.replace(",", "_").replace("=", "-")


def _over_seeds(values: list[float], signed: bool = False) -> str:
    """Mean ± its standard error over seeds in %, or the single value when one seed gives no spread to report."""
    mean = f"{100 * np.mean(values):{'+' if signed else ''}.2f}"
    spread = seed_standard_error(values)
    return mean if np.isnan(spread) else f"{mean} ± {100 * spread:.2f}"


def _means(outcome: CellResult, key: str) -> dict[int, float]:
    return {s["seed"]: s[key]["mean"] for s in outcome.summaries}


def _personalized(outcome: CellResult) -> dict[int, np.ndarray]:
    """Each seed's per-client personalized accuracies, in client order."""
    return {s["seed"]: curve[:, -1] for s, curve in zip(outcome.summaries, outcome.curves, strict=True)}


def _seed_pairs(reference: CellResult, other: CellResult) -> list[PairedDifference | None]:
    """``other − reference`` client by client for every seed both finished, in seed order (None where
    the two runs tested other clients)."""
    first, second = _personalized(reference), _personalized(other)
    return [paired_difference([first[seed]], [second[seed]]) for seed in sorted(first.keys() & second.keys())]


def _pairs_cell(pairs: list[PairedDifference | None]) -> str:
    """The per-seed pairs as one table cell, ``;`` between seeds; ``–`` for none."""
    return "; ".join(pair.text() if pair is not None else "other clients" for pair in pairs) or "–"


def _paired_table(by_cell: dict[str, dict[str, CellResult]], algorithms: list[str]) -> list[str]:
    """Every algorithm of a many-method preset against the reference (FedBABU), seed by seed, as a
    second table: one column per algorithm would not fit beside the accuracies."""
    reference = paired_reference(algorithms)
    lines = ["", f"Paired against {reference}: personalized accuracy minus {reference}'s on the same client "
             "(same partition and test set), per seed: its mean ± the standard error of that mean, and on how "
             "many clients the algorithm is higher, lower or tied; the seeds both finished, in increasing order, "
             "separated by `;`.", "", "| cell | algorithm | per seed |", "|---|---|---|"]
    for cell_name, results in by_cell.items():
        for algorithm in algorithms:
            if algorithm != reference:
                lines.append(f"| {cell_name} | {algorithm} | "
                             f"{_pairs_cell(_seed_pairs(results[reference], results[algorithm]))} |")
    return lines


def _epsilon(results: dict[str, CellResult]) -> str:
    """A cell's epsilon: the largest its finished runs spent (each algorithm of a cell is accounted for the
    same rounds, so they agree unless ``target_epsilon`` stopped one early); ``–`` before any finished."""
    summaries = [s for outcome in results.values() for s in outcome.summaries]
    return epsilon_cell({"epsilon": largest_epsilon(summaries)}) if summaries else "–"


def _groups_table(by_cell: dict[str, dict[str, CellResult]], algorithms: list[str]) -> list[str]:
    """Seen against unseen clients per cell and algorithm, every finished seed's clients pooled: the
    participation gap a preset with held-out clients measures."""
    lines = ["", "Seen and unseen clients: the clients the federation could train and the held-out ones it never "
             "saw (docs/new-clients.md), mean accuracy in % before → after personalization, every finished "
             "seed's clients pooled; the participation gap is seen − unseen personalized, in points, ± its "
             "unpaired standard error.", "",
             "| cell | algorithm | seeds | seen | unseen | participation gap |", "|---|---|---|---|---|---|"]
    for cell_name, results in by_cell.items():
        for algorithm in algorithms:
            fields = holdout.comparison_fields(results[algorithm].summaries)
            if fields:
                seeds = ", ".join(map(str, results[algorithm].seeds))
                lines.append(f"| {cell_name} | {algorithm} | {seeds} | " + " | ".join(holdout.group_cells(fields))
                             + " |")
    return lines


def _group_pairs(reference: CellResult, other: CellResult) -> dict[str, PairedDifference | None] | None:
    """``other − reference`` within each group, every seed both finished pooled; None where a seed of
    either lacks the group column or the two runs grouped their clients differently."""
    first, second = _personalized(reference), _personalized(other)
    ours = dict(zip(reference.seeds, reference.groups, strict=True))
    theirs = dict(zip(other.seeds, other.groups, strict=True))
    seeds = sorted(first.keys() & second.keys())
    if not seeds or any(ours[seed] is None or theirs[seed] is None or not np.array_equal(ours[seed], theirs[seed])
                        for seed in seeds):
        return None
    return holdout.paired_by_group([first[seed] for seed in seeds], [second[seed] for seed in seeds],
                                   [ours[seed] for seed in seeds])


def _group_paired_table(by_cell: dict[str, dict[str, CellResult]], algorithms: list[str]) -> list[str]:
    """Every algorithm against the reference within the seen and within the unseen clients, and the
    difference of their participation gaps: whether the reference's model serves newcomers better
    than the other's, measured client by client rather than from two groups' means."""
    reference = paired_reference(algorithms)
    lines = ["", f"Paired against {reference} within each group: personalized accuracy minus {reference}'s on the "
             "same client, over the seen clients and over the unseen ones, every seed both finished pooled (mean ± "
             "standard error, clients higher, lower, tied); and the algorithm's participation gap minus "
             f"{reference}'s (the seen difference minus the unseen one, the two standard errors combined, as the "
             f"groups are different clients): positive where {reference}'s model serves the clients it never saw "
             "relatively better.", "", f"| cell | algorithm | − {reference}, seen | − {reference}, unseen | "
             f"gap − {reference}'s gap |", "|---|---|---|---|---|"]
    for cell_name, results in by_cell.items():
        for algorithm in algorithms:
            if algorithm == reference:
                continue
            pairs = _group_pairs(results[reference], results[algorithm])
            cells = (["–"] * 3 if pairs is None else
                     [_pairs_cell([pairs[holdout.SEEN]]), _pairs_cell([pairs[holdout.UNSEEN]]),
                      holdout.gap_difference_cell(pairs)])
            lines.append(f"| {cell_name} | {algorithm} | " + " | ".join(cells) + " |")
    return lines


def _seed_bar(outcome: CellResult, label: str) -> dict[str, Any]:
    """A bar of the over-seeds plot: the mean of the per-seed means, with the spread over seeds as its
    error bar: the standard error over seeds (none for a single seed, whose spread is unknown)."""
    bar: dict[str, Any] = {"algorithm": label}
    for key, column in (("initial", "initial_accuracy"), ("personalized", "personalized_accuracy")):
        means = list(_means(outcome, column).values())
        bar[f"{key}_mean"], bar[f"{key}_std"] = float(np.mean(means)), seed_standard_error(means)
    return bar


def write_results(preset: Preset, name: str, scale: str, outcomes: list[CellResult], out: Path) -> None:
    """A Markdown table over every finished seed of each cell, and its plots.

    The difference columns pair the two algorithms seed by seed (same partition, same initial
    body), which is the comparison the paper makes; every seed's difference is listed and drawn,
    since their spread is what a reader needs to judge a lead, with its paired per-client standard
    error and the clients it favours, which say whether one seed's lead is measured at all.
    """
    algorithms = preset.algorithms
    paired = algorithms[:2] == ["fedavg", "fedbabu"]
    summaries = [s for outcome in outcomes for s in outcome.summaries]
    private = any(s.get("privacy") for s in summaries)
    header = "| cell | seeds | " + ("ε | " if private else "") \
        + " | ".join(f"{a} initial | {a} personalized" for a in algorithms)
    if paired:
        header += " | fedbabu − fedavg (personalized) | per seed"
    lines = [f"# {preset.title}", "",
             f"Scale: {scale}. Accuracy in %: the mean over clients of each run, then the mean over seeds ± its "
             "standard error (a single value where one seed has finished)."
             + (" Per seed: fedbabu − fedavg client by client (same partition and test sets), its mean ± the "
                "standard error of that mean, and on how many clients fedbabu is higher, lower or tied; "
                "the seeds both algorithms finished, in increasing order, separated by `;`." if paired else "")
             + (" ε: the user-level epsilon the cell's runs spent on the shared parameters, at each run's delta "
                "(summary.json's privacy)." if private else ""), "",
             header + " |", "|" + "---|" * (header.count("|"))]
    by_cell: dict[str, dict[str, CellResult]] = {}
    differences: dict[str, list[PairedDifference]] = {}
    for outcome in outcomes:
        by_cell.setdefault(outcome.cell.name, {})[outcome.algorithm] = outcome
    for cell_name, results in by_cell.items():
        seeds = sorted(set().union(*(results[a].seeds for a in algorithms)))
        row = [cell_name, ", ".join(map(str, seeds)) or "–", *([_epsilon(results)] if private else [])]
        for algorithm in algorithms:
            outcome = results[algorithm]
            note = f" ({outcome.diverged} of {outcome.diverged + len(outcome.summaries)} seeds diverged)" \
                if outcome.diverged else ""
            for key in ("initial_accuracy", "personalized_accuracy"):
                if not outcome.summaries:
                    row.append("diverged" if outcome.diverged else "not run")
                    continue
                row.append(_over_seeds(list(_means(outcome, key).values())) + note)
        if paired:
            fedavg = _means(results["fedavg"], "personalized_accuracy")
            fedbabu = _means(results["fedbabu"], "personalized_accuracy")
            both = sorted(fedavg.keys() & fedbabu.keys())
            diffs = [fedbabu[seed] - fedavg[seed] for seed in both]
            row.append(_over_seeds(diffs, signed=True) if diffs else "–")
            pairs = _seed_pairs(results["fedavg"], results["fedbabu"])
            row.append(_pairs_cell(pairs))
            if paired_seeds := [pair for pair in pairs if pair is not None]:
                differences[cell_name] = paired_seeds
        lines.append("| " + " | ".join(row) + " |")
    if len(algorithms) > 2 or (len(algorithms) == 2 and not paired):
        lines += _paired_table(by_cell, algorithms)
    if any("participation_gap" in s for s in summaries):
        lines += _groups_table(by_cell, algorithms)
        if len(algorithms) > 1:
            lines += _group_paired_table(by_cell, algorithms)
    wall = sum(s["wall_time_s"] for o in outcomes for s in o.summaries)
    lines += ["", f"Total wall time of the runs: {wall / 60:.1f} min.", "", "![fine-tuning](finetune.png)"]
    curves = {f"{o.algorithm} {o.cell.name}": np.concatenate(o.curves) for o in outcomes if o.curves}
    plot_finetune_curves(curves, out / "finetune.png", f"{name}: accuracy vs fine-tuning epochs")
    bars = [_seed_bar(o, f"{o.algorithm} {o.cell.name}") for o in outcomes if o.summaries]
    if bars:
        plot_comparison(bars, out / "seeds.png", f"{name}: mean ± standard error over seeds")
        lines.append("![over seeds](seeds.png)")
    if differences:
        plot_paired_differences(differences, out / "differences.png",
                                f"{name}: fedbabu − fedavg, personalized, per seed")
        lines.append("![paired differences](differences.png)")
    lines.append("")
    atomic_write_text(out / "results.md", "\n".join(lines))
