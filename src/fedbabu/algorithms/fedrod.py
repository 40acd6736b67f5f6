"""FedRoD (Chen & Chao, ICLR 2022): one body, a shared *generic* head and a *personal* head per client.

The server averages the body and the generic head, which each client trains with the balanced
softmax loss (cross-entropy of the logits plus the log of its own class counts), so that the
generic model learns as if every client's data were class-balanced. Each client also keeps a
personal linear head, never sent, trained with plain cross-entropy as a residual on top of the
generic logits: a client predicts with ``generic(z) + personal(z)``.

The authors released no code (their repository holds only a README), so we follow the
reimplementations, PFLlib's ``clientrod.py`` and the FedROD in FedNH-official's ``FedROD.py``
(which credits the original code), and say which where they differ:

* the personal head starts as a copy of the initial generic head, as in every implementation;
* the round is their per-batch form (PFLlib; FedNH-official's ``_train_together``; FedETF-official
  and fluke alike): the balanced softmax loss steps the body and the generic head with the run's
  lr, momentum and weight decay, then ``CE(g.detach() + personal(z.detach()), y)`` steps the
  personal head alone through a second, plain SGD with the same lr and no momentum. The detaches
  keep the personal loss out of the shared parts, so what the server averages never depends on a
  personal head. FL-bench, which trains the body through the personal loss too, is not followed;
* a class absent on the client gets the count 1e-12 (FedNH-official): a log-prior of about -27.6
  instead of PFLlib's -inf, the same loss up to ~1e-12 on the classes the client holds, and never
  NaN; FedETF-official's count 1 keeps absent classes as likely as a class seen once, unlike both;
* no exponent on the counts (FL-bench's ``gamma``, default 1); the server's mean is weighted by
  client size, as in PFLlib and FL-bench (FedNH-official averages uniformly);
* training: ``fedrod.training: common`` (the default) uses the run's shared settings, in the presets
  FedBABU's (lr 0.1 stepped, batch 50, no weight decay, no clipping), untuned for this method;
  ``authors`` uses FedNH-official's CIFAR-10 script, which runs their FedROD: lr 0.01 times 0.99
  every round, batch 64, momentum 0.9, weight decay 1e-5, and the shared step's gradient clipped
  to norm 10 (the personal head's step is not clipped, as in their code);
* evaluation (``fedrod.evaluation: own``) is FedRoD's: generic + personal logits, no fine-tuning,
  after one more local round from the final model and the client's kept personal head, at the
  final round's lr. Every implementation tests the model a client holds right after its local
  training; the fresh round gives every client that, whenever it was last sampled (a client's
  kept head would otherwise be as old as its last round, or the initial one for a client never
  sampled), as FedUH's, FedNH's and FedETF's own evaluations do. ``common`` fine-tunes like every
  other algorithm here, for a comparison under one protocol.

Left out: FedNH-official's "separate" phases (all balanced epochs, then all personal-head epochs on
features of the updated body) and the hypernetwork their CIFAR scripts turn on, which generates the
personal head from the label distribution and is averaged with the body (FL-bench has another); both
are variants, not the method's core, and ``training: authors`` takes their numbers, not those.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from fedbabu.algorithms.base import Algorithm, ClientUpdate, PersonalState
from fedbabu.algorithms.feduh import FEDNH_AUTHORS_TRAINING
from fedbabu.config import AlgorithmSettings
from fedbabu.models import in_parts
from fedbabu.training import (
    ClientData,
    Loss,
    autocast_for,
    balanced_softmax,
    clip_gradients,
    load_state,
    set_trainable,
    state_of,
)

ABSENT_CLASS_COUNT = 1e-12
"""The count balanced softmax gives a class the client does not hold (FedNH-official's FedROD.py)."""


class RoDHead(nn.Module):
    """A generic and a personal linear head over the same features; the prediction is their sum."""

    def __init__(self, generic: nn.Linear) -> None:
        super().__init__()
        self.generic = generic
        self.personal = copy.deepcopy(generic)
        self.in_features = generic.in_features

    @property
    def weight(self) -> torch.Tensor:
        """The class matrix (C x d) the personalized logits are linear in: what head geometry reads."""
        return self.generic.weight + self.personal.weight

    @property
    def shared_weight(self) -> torch.Tensor:
        """The generic head's class matrix: what the global model predicts with, the personal head
        being each client's own."""
        return self.generic.weight

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.generic(features) + self.personal(features)


class FedRoD(Algorithm):
    name = "fedrod"

    class Settings(AlgorithmSettings):
        evaluation: Literal["own", "common"] = "own"
        """``own``: FedRoD's evaluation, generic + personal logits after one more local round, no
        fine-tuning; ``common``: the ``finetune.*`` fine-tuning every algorithm here is compared under."""
        training: Literal["common", "authors"] = "common"
        """``common``: the run's shared training settings; ``authors``: FedNH-official's CIFAR-10 script's."""
        evaluation_keys: ClassVar[tuple[str, ...]] = ("evaluation",)
        training_options: ClassVar[dict[str, dict[str, Any]]] = {"authors": FEDNH_AUTHORS_TRAINING}

    settings: Settings
    evaluation_version = 2  # 1 tested the personal heads as last trained, without a final local round
    shared_parts = ("body", "head.generic")
    trained_parts = ("body", "head")
    personal_parts = ("head.personal",)

    def make_head(self, head: nn.Linear, generator: torch.Generator) -> nn.Module:
        """The seeded linear head becomes the generic one; the personal head is its copy (no draw)."""
        return RoDHead(head)

    def training_loss(self, data: ClientData) -> Loss:
        """Balanced softmax on the client's counts, a class it lacks counted as :data:`ABSENT_CLASS_COUNT`:
        the objective of the body and the generic head, to whose logits alone the round applies it."""
        return balanced_softmax(data.class_counts(), absent=ABSENT_CLASS_COUNT)

    def client_update(self, model: nn.Module, data: ClientData, personal: PersonalState, lr: float,
                      generator: torch.Generator) -> ClientUpdate:
        """Per batch, the balanced step of body + generic head, then the personal head's residual step.

        Both optimizers serve the whole round, so the shared parts' momentum carries across epochs;
        the loss reported is the mean balanced softmax loss, the objective of what the server averages.
        """
        load_state(model, personal)
        if data.num_train == 0:
            return ClientUpdate(float("nan"), state_of(model, self.personal_parts))
        settings = self.local_training(lr)
        named = [(n, p) for n, p in model.named_parameters() if in_parts(n, self.trained_parts)]
        set_trainable(model, self.trained_parts)
        shared_params = [p for n, p in named if in_parts(n, self.shared_parts)]
        shared = torch.optim.SGD(shared_params, lr=lr, momentum=settings.momentum,
                                 weight_decay=settings.weight_decay)
        own = torch.optim.SGD([p for n, p in named if in_parts(n, self.personal_parts)], lr=lr)
        generic_loss = self.training_loss(data)
        head: RoDHead = model.head
        total, batches = 0.0, 0
        model.train()
        for _ in range(settings.epochs):
            for x, y in data.train_batches(settings.batch_size, generator):
                with autocast_for(data.runtime):
                    features = model.body(x)
                    generic = head.generic(features)
                    loss = generic_loss(generic, y)
                shared.zero_grad(set_to_none=True)
                loss.backward()
                clip_gradients(shared_params, settings)
                shared.step()
                with autocast_for(data.runtime):
                    personal_loss = nn.functional.cross_entropy(
                        generic.detach() + head.personal(features.detach()), y)
                own.zero_grad(set_to_none=True)
                personal_loss.backward()
                own.step()
                total += loss.item()
                batches += 1
        set_trainable(model, ())
        return ClientUpdate(total / batches, state_of(model, self.personal_parts))

    def own_note(self) -> str:
        return (f"FedRoD's own: generic + personal logits after one local round ({self.config.local_epochs} epochs "
                f"at the final lr {self.final_lr():g}), no fine-tuning")
