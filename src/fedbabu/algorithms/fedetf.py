"""FedETF (Li et al., ICCV 2023): a fixed simplex-ETF classifier, a learnable projection and temperature.

The head maps the body's features through a learnable projection, normalizes them to unit length
and scores them against the columns of a fixed simplex equiangular tight frame M (unit class
vectors, pairwise cosine ``-1/(C-1)``), scaled by a learnable temperature beta. Clients train the
body, the projection and beta with the balanced-softmax loss on their own class counts; the server
averages those three and never touches M. To personalize, a client trains a few more epochs the
same way and then alternates between fitting its own copy of M and fitting the projection.

Taken from the authors' code (ZexiLee/ICCV-2023-FedETF): the construction of M from the reduced QR
of a Uniform[0, 1) matrix (``models_dict/proto_classifiers.py``); the head as projection, L2
normalization (eps 1e-12), M and beta, with beta starting at 10 as in their CIFAR-10 CNN and the ETF
as wide as the body's features (their CNN's 64 -> 64) (``models_dict/cnn.py``); the balanced softmax
with a missing class counted once (``client_funct.py``, ``nodes.py``); and the personalization
constants: 3 more epochs, then 20 alternations of 3 epochs on M (SGD lr 0.1, no momentum or decay)
and 3 on the projection (lr 0.05, momentum 0.9, decay 5e-4), both with plain cross-entropy
(``client_funct.py``, ``main.py``).

Where we differ, and why:

* M is a parameter (``head.etf``), not a bare tensor, so that checkpoints, the flat global vector and
  personalization carry it. It is neither trained nor shared during federation, so it stays
  bit-identical to the one every party draws from the run's seed (the authors push the server's copy
  to every client each round, which is the same thing).
* Training: ``fedetf.training: common`` (the default) trains with the run's shared settings, in the
  presets FedBABU's (lr 0.1 stepped, batch 50, no weight decay): untuned for this method, and the
  client's optimizer is new every round, as for every other algorithm here. ``training: authors``
  sets their values (``args.py``, ``main.py`` for CIFAR-10): lr 0.04, constant (their scheduler call
  is commented out), batch 128, momentum 0.9, weight decay 5e-4, and keeps each client's optimizer
  for the whole run as their ``Node`` does: its momentum carries from one of the client's rounds to
  the next and into the adaptation epochs of the personalization.
* The adaptation epochs run at the final round's lr with the run's momentum and weight decay (under
  their training: their constant 0.04). The alternations' lrs are theirs relative to it: M at 2.5x
  and the projection at 1.25x the adaptation lr (their 0.1 and 0.05 over 0.04), unless
  ``fedetf.etf_lr`` or ``fedetf.projection_lr`` is set. Under the common training that is 0.0025
  and 0.00125, rather than their fixed 0.1 and 0.05, which would be 100 and 50 times the
  adaptation lr of 0.001.
* They predict with the argmax of the cosines without beta; ours keeps beta in the logits, the same
  prediction while beta is positive (``fedetf.temperature`` must start positive, and training would
  have to drive it through zero to change a prediction).
* They measure personalized accuracy on 30% of each client's data held out from training; we use the
  client's test set, as for every algorithm, and record the accuracy after the adaptation and after
  each alternation rather than only at the end.
* ``fedetf.evaluation = common`` replaces their protocol by the fine-tuning every other algorithm
  here is evaluated with (``finetune.*``), to compare training rules under one evaluation.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from fedbabu.algorithms.base import Algorithm, PersonalState, refuse
from fedbabu.config import AlgorithmSettings, Config
from fedbabu.training import ClientData, LocalTraining, Loss, balanced_softmax, evaluate, sgd_epochs

ETF_LR_RATIO = 0.1 / 0.04
"""The authors' lr for fitting M over their training (and adaptation) lr."""
PROJECTION_LR_RATIO = 0.05 / 0.04
"""The authors' lr for fitting the projection over their training lr."""

FEDETF_AUTHORS_TRAINING: dict[str, Any] = {
    "lr": 0.04, "lr_schedule": "step", "lr_milestones": [], "batch_size": 128, "momentum": 0.9,
    "weight_decay": 5e-4, "clip_grad_norm": None,
}
"""The shared training values of the FedETF authors' CIFAR-10 runs (constant lr, no clipping)."""


def orthonormal_columns(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """P (rows x columns) with PᵀP = I: the reduced QR of a Uniform[0, 1) matrix, in float64."""
    uniform = torch.rand(rows, columns, generator=generator, dtype=torch.float64)
    basis, _ = torch.linalg.qr(uniform, mode="reduced")
    return basis


def simplex_etf(basis: torch.Tensor) -> torch.Tensor:
    """M = sqrt(C/(C-1)) P (I - 11ᵀ/C): C unit columns with pairwise inner products -1/(C-1), summing to 0."""
    classes = basis.shape[1]
    centering = torch.eye(classes, dtype=basis.dtype) - torch.full((classes, classes), 1.0 / classes,
                                                                    dtype=basis.dtype)
    return math.sqrt(classes / (classes - 1)) * basis @ centering


class ETFHead(nn.Module):
    """logits = beta * normalize(projection(z)) @ M, with M (``etf``) fixed during federation.

    ``in_features`` and ``weight`` (the class vectors, one row per class) are what the project's
    feature analyses read from any head.
    """

    def __init__(self, in_features: int, etf_dim: int, num_classes: int, temperature: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.in_features = in_features
        self.etf = nn.Parameter(simplex_etf(orthonormal_columns(etf_dim, num_classes, generator)).float())
        self.projection = nn.Linear(in_features, etf_dim)
        bound = 1 / math.sqrt(in_features)  # nn.Linear's own initialization, drawn from the run's generator
        with torch.no_grad():
            nn.init.uniform_(self.projection.weight, -bound, bound, generator=generator)
            nn.init.uniform_(self.projection.bias, -bound, bound, generator=generator)
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))

    @property
    def weight(self) -> torch.Tensor:
        return self.etf.T

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        directions = nn.functional.normalize(self.projection(features), dim=1, eps=1e-12)
        return self.temperature * (directions @ self.etf)


class FedETF(Algorithm):
    name = "fedetf"

    class Settings(AlgorithmSettings):
        etf_dim: int | None = Field(None, ge=1)
        """Width of the projection and of M; unset = the body's feature count (the authors' CNN: 64 -> 64).
        Must be at least the number of classes."""
        temperature: float = Field(10.0, gt=0)
        """Initial beta: the authors' CIFAR-10 CNN starts at 10, their ResNets at 1."""
        evaluation: Literal["own", "common"] = "own"
        """``own``: the authors' adaptation (below); ``common``: the ``finetune.*`` fine-tuning of every algorithm."""
        adapt_epochs: int | None = Field(None, ge=0)
        """Own protocol: epochs of FedETF training before the alternations; unset = ``local_epochs`` (theirs: 3)."""
        alternations: int = Field(20, ge=0)
        """Own protocol: rounds of (fit M, then fit the projection)."""
        etf_epochs: int = Field(3, ge=0)
        etf_lr: float | None = Field(None, gt=0)
        """lr of fitting M; unset = 2.5x the adaptation lr (the authors' 0.1 over their 0.04)."""
        projection_epochs: int = Field(3, ge=0)
        projection_lr: float | None = Field(None, gt=0)
        """lr of fitting the projection; unset = 1.25x the adaptation lr (the authors' 0.05 over 0.04)."""
        projection_momentum: float = Field(0.9, ge=0, lt=1)
        projection_weight_decay: float = Field(5e-4, ge=0)
        training: Literal["common", "authors"] = "common"
        """``common``: the run's shared training settings, a new optimizer every round; ``authors``: theirs,
        with one optimizer per client for the whole run."""
        evaluation_keys: ClassVar[tuple[str, ...]] = (
            "evaluation", "adapt_epochs", "alternations", "etf_epochs", "etf_lr", "projection_epochs",
            "projection_lr", "projection_momentum", "projection_weight_decay")
        training_options: ClassVar[dict[str, dict[str, Any]]] = {"authors": FEDETF_AUTHORS_TRAINING}

    settings: Settings
    evaluation_version = 2  # 1 fitted M at 0.1 and the projection at 0.05 whatever the adaptation lr
    shared_parts = ("body", "head.projection", "head.temperature")
    trained_parts = ("body", "head.projection", "head.temperature")

    def __init__(self, config: Config) -> None:
        self.keeps_momentum = config.settings_for(self.name).training == "authors"
        super().__init__(config)

    def make_head(self, head: nn.Linear, generator: torch.Generator) -> nn.Module:
        features, classes = head.in_features, head.out_features
        if classes < 2:
            raise refuse("dataset", f"fedetf needs at least two classes to build a simplex ETF, got {classes}")
        own = self.settings
        etf_dim = features if own.etf_dim is None else own.etf_dim
        if etf_dim < classes:
            given = (f"unset, so the body's {features} features" if own.etf_dim is None else str(etf_dim))
            raise refuse("fedetf.etf_dim", f"{given} is fewer than the {classes} classes: a simplex ETF needs at "
                                           f"least one dimension per class; set it to {classes} or more")
        return ETFHead(features, etf_dim, classes, own.temperature, generator)

    def training_loss(self, data: ClientData) -> Loss:
        """Balanced softmax on the client's counts; a class it lacks counts once (log-prior 0), as the authors do.

        The default round trains with it, through the client's kept optimizer under the authors' training.
        """
        return balanced_softmax(data.class_counts(), absent=1.0)

    def adaptation(self) -> LocalTraining:
        """The own protocol's first phase: FedETF training at the final round's lr, momentum and decay."""
        c, own = self.config, self.settings
        epochs = c.local_epochs if own.adapt_epochs is None else own.adapt_epochs
        return LocalTraining(epochs, c.batch_size, self.final_lr(), c.momentum, c.weight_decay, c.clip_grad_norm)

    def alternation_lrs(self) -> tuple[float, float]:
        """The lrs of fitting M and the projection: as set, else the authors' ratios to the adaptation lr."""
        own, adapt = self.settings, self.adaptation().lr
        return (adapt * ETF_LR_RATIO if own.etf_lr is None else own.etf_lr,
                adapt * PROJECTION_LR_RATIO if own.projection_lr is None else own.projection_lr)

    def own_personalize(self, model: nn.Module, data: ClientData, personal: PersonalState,
                        generator: torch.Generator) -> list[float]:
        """The own protocol: adapt, then alternate M and the projection; body and beta stay fixed after adapting.

        Each phase gets a new optimizer, as in the authors' code, and runs in train mode as theirs do;
        the built-in bodies keep no batch-norm statistics, so a frozen body is left as it was. One
        generator orders every batch, so a client's curve is the same in any process. The cost is
        ``adapt_epochs + alternations * (etf_epochs + projection_epochs)`` epochs per client (123 with
        the authors' constants and E = 3).
        """
        c, own = self.config, self.settings
        accuracies = [evaluate(model, data)]
        adaptation = self.adaptation()
        optimizer = self.continued_optimizer(model, personal, adaptation) if self.keeps_momentum else None
        sgd_epochs(model, data, self.trained_parts, adaptation, generator, optimizer=optimizer,
                   loss=self.training_loss(data))
        accuracies.append(evaluate(model, data))
        etf_lr, projection_lr = self.alternation_lrs()
        etf = LocalTraining(own.etf_epochs, c.batch_size, etf_lr)
        projection = LocalTraining(own.projection_epochs, c.batch_size, projection_lr, own.projection_momentum,
                                   own.projection_weight_decay)
        for _ in range(own.alternations):
            sgd_epochs(model, data, ("head.etf",), etf, generator)
            sgd_epochs(model, data, ("head.projection",), projection, generator)
            accuracies.append(evaluate(model, data))
        return accuracies

    def own_unit(self) -> str:
        """Stage 1 is the adaptation, each later stage one alternation."""
        return "stage"

    def own_note(self) -> str:
        own, adapt = self.settings, self.adaptation()
        etf_lr, projection_lr = self.alternation_lrs()
        return (f"FedETF's own: {adapt.epochs} epochs of balanced softmax (lr {adapt.lr:g}), then "
                f"{own.alternations} x ({own.etf_epochs} epochs on the ETF, lr {etf_lr:g}; "
                f"{own.projection_epochs} on the projection, lr {projection_lr:g})")
