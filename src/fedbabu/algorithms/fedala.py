"""FedALA (Zhang et al., AAAI 2023): adaptive local aggregation of the global model into the local one.

FedAvg, except for how a client starts its round. Instead of overwriting its local model with the
global one it received, it *aggregates* the two (the paper's Section 4, Algorithm 1 lines 6-16; the
authors' ``system/utils/ALA.py`` in TsingZ0/FedALA, called from ``clientALA.local_initialization``):

* the lower layers are taken from the global model;
* the top ``fedala.layer_idx`` parameter tensors (2 by default, ``run_me.sh``'s ``-p 2``: the head's
  weight and bias, i.e. the paper's one top layer; 0 means every parameter, as ``ALA.py``'s default)
  become ``local + (global - local) * W``, with element-wise weights ``W`` that start at ones and are
  learned on the client's data: one forward pass through the mixed model per batch, then
  ``W <- clip(W - eta * grad * (global - local), 0, 1)`` and the mixed model rebuilt from the new ``W``;
* the data for ``W`` is a contiguous ``rand_percent``% slice of the client's training set at a random
  offset, in its stored order, batched at the run's batch size (``ALA.py``'s ``rand_loader``);
* the first time the client aggregates, ``W`` trains until the losses settle (the standard deviation of
  the last ``num_pre_loss`` = 10 epochs' final-batch losses below ``threshold`` = 0.1, ``ALA.py``'s
  defaults, with at least 11 epochs; ``fedala.max_settle_epochs`` bounds it, unbounded by default as
  theirs); every later time for one pass.

Then the client trains the whole aggregated model as FedAvg does and sends it; the server averages
everything. The client keeps the model it trained (its local model) and ``W`` across rounds, and a
flag saying whether its first, until-convergence aggregation happened (the only place ``ALA.py``'s
``start_phase`` can live here). Defaults: ``eta = 1.0``, ``rand_percent = 80``, ``layer_idx = 2``
(``run_me.sh``, ``main.py``).

Evaluation (``fedala.evaluation: own``, the default) is theirs: ``serverALA.train`` evaluates every
client right after ``send_models``, i.e. its local model after aggregating the current global model.
Here each client aggregates the final global model into the local model it kept, then is tested; the
curve is the accuracy of the kept local model, then after that aggregation (its unit: one
aggregation). ``common`` fine-tunes the kept local model like every algorithm here.

Departures:

* their server aggregates into every client's model every round, sampled or not (``send_models``
  loops over all clients); here a client aggregates when it trains and at the final evaluation, so a
  client's first aggregation is the one of its second round of training. With their default join
  ratio 1 (every client every round) the two coincide;
* a client that holds no local model yet (its first round) starts from the global model, which is
  what ``ALA.py`` does on the first iteration (it skips when the first parameter tensors of the two
  models agree); we skip whenever the kept local model equals the received one in every parameter;
* a client whose slice is empty (fewer than two training images at 80%) mixes with its current ``W``
  without learning it, where ``ALA.py`` would fail;
* the slice is not augmented (their datasets have no augmentation).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from fedbabu.algorithms.base import Algorithm, ClientUpdate, PersonalState
from fedbabu.config import AlgorithmSettings
from fedbabu.training import (
    AUXILIARY_STATE,
    ClientData,
    autocast_for,
    evaluate,
    load_state,
    set_trainable,
    sgd_epochs,
    state_of,
)

WEIGHTS = AUXILIARY_STATE + "ala_weight."
"""Prefix of a client's aggregation weights, one tensor per aggregated parameter (``state.ala_weight.head.bias``)."""
LEARNED = AUXILIARY_STATE + "ala_learned"
"""1 once the client's first, until-convergence aggregation has run (``ALA.py``'s ``start_phase`` over)."""


class FedALA(Algorithm):
    name = "fedala"

    class Settings(AlgorithmSettings):
        eta: float = Field(1.0, gt=0)
        """Learning rate of the aggregation weights (``-et 1``)."""
        rand_percent: int = Field(80, ge=0, le=100)
        """Percentage of the client's training data the weights are learned on (``-s 80``)."""
        layer_idx: int = Field(2, ge=0)
        """How many of the last parameter tensors are aggregated element-wise (``-p 2``: the head's weight and
        bias); the rest come from the global model; 0 aggregates all of them."""
        threshold: float = Field(0.1, gt=0)
        """The first aggregation trains until the std of the recent losses is below this (``ALA.py``: 0.1)."""
        num_pre_loss: int = Field(10, ge=1)
        """How many recent epochs' losses that std is over (``ALA.py``: 10)."""
        max_settle_epochs: int | None = Field(None, ge=1)
        """At most this many epochs for the first aggregation; none (the default) trains until the losses
        settle, however long that takes, as ``ALA.py`` does. A bound for runs whose losses may never settle
        (a large ``eta``, noisy labels): reaching it stops the loop there, as if they had."""
        evaluation: Literal["own", "common"] = "own"
        """``own``: aggregate the final global model into the kept local model, then test (their evaluation);
        ``common``: the ``finetune.*`` fine-tuning every algorithm here is compared under."""
        evaluation_keys: ClassVar[tuple[str, ...]] = ("evaluation",)

    settings: Settings
    shared_parts = ("body", "head")
    trained_parts = ("body", "head")
    personal_parts = ("body", "head")

    def aggregated_names(self, names: list[str]) -> list[str]:
        """The parameters aggregated element-wise: the last ``layer_idx`` in the model's order (all for 0)."""
        count = self.settings.layer_idx
        return names[-count:] if count else list(names)

    def auxiliary_shapes(self, parameter_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The aggregation weights, shaped as the parameters they aggregate, and the first-aggregation flag."""
        aggregated = self.aggregated_names(list(parameter_shapes))
        return {WEIGHTS + name: tuple(parameter_shapes[name]) for name in aggregated} | {LEARNED: ()}

    def client_update(self, model: nn.Module, data: ClientData, personal: PersonalState, lr: float,
                      generator: torch.Generator) -> ClientUpdate:
        """Aggregate the received global model into the local one, then train it all as FedAvg does."""
        kept = self.local_initialization(model, data, personal, generator)
        loss = sgd_epochs(model, data, self.trained_parts, self.local_training(lr), generator)
        return ClientUpdate(loss, state_of(model, self.personal_parts) | kept)

    def local_initialization(self, model: nn.Module, data: ClientData, personal: PersonalState,
                             generator: torch.Generator) -> PersonalState:
        """Turn ``model``, which holds the received global model, into the client's initialized local model;
        return the aggregation weights and flag to keep.

        A client without a local model (or whose local model is the global one) starts from the global
        model with the weights untouched, as ``ALA.py`` skips its first iteration.
        """
        params = dict(model.named_parameters())
        names = self.aggregated_names(list(params))
        if not personal:
            return {**{WEIGHTS + n: torch.ones_like(params[n]) for n in names},
                    LEARNED: torch.tensor(0.0)}
        weights = {n: personal[WEIGHTS + n].to(params[n].device, copy=True) for n in names}
        learned = bool(personal[LEARNED].item())
        if all(torch.equal(personal[n].to(p.device), p) for n, p in params.items()):
            return {**{WEIGHTS + n: w for n, w in weights.items()}, LEARNED: torch.tensor(float(learned))}
        received = {n: params[n].detach().clone() for n in names}
        local = {n: personal[n].to(params[n].device) for n in names}
        self.learn_weights(model, data, local, received, weights, until_settled=not learned, generator=generator)
        with torch.no_grad():
            for n in names:
                params[n].copy_(local[n] + (received[n] - local[n]) * weights[n])
        return {**{WEIGHTS + n: w for n, w in weights.items()}, LEARNED: torch.tensor(1.0)}

    def learn_weights(self, model: nn.Module, data: ClientData, local: dict[str, torch.Tensor],
                      received: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], until_settled: bool,
                      generator: torch.Generator) -> None:
        """Train ``weights`` in place on a random contiguous slice of the client's training data.

        The aggregated parameters of ``model`` hold the mixture under the current weights (the lower ones
        already hold the global model); the gradient of the loss with respect to a mixed parameter,
        times ``global - local``, is the gradient with respect to its weights.
        """
        own = self.settings
        count = int(own.rand_percent / 100 * data.num_train)
        if count == 0:
            return
        start = int(torch.randint(0, data.num_train - count + 1, (1,), generator=generator))
        window = data.train_idx[start:start + count]
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in weights:
                params[n].copy_(local[n] + (received[n] - local[n]) * weights[n])
        set_trainable(model, tuple(weights))
        model.train()
        device, losses = data.runtime.device, []
        while True:
            for idx in window.split(self.config.batch_size):
                x = data.normalize(data.dataset.train_x[idx], device)
                y = data.dataset.train_y[idx].to(device)
                with autocast_for(data.runtime):
                    loss = nn.functional.cross_entropy(model(x), y)
                model.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    for n, w in weights.items():
                        gap = received[n] - local[n]
                        w.copy_(torch.clamp(w - own.eta * params[n].grad * gap, 0, 1))
                        params[n].copy_(local[n] + gap * w)
            losses.append(loss.item())
            settled = len(losses) > own.num_pre_loss and np.std(losses[-own.num_pre_loss:]) < own.threshold
            if not until_settled or settled or len(losses) == own.max_settle_epochs:
                break
        set_trainable(model, ())

    def own_personalize(self, model: nn.Module, data: ClientData, personal: PersonalState,
                        generator: torch.Generator) -> list[float]:
        """The kept local model's accuracy, then the accuracy after aggregating the final global model into it."""
        received = state_of(model, ("body", "head"))
        load_state(model, personal)
        accuracies = [evaluate(model, data)]
        load_state(model, received)
        self.local_initialization(model, data, personal, generator)
        accuracies.append(evaluate(model, data))
        return accuracies

    def own_unit(self) -> str:
        return "aggregation"

    def own_note(self) -> str:
        own = self.settings
        return ("FedALA's own: the final global model adaptively aggregated into each client's local model "
                f"(top {own.layer_idx or 'all'} parameter tensors, eta {own.eta:g}), no fine-tuning")
