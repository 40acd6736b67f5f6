"""The contract between an algorithm and the engine.

An algorithm says these things and nothing else:

* which parts of the network the server aggregates (``shared_parts``) and which each client keeps
  for itself across rounds (``personal_parts``). A part is ``body``, ``head``, or a named module
  inside them (``head.scale``), see :func:`fedbabu.models.in_parts`;
* the head its model uses (:meth:`Algorithm.make_head`, by default the model's linear classifier):
  any module, still the model's one ``head`` child, drawn from the run's seed;
* what a client does in a round (:meth:`Algorithm.client_update`, by default SGD on
  ``trained_parts``) and what that SGD minimizes (:meth:`Algorithm.training_loss`, by default
  cross-entropy); an algorithm that keeps both defaults, and a new optimizer every round, can also
  have its clients trained together by the vectorized executor;
* how a client personalizes and is evaluated at the end (:meth:`Algorithm.personalize`, by default
  fine-tuning ``finetune.part``; an algorithm with an ``evaluation`` setting brings its own protocol,
  :meth:`Algorithm.own_personalize`, which that setting switches on);
* whether a client keeps its optimizer's momentum across rounds besides its personal parts
  (:attr:`Algorithm.keeps_momentum`; local training does), and which other tensors it keeps
  (:meth:`Algorithm.auxiliary_shapes`; FedALA's aggregation weights);
* which clients train in a round (:meth:`Algorithm.training_clients`, by default the sampled ones)
  and whether the initial global model is another run's final one (:attr:`Algorithm.warm_start`,
  LG-FedAvg's; by default the seed draws it);
* what the server does after averaging (:meth:`Algorithm.server_update`, by default nothing), from
  the previous global state and the *sum* over the round's clients of the statistics each client
  returned (``ClientUpdate.statistics``: per-class feature sums and counts, say). Sums are all an
  engine has to move, in the simulator and over Flower alike;
* what the server gives each client of its own after a round (:meth:`Algorithm.collaborate`, by
  default nothing), from what each accepted client reported, one by one (``ClientUpdate.report``:
  FedPAC's feature statistics and trained classifier). The values replace those of the client's
  personal state, as if it received them right after the round.

The engine owns sampling, scheduling, aggregation, processes and files; an algorithm never
sees them, which is why the same class runs in the simulator and in the Flower app. What the
engines derive from these declarations, the same for every algorithm (the initial model, the
tensors a client may keep, evaluation during training), is :mod:`fedbabu.engine.contract`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from fedbabu.algorithms.warm_start import WarmStart
from fedbabu.config import AlgorithmSettings, Config
from fedbabu.errors import UserError
from fedbabu.training import (
    ClientData,
    LocalTraining,
    Loss,
    Regularizer,
    evaluate,
    load_state,
    momentum_of,
    restore_momentum,
    set_trainable,
    sgd_epochs,
    state_of,
)

PersonalState = dict[str, torch.Tensor]

PERSONALIZATION_PROTOCOL = 2
"""Raised whenever the personalization of one trained model changes, so that results made under an
older protocol are recognised and personalized again: 1 built a new optimizer every fine-tuning
epoch and cut test sets into full batches plus a remainder; 2 runs every epoch through one
optimizer and evaluates a client's test set as one batch, as the authors do."""


@dataclass
class ClientUpdate:
    """What a client hands back after a round: its mean loss, its personal state (if any), statistics
    for :meth:`Algorithm.server_update`, which the engine sums over the round's clients, and a report
    for :meth:`Algorithm.collaborate`, which the server reads client by client."""

    loss: float
    personal: PersonalState = field(default_factory=dict)
    statistics: dict[str, torch.Tensor] = field(default_factory=dict)
    report: dict[str, torch.Tensor] = field(default_factory=dict)
    """Values the server needs from this client alone, never summed (FedPAC's feature statistics and
    trained classifier): unlike ``statistics`` they reveal one client's state, so they travel only for an
    algorithm that collaborates, and an empty report costs nothing on the wire."""


class Algorithm:
    """FedAvg-style training of ``trained_parts``; subclasses override only what differs."""

    name: ClassVar[str] = ""
    shared_parts: ClassVar[tuple[str, ...]] = ("body", "head")
    trained_parts: ClassVar[tuple[str, ...]] = ("body", "head")
    personal_parts: ClassVar[tuple[str, ...]] = ()
    Settings: ClassVar[type[AlgorithmSettings]] = AlgorithmSettings
    """The algorithm's own settings, its section of the config (``ditto.lambda``); none by default."""
    warm_start: ClassVar[WarmStart | None] = None
    """A finished run whose final model this algorithm starts from (LG-FedAvg: FedAvg's); ``compare`` and
    ``reproduce`` run that phase first when the config names none."""
    keeps_momentum: ClassVar[bool] = False
    """Whether a client keeps its optimizer's momentum from round to round (``optimizer.<name>``
    entries of its personal state, see :data:`fedbabu.training.OPTIMIZER_STATE`)."""
    training_version: ClassVar[int] = 1
    """Raised whenever this algorithm trains differently under the same config. Runs record it
    (``summary.json``, ``algorithm_version``), so ``reproduce`` trains again a run an older build made
    instead of reusing it; a run that records none was made by version 1."""
    evaluation_version: ClassVar[int] = 1
    """Raised whenever :meth:`personalize` gives other results under the same settings, so that a
    finished run's clients are personalized again (no training) rather than read from its old files."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.settings = config.settings_for(self.name)
        self.check_config(config)

    def check_config(self, config: Config) -> None:
        """Refuse settings under which the algorithm cannot work (raise :class:`UserError`)."""

    def make_head(self, head: nn.Linear, generator: torch.Generator) -> nn.Module:
        """The head of this algorithm's model, given the model's seeded linear classifier.

        ``generator`` is seeded by the run's seed alone, so every party draws the same head. A head
        of its own names its pieces as modules or parameters (``head.prototypes``) so that parts can
        select them, and exposes ``in_features`` and ``weight``, the class matrix its logits are linear
        in. A head with per-client pieces also exposes ``shared_weight``, the class matrix of its shared
        pieces alone: the global model's, which the analysis reads.
        """
        return head

    def auxiliary_shapes(self, parameter_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Tensors a client keeps across rounds that are neither weights nor momentum, with their shapes,
        given the model's parameter shapes: none by default.

        A method whose client learns something besides its network (FedALA's element-wise aggregation
        weights) declares it here, each name starting with :data:`fedbabu.training.AUXILIARY_STATE`, so
        that the engine accepts it in a personal state and :func:`~fedbabu.training.load_state` never
        loads it into the network.
        """
        return {}

    def server_update(self, previous: dict[str, torch.Tensor], aggregated: dict[str, torch.Tensor],
                      statistics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The new global values of the shared parameters, after the server has averaged them.

        ``previous`` holds the shared parameters before the round, ``aggregated`` their average over
        the accepted clients, ``statistics`` the sum of those clients' ``ClientUpdate.statistics``.
        By default the average is the new state.
        """
        return aggregated

    def collaborate(self, reports: Mapping[int, dict[str, torch.Tensor]]) -> dict[int, PersonalState]:
        """New values of personal parameters that the server computes for the round's clients: none by default.

        ``reports`` holds, by client in client order, the non-empty ``ClientUpdate.report`` of each client
        whose update the round accepted; a round in which none reported does not ask. Each returned state
        overrides those entries of that client's personal state right after the round, before anything
        else reads it (its next round, evaluation, personalization), in the simulator and over Flower alike.
        A hook of its own because a personalized method may let clients learn from one another's personal
        parts without sharing them (FedPAC combines each client's classifier from the round's classifiers):
        the server's result differs per client, which neither the average nor :meth:`server_update` can
        express. Runs after :meth:`server_update`; an algorithm that keeps the default sends nothing more
        and changes nothing.
        """
        return {}

    def training_clients(self, sampled: list[int], participating: list[int]) -> list[int]:
        """The clients that train in a round, given the round's sample: by default exactly the sampled ones.

        ``participating`` are all the clients that may train, in client order: the federation less its
        held-out clients (``holdout_clients``), which no algorithm may train. An algorithm whose clients
        train independently of any sampling (local training) returns them all.
        """
        return sampled

    def final_lr(self) -> float:
        """The last round's lr: what a client's own evaluation pass after training runs at."""
        return self.config.lr_at(max(self.config.rounds - 1, 0))

    def local_training(self, lr: float) -> LocalTraining:
        """The round's optimizer settings (the lr comes from the engine's schedule)."""
        c = self.config
        return LocalTraining(c.local_epochs, c.batch_size, lr, c.momentum, c.weight_decay, c.clip_grad_norm)

    def continued_optimizer(self, model: nn.Module, personal: PersonalState,
                            settings: LocalTraining) -> torch.optim.Optimizer:
        """A new SGD over the trained parts that continues the momentum the client kept (``keeps_momentum``):
        SGD's buffer does not depend on the lr, so this is one optimizer for the whole run, as an
        author's code that builds it once per client has."""
        optimizer = torch.optim.SGD(set_trainable(model, self.trained_parts), lr=settings.lr,
                                    momentum=settings.momentum, weight_decay=settings.weight_decay)
        restore_momentum(model, optimizer, personal)
        return optimizer

    def training_loss(self, data: ClientData) -> Loss | None:
        """What a client's local SGD minimizes on its own data, ``(logits, labels) -> mean loss``; None is
        cross-entropy.

        A hook rather than a reason to override :meth:`client_update`: an algorithm whose round differs
        only in its objective (FedETF's balanced softmax on the client's class counts) keeps the default
        round, and with it the kept optimizer and everything tested on it. Asked once per round, so the
        loss may depend on the client's data.
        """
        return None

    def client_update(self, model: nn.Module, data: ClientData, personal: PersonalState, lr: float,
                      generator: torch.Generator) -> ClientUpdate:
        """One round on one client: SGD of ``trained_parts`` on :meth:`training_loss`.

        ``model`` holds the global state; personal parts are loaded here. A client that
        :attr:`keeps_momentum` trains through its :meth:`continued_optimizer` and hands the buffers back
        beside its personal parts, so that the next round continues the same optimizer.
        """
        load_state(model, personal)
        settings = self.local_training(lr)
        optimizer = self.continued_optimizer(model, personal, settings) if self.keeps_momentum else None
        loss = sgd_epochs(model, data, self.trained_parts, settings, generator, optimizer=optimizer,
                          loss=self.training_loss(data))
        kept = state_of(model, self.personal_parts)
        return ClientUpdate(loss, kept if optimizer is None else kept | momentum_of(model, optimizer))

    def evaluates_own(self) -> bool:
        """Whether :meth:`personalize` runs the algorithm's own protocol, which its ``evaluation`` setting
        switches on (``own``) or replaces by the fine-tuning every algorithm here is compared under
        (``common``). An algorithm without that setting has a single protocol."""
        return getattr(self.settings, "evaluation", None) == "own"

    def personalize(self, model: nn.Module, data: ClientData, personal: PersonalState,
                    generator: torch.Generator) -> list[float]:
        """Accuracy before fine-tuning, then after each fine-tuning epoch on the client's own data, or
        :meth:`own_personalize` where :meth:`evaluates_own`.

        All epochs run through one SGD optimizer, as the authors' evaluation does: a new optimizer
        per epoch would throw the momentum away and slow the fine-tuning of every model whose head
        has to move far (FedAvg's, measured several points lower after five epochs).
        """
        if self.evaluates_own():
            return self.own_personalize(model, data, personal, generator)
        ft = self.config.finetune
        load_state(model, personal)
        accuracies = [evaluate(model, data)]
        settings = LocalTraining(ft.epochs, ft.batch_size, ft.lr, ft.momentum, ft.weight_decay)
        parts = ("body", "head") if ft.part == "full" else (ft.part,)
        sgd_epochs(model, data, parts, settings, generator,
                   after_epoch=lambda: accuracies.append(evaluate(model, data)))
        return accuracies

    def own_personalize(self, model: nn.Module, data: ClientData, personal: PersonalState,
                        generator: torch.Generator) -> list[float]:
        """The own protocol: by default accuracy before and after one more local round from the final
        model, at the final round's lr, without fine-tuning.

        That is how the authors of FedRep, FedRoD, FedUH, FedNH, FedPAC, pFedMe and APFL test a client:
        with the model it holds right after its local training. The fresh round gives every client that
        model, whenever it was last sampled. The model tested is the network with the personal state the
        round returns loaded over it: for most methods that is what the network already holds, while a
        method whose client predicts with a personal model the round leaves beside the network (pFedMe's
        ``theta``, APFL's mixture) is tested with that model.
        """
        load_state(model, personal)
        accuracies = [evaluate(model, data)]
        update = self.client_update(model, data, personal, self.final_lr(), generator)
        load_state(model, update.personal)
        accuracies.append(evaluate(model, data))
        return accuracies

    def personalization_unit(self) -> str:
        """What one step of the accuracy curve returned by :meth:`personalize` stands for (an epoch of
        fine-tuning, or :meth:`own_unit`): it names the columns of ``clients.csv`` and the x axis of the
        curves."""
        return self.own_unit() if self.evaluates_own() else "epoch"

    def own_unit(self) -> str:
        """What one step of the own protocol's curve stands for: by default its one local round."""
        return "round"

    def personalization_note(self) -> str:
        """How :meth:`personalize` adapts a client, as reports print it.

        Fine-tuning chosen over an algorithm's own protocol by default (the head family's) is marked
        ``common protocol``, so that a report never passes it off as the method's own evaluation; an
        algorithm whose default is the common protocol (FedRep) reads like every other.
        """
        if self.evaluates_own():
            return self.own_note()
        ft = self.config.finetune
        note = f"{ft.part} fine-tuning, {ft.epochs} epochs, lr {ft.lr}"
        evaluation = self.Settings.model_fields.get("evaluation")
        return f"common protocol: {note}" if evaluation is not None and evaluation.default == "own" else note

    def own_note(self) -> str:
        """How :meth:`own_personalize` adapts a client, as reports print it."""
        return (f"{self.name}'s own: one local round ({self.config.local_epochs} epochs at the final lr "
                f"{self.final_lr():g}), no fine-tuning")


def recorded_versions(summary: Mapping[str, object]) -> dict[str, int]:
    """The algorithm versions a run's ``summary.json`` records; 1 for a run of a build that recorded none."""
    recorded = summary.get("algorithm_version")
    recorded = recorded if isinstance(recorded, Mapping) else {}
    return {key: int(recorded.get(key, 1)) for key in ("training", "evaluation")}


def refuse(key: str, message: str) -> UserError:
    """The error an algorithm raises for a setting it cannot work with."""
    return UserError(f"{key}: {message}")


def proximal(anchor: dict[str, torch.Tensor], coefficient: float) -> Regularizer:
    """``coefficient / 2 * ||w - anchor||^2`` over the anchored parameters (FedProx's and Ditto's term).

    The term is always added, even with a zero coefficient, so that "coefficient 0 = no term" is
    a property the tests can check rather than a special case.
    """

    def term(model: nn.Module) -> torch.Tensor:
        total = sum(((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n in anchor)
        return 0.5 * coefficient * total

    return term


def check_proximal_step(key: str, coefficient: float, config: Config) -> None:
    """Refuse a proximal coefficient for which SGD on the quadratic term alone diverges.

    Momentum SGD with step ``lr`` on ``c/2 ||w - a||^2`` is stable only while ``lr * c < 2 (1 + momentum)``.
    """
    limit = 2 * (1 + config.momentum) / config.lr
    if coefficient >= limit:
        raise refuse(key, f"{coefficient} makes local SGD diverge with lr {config.lr} and momentum "
                          f"{config.momentum}; expected a value below {limit:.4g}")
