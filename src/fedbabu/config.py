"""One validated configuration object for every experiment.

Values come from, in order: the field defaults (the paper's settings where the paper has one),
a YAML file, and ``--set key=value`` overrides with dotted keys. Every mistake becomes a
:class:`~fedbabu.errors.UserError` naming the key and what was expected.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedbabu.errors import UserError

DATASETS = ("digits", "fmnist", "cifar10", "cifar100", "hf", "custom")
MODELS = ("auto", "digitcnn", "4convnet", "mobilenet", "resnet18", "resnet50", "custom")
PARTITIONS = ("shards", "dirichlet", "iid", "natural")
# "custom" data and models and the "natural" partition come from the Python API (fedbabu.api):
# the run folder's config.yaml then says honestly that they were given in code.
HEAD_INITS = ("default", "orthogonal", "zeros")


ROLES: dict[str, str] = {
    "data": "defines the dataset and its partition, so the clients (the seed also seeds the training): every "
            "algorithm of a comparison or a preset cell shares these, and so do a warm start and the run it starts "
            "from",
    "training": "shapes the training run, the model it trains or what it records while training: a run is resumed, "
                "personalized again or reused only with the same values",
    "evaluation": "changes only how the final model is personalized and tested: it may differ in fedbabu "
                  "personalize, and a finished run is not trained again for it",
    "runtime": "where and how the run computes, not which experiment it is: it may differ in fedbabu personalize "
               "and analyze, and a finished run is not trained again for it; all but device (whose floating-point "
               "results and automatic executor differ) may also change when a run is resumed",
}
"""What each field of :class:`Config` is for: every field carries exactly one role (``Annotated[..., DATA]``),
and every rule about which keys may differ (resume, personalize, compare, reproduce) is derived from them
(:meth:`Config.keys_with_role`)."""


@dataclass(frozen=True)
class Role:
    """A :class:`Config` field's role, one of :data:`ROLES`, carried in its annotation's metadata."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in ROLES:
            raise ValueError(f"unknown role {self.name!r}; expected one of {', '.join(ROLES)}")


DATA, TRAINING, EVALUATION, RUNTIME = (Role(name) for name in ROLES)


SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: Any) -> int:
    """Bytes from a count of bytes or a size with a unit (``512MiB``, ``2GiB``, ``1.5GB``; KiB = 1024 B, KB = 1000 B).

    Raises ``ValueError`` saying what is accepted, which validation turns into one line naming the key.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", value, re.IGNORECASE)
        unit = match and (match.group(2).lower() or "b")
        if unit in SIZE_UNITS:
            return int(Decimal(match.group(1)) * SIZE_UNITS[unit])
    raise ValueError("expected a number of bytes (>= 0) or a size such as 512MiB or 2GiB")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class AlgorithmSettings(_Strict):
    """An algorithm's own settings, its section of the config: the base is for algorithms that have none.

    Each algorithm declares a subclass in its own file (``FedProx.Settings`` with ``mu``), so adding
    an algorithm touches neither this file nor the engine. ``legacy_keys`` maps the flat names of
    older builds (``fedprox_mu``) to the section's fields, so older run folders still load.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, frozen=True,
                              use_attribute_docstrings=True)
    legacy_keys: ClassVar[dict[str, str]] = {}
    evaluation_keys: ClassVar[tuple[str, ...]] = ()
    """Settings that change only how clients are evaluated at the end, never the training: like
    ``finetune.*`` they may differ in ``fedbabu personalize`` and do not make a finished run stale."""
    training_options: ClassVar[dict[str, dict[str, Any]]] = {}
    """Named sets of shared training values (``lr``, ``batch_size``, ...) a method's own authors train
    with, chosen by the section's ``training`` field (``fednh.training: authors``). The chosen set is
    written over the config's values when the config is built, so the run's ``config.yaml`` shows
    what it trained with; to vary one of those values, keep ``training: common`` and set them all."""


_ALGORITHMS: dict[str, type[AlgorithmSettings]] = {}


def register_algorithm(name: str, settings: type[AlgorithmSettings]) -> None:
    """Make an algorithm name valid in a config, with the model of its section.

    The algorithms package registers each of its algorithms when it is imported, so this layer
    validates names and sections without importing the layers above it.
    """
    _ALGORITHMS[name] = settings


def registered_algorithms() -> dict[str, type[AlgorithmSettings]]:
    """Every algorithm a config may name, with its settings model."""
    if not _ALGORITHMS:
        raise RuntimeError("no algorithms are registered: import fedbabu.algorithms first (fedbabu.load_config and "
                           "every command do)")
    return _ALGORITHMS


def _algorithm_section(catalog: dict[str, type[AlgorithmSettings]], name: str, values: Any) -> AlgorithmSettings:
    """One section validated by its algorithm's model; a mistake is one line naming ``algorithm.key``."""
    model = catalog[name]
    if isinstance(values, model):
        return values
    if not isinstance(values, dict):
        raise ValueError(f"{name}: expected a mapping of {name}'s settings"
                         + (f" ({', '.join(_field_names(model))})" if model.model_fields else ", which has none")
                         + f", got {values!r}")
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise ValueError(_describe(err, f"{name}.", [f"{name}.{key}" for key in _field_names(model)])) from None


def _field_names(model: type[BaseModel]) -> list[str]:
    return [info.alias or key for key, info in model.model_fields.items()]


class FinetuneConfig(_Strict):
    """How each client personalizes the final global model before it is tested."""

    part: Literal["head", "body", "full"] = "full"
    epochs: int = Field(5, ge=0)
    lr: float = Field(0.001, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(50, ge=1)


class DpConfig(_Strict):
    """User-level differential privacy of the shared parameters (DP-FedAvg), off by default.

    With ``noise_multiplier > 0`` the server clips each accepted client's update of the shared
    parameters to ``clipping_norm``, averages the clipped updates over the expected number of clients
    per round, adds Gaussian noise and accounts the privacy spent (epsilon at ``delta``) round by round.
    With ``noise_multiplier: 0`` the whole section is off, whatever its other keys say, and a run is
    exactly one without it (so a study can sweep the noise multiplier down to 0 with one clipping norm).
    """

    noise_multiplier: float = Field(0.0, ge=0)
    """z: the noise's standard deviation is ``z * clipping_norm / clients_per_round``; 0 turns DP off."""
    clipping_norm: float | None = None
    """C: the L2 norm (float64) every accepted client update of the shared parameters is clipped to; required
    with noise."""
    delta: float | None = Field(None, gt=0, lt=1)
    """The delta of the reported (epsilon, delta); unset: 1 / N**1.1 for the N clients that may train, below 1/N
    as a user-level delta must be."""
    target_epsilon: float | None = Field(None, gt=0)
    """Stop training, with one line, before the round that would take epsilon above this; the run then
    personalizes and writes its folder as usual, and its summary says it stopped early."""
    sampling: Literal["fixed", "poisson"] = "fixed"
    """Which clients a DP round takes: ``fixed``, the engine's usual m = max(1, floor(f * N)) drawn without
    replacement (accounted for replace-one neighbours); ``poisson``, each client independently with
    probability m / N (accounted for add-or-remove neighbours, as DP-FedAvg's analysis is), so a round's
    count varies around m."""
    adaptive_clipping: bool = False
    """Adapt the clipping norm each round toward a quantile of the update norms (Andrew et al., 2021),
    starting from ``clipping_norm``; the privatized count of unclipped updates it reads is paid for
    inside the same noise multiplier (the updates' noise grows a little), so epsilon is unchanged."""
    target_quantile: float = Field(0.5, gt=0, lt=1)
    """Adaptive clipping: the share of updates that should fall within the norm (the paper's 0.5: the median)."""
    clipping_lr: float = Field(0.2, gt=0)
    """Adaptive clipping: the geometric step, ``C <- C * exp(-clipping_lr * (unclipped share - target_quantile))``
    (the paper's 0.2)."""
    clipped_count_stddev: float | None = Field(None, gt=0)
    """Adaptive clipping: the standard deviation of the noise on the count of unclipped updates; unset:
    clients per round / 20, the paper's choice."""

    @field_validator("clipping_norm")
    @classmethod
    def _positive_norm(cls, value: float | None) -> float | None:
        if value is not None and not value > 0:
            raise ValueError("expected an L2 norm > 0: clipping bounds each client's update, and a bound <= 0 "
                             "leaves no update to average and no guarantee to state")
        return value

    def enabled(self) -> bool:
        """Whether DP is on: a noise multiplier above 0."""
        return self.noise_multiplier > 0


class HfConfig(_Strict):
    """A labelled image dataset in the Hugging Face format, read with ``dataset: hf`` (the ``hf`` extra).

    The images become the uint8 tensors every other dataset is held as, normalized with the channel
    mean and std of the training images. Clients come from the config's ``partition`` (shards, Dirichlet,
    IID, seeded by ``seed`` exactly as for the built-in datasets) or, with ``partition: natural``, one
    client per distinct value of ``partition_column``, as FEMNIST's writers.
    """

    name: str | None = None
    """A Hub id (``flwr/femnist``, ``uoft-cs/cifar100``; needs internet once, then the Hugging Face cache)
    or the folder of a dataset saved with ``save_to_disk``; required with ``dataset: hf``."""
    image_column: str | None = None
    """The column of images; unset: the one column whose feature is an ``Image``."""
    label_column: str = "label"
    """The column of class labels: a ``ClassLabel`` (its names become the class names), integers or strings
    (numbered in sorted order)."""
    partition_column: str | None = None
    """``partition: natural`` only: the column whose values are the clients (``writer_id`` for FEMNIST)."""
    split_train: str = "train"
    """The split the clients train on."""
    split_test: str | None = "test"
    """The split the clients are tested on; ``null`` for a dataset of one split: ``test_fraction`` of each
    client's samples (natural partition) or of each class (other partitions) is held out for testing."""
    test_fraction: float = Field(0.2, gt=0, lt=1)
    """With ``split_test: null``: the share of samples held out for testing."""
    split_seed: int = Field(0, ge=0)
    """With ``split_test: null``: seeds the held-out samples, kept apart from ``seed`` so that runs of
    several seeds test on the same samples."""
    image_size: int | None = Field(None, ge=1)
    """Resize every image to this many pixels square (bilinear); unset: the images must share one size."""


class Config(_Strict):
    """A complete, validated experiment description; the defaults are the paper's CIFAR-100 setting.

    Every field carries its role (:data:`ROLES`) in its annotation: ``data``, ``training``,
    ``evaluation`` or ``runtime``; :meth:`roles` and :meth:`keys_with_role` read them.
    """

    algorithm: Annotated[str, TRAINING] = "fedbabu"
    dataset: Annotated[Literal["digits", "fmnist", "cifar10", "cifar100", "hf", "custom"], DATA] = "cifar100"
    data_dir: Annotated[Path | None, RUNTIME] = None
    download: Annotated[bool, RUNTIME] = False
    hf: Annotated[HfConfig, DATA] = Field(default_factory=HfConfig)
    """A Hugging Face dataset (``dataset: hf``; its keys below), from the Hub or saved with ``save_to_disk``."""
    model: Annotated[Literal["auto", "digitcnn", "4convnet", "mobilenet", "resnet18", "resnet50", "custom"],
                     TRAINING] = "auto"
    head_init: Annotated[Literal["default", "orthogonal", "zeros"], TRAINING] = "default"

    num_clients: Annotated[int, DATA] = Field(100, ge=1)
    partition: Annotated[Literal["shards", "dirichlet", "iid", "natural"], DATA] = "shards"
    shards_per_client: Annotated[int, DATA] = Field(10, ge=1)
    dirichlet_alpha: Annotated[float, DATA] = Field(0.5, gt=0)
    samples_per_client: Annotated[int | None, DATA] = Field(None, ge=1)
    holdout_clients: Annotated[int | float, DATA] = 0
    """Clients the federation never trains (docs/new-clients.md): a count, or a fraction in (0, 1) of
    ``num_clients`` (rounded, at least 1). A seeded set, never sampled, personalized and tested like every
    other client, so that ``summary.json`` can give the participation gap (seen minus unseen accuracy).
    The partition is unchanged, yet the role is ``data``, not ``training``: the held-out clients are part
    of what the federation *is*, so every algorithm of a comparison or preset cell, and a warm start with
    the run it starts (which must not have trained on them either), share the same set; resume and
    ``personalize`` keep it, as they keep every data key."""

    rounds: Annotated[int, TRAINING] = Field(320, ge=0)
    client_fraction: Annotated[float, TRAINING] = Field(0.1, gt=0, le=1)
    local_epochs: Annotated[int, TRAINING] = Field(1, ge=1)
    batch_size: Annotated[int, TRAINING] = Field(50, ge=1)
    lr: Annotated[float, TRAINING] = Field(0.1, gt=0)
    momentum: Annotated[float, TRAINING] = Field(0.9, ge=0, lt=1)
    weight_decay: Annotated[float, TRAINING] = Field(0.0, ge=0)
    lr_milestones: Annotated[list[int] | None, TRAINING] = None
    lr_decay: Annotated[float, TRAINING] = Field(0.1, gt=0, le=1)
    lr_schedule: Annotated[Literal["step", "exponential"], TRAINING] = "step"
    """step: lr x lr_decay at each milestone (the paper's); exponential: lr x lr_decay**round, every round"""
    clip_grad_norm: Annotated[float | None, TRAINING] = Field(None, gt=0)
    """Clip each local step's gradient to this L2 norm (none by default, as in the paper's code)"""
    augment: Annotated[Literal["auto", "on", "off"], TRAINING] = "auto"
    eval_every: Annotated[int, TRAINING] = Field(10, ge=0)
    eval_batch_size: Annotated[int, EVALUATION] = Field(2000, ge=1)
    """a memory bound: a client's test set is one batch up to it"""
    eval_clients: Annotated[int | Literal["all"], TRAINING] = "all"
    """Large federations: the global model is evaluated on all clients or a seeded sample of N
    (engine.simulation.seeded_clients)."""
    personalize_clients: Annotated[int | Literal["all"], TRAINING] = "all"
    """Large federations: the final model is personalized by all clients or a seeded sample of N
    (engine.simulation.seeded_clients)."""

    finetune: Annotated[FinetuneConfig, EVALUATION] = Field(default_factory=FinetuneConfig)

    settings: Annotated[dict[str, AlgorithmSettings], TRAINING] = Field(default_factory=dict, exclude=True)
    """Each algorithm's own settings, one section per algorithm (``fedprox: {mu: 1.0}``, ``--set
    fedprox.mu=1``): the run's algorithm always has one; others are kept when given (compare's base)."""

    seed: Annotated[int, DATA] = Field(0, ge=0)
    device: Annotated[Literal["cpu", "cuda", "auto"], RUNTIME] = "cpu"
    workers: Annotated[int | Literal["auto"], RUNTIME] = "auto"
    precision: Annotated[Literal["fp32", "bf16"], TRAINING] = "fp32"
    channels_last: Annotated[Literal["auto", "on", "off"], TRAINING] = "auto"
    executor: Annotated[Literal["auto", "sequential", "vectorized"], TRAINING] = "auto"
    personal_memory: Annotated[int | str, RUNTIME] = "10GiB"
    """Memory for the clients' personal states (Ditto's models, FedPer's heads): beyond it they live in
    files of the run folder (engine.personal), bit-identical when read back. The default holds the
    paper's scale in memory (100 clients of the largest built-in model, ResNet-50 at 90 MiB: 9 GiB)
    and caps a 10,000-client federation at 10 GiB, leaving the rest of a 24 GiB machine to the run."""

    # Reliability: checkpoints, update screening and simulated client failures.
    checkpoint_every: Annotated[int, TRAINING] = Field(10, ge=0)
    client_failure_rate: Annotated[float, TRAINING] = Field(0.0, ge=0, lt=1)
    max_update_norm: Annotated[float | None, TRAINING] = Field(1.0e4, gt=0)

    dp: Annotated[DpConfig, TRAINING] = Field(default_factory=DpConfig)
    """User-level differential privacy of the shared parameters (its keys below); off by default."""

    @classmethod
    def roles(cls) -> dict[str, str]:
        """Every field's role (:data:`ROLES`), in the order of the fields.

        Raises ``TypeError`` for a field that carries no role or several: each must carry exactly one.
        """
        roles: dict[str, str] = {}
        for name, info in cls.model_fields.items():
            found = [item.name for item in info.metadata if isinstance(item, Role)]
            if len(found) != 1:
                raise TypeError(f"Config.{name} carries {len(found)} roles {found}; give it exactly one of "
                                f"{', '.join(ROLES)} (Annotated[..., DATA])")
            roles[name] = found[0]
        return roles

    @classmethod
    def keys_with_role(cls, *roles: str) -> tuple[str, ...]:
        """The fields that carry any of ``roles``, in the order of the fields (``keys_with_role("runtime")``)."""
        unknown = [role for role in roles if role not in ROLES]
        if unknown:
            raise ValueError(f"unknown role {unknown[0]!r}; expected one of {', '.join(ROLES)}")
        return tuple(name for name, role in cls.roles().items() if role in roles)

    @model_validator(mode="before")
    @classmethod
    def _algorithm_sections(cls, data: Any) -> Any:
        """Take each registered algorithm's section out of the keys and validate it with its own model."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        algorithm = data.get("algorithm", cls.model_fields["algorithm"].default)
        catalog = registered_algorithms()
        if algorithm not in catalog:
            raise ValueError(f"algorithm: unknown algorithm {algorithm!r}; expected one of "
                             f"{', '.join(sorted(catalog))}")
        if "settings" in data:
            raise ValueError("unknown key 'settings'; an algorithm's settings go in a section named after it "
                             "(fedprox: {mu: 0.1}, or --set fedprox.mu=0.1)")
        given: dict[str, Any] = {}
        for name, model in catalog.items():
            if name in data:
                given[name] = data.pop(name)
            for old, new in model.legacy_keys.items():
                if old in data:
                    value = data.pop(old)
                    if name == algorithm or value != model.model_fields[new].default:
                        given.setdefault(name, {})
                        if isinstance(given[name], dict):
                            given[name].setdefault(new, value)
        given.setdefault(algorithm, {})
        data["settings"] = {name: _algorithm_section(catalog, name, values) for name, values in given.items()}
        own = data["settings"][algorithm]
        chosen = getattr(own, "training", None)
        if chosen in own.training_options:
            data = merge_dicts(data, own.training_options[chosen])
        return data

    @field_validator("workers")
    @classmethod
    def _positive_workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("expected 'auto' or an integer >= 1")
        return value

    @field_validator("eval_clients", "personalize_clients", mode="before")
    @classmethod
    def _all_or_a_count(cls, value: Any) -> Any:
        if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("expected 'all' or an integer >= 1 (a seeded sample of that many clients)")

    @field_validator("personal_memory", mode="before")
    @classmethod
    def _a_size(cls, value: Any) -> Any:
        parse_size(value)
        return value

    @field_validator("holdout_clients", mode="before")
    @classmethod
    def _a_count_or_a_fraction(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, float) and 0 < value < 1:
            return value
        raise ValueError("expected a number of clients >= 0 or a fraction of num_clients in (0, 1)")

    @model_validator(mode="after")
    def _milestones_within_rounds(self) -> Config:
        if self.lr_milestones is not None:
            bad = [m for m in self.lr_milestones if m < 1]
            if bad:
                raise ValueError(f"lr_milestones must be rounds >= 1, got {bad}")
        return self

    @model_validator(mode="after")
    def _someone_trains(self) -> Config:
        """Refuse a holdout that leaves no client to train."""
        held_out = self.resolved_holdout()
        if held_out >= self.num_clients:
            raise ValueError(f"holdout_clients={self.holdout_clients!r} holds out {held_out} of num_clients="
                             f"{self.num_clients}, leaving no client to train; expected at most "
                             f"{self.num_clients - 1}")
        return self

    @model_validator(mode="after")
    def _hf_names_its_data(self) -> Config:
        """Refuse an ``hf`` section that cannot say which data and which clients a run has (one line each)."""
        if self.dataset != "hf":
            return self
        if self.hf.name is None:
            raise ValueError("hf.name: dataset: hf needs a dataset: a Hugging Face Hub id (flwr/femnist) or the "
                             "folder of one saved with save_to_disk")
        if self.partition == "natural" and self.hf.partition_column is None:
            raise ValueError("hf.partition_column: partition: natural needs the column whose values are the "
                             "clients (writer_id for flwr/femnist)")
        if self.partition != "natural" and self.hf.partition_column is not None:
            raise ValueError(f"hf.partition_column: only partition: natural reads it (partition is "
                             f"{self.partition}); set partition: natural or unset hf.partition_column")
        return self

    @model_validator(mode="after")
    def _dp_can_give_a_guarantee(self) -> Config:
        """Refuse DP settings under which the stated (epsilon, delta) would not hold (one line each)."""
        dp = self.dp
        if not dp.enabled():
            return self
        if dp.clipping_norm is None:
            raise ValueError(f"dp.noise_multiplier={dp.noise_multiplier:g} needs dp.clipping_norm: noise is calibrated "
                             "to the clipping norm, and unclipped updates have no bound to calibrate it to")
        if self.client_failure_rate > 0:
            raise ValueError(f"client_failure_rate={self.client_failure_rate:g} with dp: the privacy accountant does "
                             "not model client dropouts; set client_failure_rate=0 for a DP run")
        if dp.adaptive_clipping and dp.noise_multiplier >= 2 * self.clipped_count_stddev():
            raise ValueError(f"dp.adaptive_clipping: the count noise (dp.clipped_count_stddev="
                             f"{self.clipped_count_stddev():g}) must exceed dp.noise_multiplier / 2 = "
                             f"{dp.noise_multiplier / 2:g}, or it alone would spend the whole budget; raise "
                             "dp.clipped_count_stddev or switch adaptive clipping off")
        if self.max_update_norm is not None and self.max_update_norm < dp.clipping_norm:
            raise ValueError(f"max_update_norm={self.max_update_norm:g} is below dp.clipping_norm="
                             f"{dp.clipping_norm:g}: with dp, updates are clipped, not screened by norm; lower "
                             "dp.clipping_norm instead (or set max_update_norm=null)")
        return self

    def resolved_holdout(self) -> int:
        """How many clients are held out: ``holdout_clients`` itself, or its fraction of ``num_clients``
        rounded to the nearest count (halves up) and at least 1."""
        if isinstance(self.holdout_clients, float):
            return max(1, int(self.holdout_clients * self.num_clients + 0.5))
        return self.holdout_clients

    def trainable_clients(self) -> int:
        """N: the clients that may train, the federation less its held-out clients."""
        return self.num_clients - self.resolved_holdout()

    def clients_per_round(self) -> int:
        """m: the clients a round samples, ``max(1, floor(f * N))`` of the :meth:`trainable_clients`; with
        ``dp.sampling: poisson`` the expected count."""
        return max(1, int(self.client_fraction * self.trainable_clients()))

    def clipped_count_stddev(self) -> float:
        """Adaptive clipping's count noise: ``dp.clipped_count_stddev``, else clients per round / 20."""
        given = self.dp.clipped_count_stddev
        return given if given is not None else self.clients_per_round() / 20

    def resolved_delta(self) -> float:
        """The delta of the reported (epsilon, delta): ``dp.delta``, else ``1 / N**1.1`` for the N clients that
        may train (all of them unless some are held out)."""
        return self.dp.delta if self.dp.delta is not None else 1.0 / self.trainable_clients()**1.1

    def settings_for(self, algorithm: str) -> AlgorithmSettings:
        """An algorithm's own settings: its section of this config, else its defaults."""
        if algorithm in self.settings:
            return self.settings[algorithm]
        return registered_algorithms()[algorithm]()

    def with_settings(self, algorithm: str, **values: Any) -> Config:
        """A copy with some of an algorithm's own settings changed (validated like the file's)."""
        section = {**self.settings_for(algorithm).model_dump(by_alias=True), **values}
        try:
            validated = _algorithm_section(registered_algorithms(), algorithm, section)
        except ValueError as err:
            raise UserError(str(err)) from None
        return self.model_copy(update={"settings": {**self.settings, algorithm: validated}})

    def resolved_model(self) -> str:
        """The model actually built: ``auto`` means the small CNN for digits and 4convNet otherwise."""
        if self.model != "auto":
            return self.model
        return "digitcnn" if self.dataset == "digits" else "4convnet"

    def resolved_milestones(self) -> list[int]:
        """Rounds at which the lr is decayed; by default 50% and 75% of the rounds, as in the paper."""
        if self.lr_milestones is not None:
            return sorted(self.lr_milestones)
        return [self.rounds // 2, (self.rounds * 3) // 4] if self.rounds >= 2 else []

    def lr_at(self, round_index: int) -> float:
        """The local learning rate of a 0-based round."""
        if self.lr_schedule == "exponential":
            return self.lr * self.lr_decay**round_index
        passed = sum(1 for m in self.resolved_milestones() if round_index >= m)
        return self.lr * self.lr_decay**passed

    def resolved_workers(self) -> int:
        """Worker processes for the round: one per usable core on CPU, in-process on CUDA."""
        if self.resolved_device() == "cuda":
            return 1
        if self.workers == "auto":
            return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        return int(self.workers)

    def resolved_personal_memory(self) -> int:
        """``personal_memory`` in bytes."""
        return parse_size(self.personal_memory)

    def resolved_device(self) -> str:
        """The device the run computes on: ``auto`` takes CUDA when torch sees it, else the CPU.

        An explicit ``cuda`` without a usable CUDA device is a user mistake, not a crash deep in the
        first round: it is refused here, and the runner asks before it touches a run folder.
        """
        if self.device == "cpu":
            return "cpu"
        import torch

        if torch.cuda.is_available():
            return "cuda"
        if self.device == "auto":
            return "cpu"
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
        raise UserError(f"device: cuda requested but torch sees no CUDA device (this torch build: {build}, "
                        f"torch {torch.__version__}); use device=cpu or auto")

    def augment_enabled(self) -> bool:
        """Crop and flip are the CIFAR recipe; they would distort digits and clothing items."""
        if self.augment == "auto":
            return self.dataset in ("cifar10", "cifar100")
        return self.augment == "on"

    def to_plain(self) -> dict[str, Any]:
        """A YAML-ready dict (paths as strings), the algorithms' sections after ``finetune``."""
        plain: dict[str, Any] = {}
        for key, value in self.model_dump(mode="json").items():
            plain[key] = value
            if key == "finetune":
                for name, section in self.settings.items():
                    plain[name] = section.model_dump(mode="json", by_alias=True)
        return plain


DIGITS_DEFAULT: dict[str, Any] = {
    "dataset": "digits",
    "model": "digitcnn",
    "num_clients": 20,
    "partition": "shards",
    "shards_per_client": 2,
    "rounds": 40,
    "client_fraction": 0.5,
    "local_epochs": 2,
    "batch_size": 10,
    "lr": 0.05,
    "eval_every": 5,
    "finetune": {"part": "full", "epochs": 5, "lr": 0.01, "batch_size": 10},
}
"""The embedded default experiment: real handwritten digits, sized so ``make run`` takes seconds.
``configs/digits.yaml`` holds the same values, for users to copy."""


def _describe(err: ValidationError, prefix: str, known: list[str]) -> str:
    """The first error as ``key: what is wrong (got value)``, with a "did you mean" for an unknown key."""
    first = err.errors()[0]
    key = prefix + ".".join(str(p) for p in first["loc"])
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if not first["loc"]:
        return message
    if first["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(key, known, n=1)
        return f"unknown key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
    got = first.get("input")
    shown = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
    return f"{key}: {message}{shown}"


def _format_validation_error(err: ValidationError, source: str) -> str:
    catalog = _ALGORITHMS
    known = ([k for k in Config.model_fields if k != "settings"]
             + [f"finetune.{k}" for k in FinetuneConfig.model_fields] + [f"dp.{k}" for k in DpConfig.model_fields]
             + [f"hf.{k}" for k in HfConfig.model_fields]
             + list(catalog)
             + [f"{name}.{key}" for name, model in catalog.items() for key in _field_names(model)])
    return f"{source}: {_describe(err, '', known)}"


def parse_value(raw: str) -> Any:
    """Interpret an override the way YAML would, so ``--set lr=0.1`` and the file agree."""
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = target
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def nested(values: dict[str, Any]) -> dict[str, Any]:
    """``{"finetune.epochs": 3}`` as ``{"finetune": {"epochs": 3}}`` (a preset's grid keys are dotted)."""
    result: dict[str, Any] = {}
    for key, value in values.items():
        _set_dotted(result, key, value)
    return result


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["lr=0.1", "finetune.epochs=3"]`` into a nested dict."""
    flat: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set {pair!r}: expected key=value, e.g. --set rounds=10")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key:
            raise UserError(f"--set {pair!r}: the key before '=' is empty")
        flat.pop(key, None)
        flat[key] = parse_value(raw)
    return nested(flat)


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``, nested sections key by key.

    So ``--set finetune.lr=0.1`` changes one key of the file's ``finetune`` section and keeps the others.
    """
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a config file, turning every way it can be wrong into one clear line."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the config file ({exc.__class__.__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"{path}: YAML syntax error{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}")
    return data


def build_config(values: dict[str, Any], source: str = "config") -> Config:
    """Validate a plain dict into a :class:`Config`, or raise a one-line :class:`UserError`."""
    try:
        return Config.model_validate(values)
    except ValidationError as err:
        raise UserError(_format_validation_error(err, source)) from None


def load_config(
    path: Path | None = None,
    overrides: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Config:
    """The configuration a command runs with: the embedded digits default when no file is given."""
    values = read_yaml(path) if path is not None else dict(DIGITS_DEFAULT)
    source = str(path) if path is not None else "config"
    if extra:
        values = merge_dicts(values, extra)
    if overrides:
        values = merge_dicts(values, parse_overrides(overrides))
        source = f"{source} (with --set)"
    return build_config(values, source)


def dump_config(config: Config) -> str:
    """The resolved configuration as YAML, the form saved in every run folder."""
    return yaml.safe_dump(config.to_plain(), sort_keys=False)
