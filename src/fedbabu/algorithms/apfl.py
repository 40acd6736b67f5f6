"""APFL (Deng, Kamani & Mahdavi, 2020): each client mixes the global model with a local one it learns.

A client keeps a local model ``v`` and a mixing weight ``alpha`` and predicts with the mixture
``alpha * v + (1 - alpha) * w`` of the two networks' parameters. Per batch it takes three steps:

1. the global copy ``w``, on its own loss, as FedAvg does (what the server averages);
2. the local ``v``, on the loss of the mixture (``alpha`` times the mixture's gradient);
3. ``alpha``, on the same loss: ``<v - w, grad f(mixture)> + 0.02 * alpha``, clipped to [0, 1].

Sources: the paper (Algorithm 1; the mixture of parameters, its alpha gradient ``<v - w, grad f>``,
updated every local step) and the authors' official code, FedTorch (MLOPTPSU/FedTorch,
``fedtorch/comms/trainings/federated/apfl.py`` and ``comms/utils/flow_utils.py``, ``alpha_update``),
whose settings we take: ``alpha`` starts at 0.5 (``--fed_personal_alpha``), steps at the round's lr,
carries the 0.02 L2 term and is clipped to [0, 1]; ``w`` steps before ``v``, and both use the run's
optimizer settings, each through its own SGD for the round.

Where paper and code differ we follow the paper, and say so: the code mixes the two networks' *outputs*
(``inference_personal``) and updates alpha once per round, from the first batch, with a gradient made
of the two networks' gradients; the paper mixes parameters and updates alpha at every step with the
exact gradient, which one network (the mixture) can be fine-tuned and analysed like any other.

The client's personal state: the mixture (as parameters, so that evaluation during training,
``personalize`` and ``analyze`` read the model it predicts with), ``v`` and ``alpha`` (auxiliary
entries). A client's ``v`` starts as the global model of its first round, as in FedTorch's clients,
which copy the server's model.

Evaluation (``apfl.evaluation``): ``own`` (the default) tests the mixture after one more local round
from the final global model (the authors test each client's mixture after its local training);
``common`` fine-tunes the mixture with the ``finetune.*`` settings, like every algorithm here.
Departures besides the above: the run's lr schedule, batch size and client sampling; no round picked
on test accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from fedbabu.algorithms.base import Algorithm, ClientUpdate, PersonalState
from fedbabu.config import AlgorithmSettings
from fedbabu.training import (
    AUXILIARY_STATE,
    ClientData,
    autocast_for,
    clip_gradients,
    set_trainable,
    state_of,
)

LOCAL = AUXILIARY_STATE + "local."
"""Prefix of the local model ``v``'s entries in a personal state (``state.local.<parameter name>``)."""
ALPHA = AUXILIARY_STATE + "alpha"
"""The personal state's entry holding the client's mixing weight, a one-element tensor."""
ALPHA_REGULARIZATION = 0.02
"""The L2 coefficient on alpha in its gradient (FedTorch's ``alpha_update``)."""


class APFL(Algorithm):
    name = "apfl"

    class Settings(AlgorithmSettings):
        alpha: float = Field(0.5, ge=0, le=1)
        """The mixing weight every client starts with (FedTorch's ``--fed_personal_alpha``: 0.5)."""
        alpha_lr: float | None = Field(None, gt=0)
        """Step size of alpha; unset = the round's lr, as the authors step it."""
        adaptive_alpha: bool = True
        """Learn alpha (FedTorch's ``--fed_adaptive_alpha``); false keeps it at ``alpha``."""
        evaluation: Literal["own", "common"] = "own"
        """``own``: the mixture after one more local round, no fine-tuning; ``common``: the ``finetune.*``
        fine-tuning of the mixture."""
        evaluation_keys: ClassVar[tuple[str, ...]] = ("evaluation",)

    settings: Settings
    shared_parts = ("body", "head")
    trained_parts = ("body", "head")
    personal_parts = ("body", "head")

    def auxiliary_shapes(self, parameter_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The local model ``v`` (one entry per parameter) and alpha."""
        return {LOCAL + name: shape for name, shape in parameter_shapes.items()} | {ALPHA: (1,)}

    def client_update(self, model: nn.Module, data: ClientData, personal: PersonalState, lr: float,
                      generator: torch.Generator) -> ClientUpdate:
        """Per batch: the global copy's step, then the local model's and alpha's on the mixture's loss.

        The network is the global copy throughout (what the server averages); ``v`` lives beside it.
        """
        own, settings = self.settings, self.local_training(lr)
        if data.num_train == 0:
            return ClientUpdate(float("nan"), dict(personal))
        received = state_of(model, self.trained_parts)
        # in the network's memory format, whatever a personal state's arrays came back in: the convolutions
        # of the mixture then compute alike on every worker
        local = {name: torch.empty_like(value).copy_(personal[LOCAL + name] if personal else value)
                 for name, value in received.items()}
        alpha = float(personal[ALPHA]) if personal else own.alpha
        alpha_lr = lr if own.alpha_lr is None else own.alpha_lr
        params = set_trainable(model, self.trained_parts)
        named = {name: p for name, p in model.named_parameters() if p.requires_grad}
        global_step = torch.optim.SGD(params, lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
        local_step = torch.optim.SGD(list(local.values()), lr=lr, momentum=settings.momentum,
                                     weight_decay=settings.weight_decay)
        total, batches = 0.0, 0
        model.train()
        for _ in range(settings.epochs):
            for x, y in data.train_batches(settings.batch_size, generator):
                with autocast_for(data.runtime):
                    loss = nn.functional.cross_entropy(model(x), y)
                global_step.zero_grad(set_to_none=True)
                loss.backward()
                clip_gradients(params, settings)
                global_step.step()
                mixture = {name: (alpha * local[name] + (1 - alpha) * p.detach()).requires_grad_()
                           for name, p in named.items()}
                with autocast_for(data.runtime):
                    mixture_loss = nn.functional.cross_entropy(functional_call(model, mixture, (x,)), y)
                grads = torch.autograd.grad(mixture_loss, list(mixture.values()))
                with torch.no_grad():
                    alpha_grad = sum(float(((local[name] - named[name]) * grad).sum())
                                     for name, grad in zip(mixture, grads, strict=True))
                for name, grad in zip(mixture, grads, strict=True):
                    local[name].grad = alpha * grad
                clip_gradients(list(local.values()), settings)
                local_step.step()
                if own.adaptive_alpha:
                    alpha = min(max(alpha - alpha_lr * (alpha_grad + ALPHA_REGULARIZATION * alpha), 0.0), 1.0)
                total += loss.item()
                batches += 1
        set_trainable(model, ())
        kept = {name: alpha * local[name] + (1 - alpha) * p.detach() for name, p in named.items()}
        return ClientUpdate(total / batches, kept | {LOCAL + name: v.detach() for name, v in local.items()}
                            | {ALPHA: torch.tensor([alpha])})

    def own_note(self) -> str:
        return (f"APFL's own: the mixture after one local round ({self.config.local_epochs} epochs at the final lr "
                f"{self.final_lr():g}), no fine-tuning")
