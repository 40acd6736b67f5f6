"""FedPAC (Xu et al., ICLR 2023): feature alignment to global class centroids, and classifier collaboration.

The body is averaged and each client keeps its own linear classifier, as in FedPer. What FedPAC adds
(the paper's Section 4, Algorithm 1; the authors' JianXu95/FedPAC, ``methods/fedpac.py``,
``running.py``'s ``train_round_fedpac`` and ``tools.py``):

* **head, then body.** A round first trains the classifier alone for ``fedpac.head_epochs`` = 1 epoch
  at the fixed ``fedpac.head_lr`` = 0.1 (their ``epoch_classifier`` and ``lr_g``), then the body alone
  for ``local_epochs`` at the round's lr, each phase through a new SGD optimizer with the run's
  momentum and weight decay (their code: momentum 0.5, weight decay 5e-4 in both phases);
* **feature alignment.** The body phase minimizes ``CE + lambda * MSE(z, c_y)``: the mean over the
  batch and the feature dimensions of the squared gap between each feature ``z`` and its class's
  global centroid ``c_y`` (``nn.MSELoss``, ``lam = 1.0``, ``options.py``). A class the server has no
  centroid for is aligned to the client's own class mean, computed before the round's training (their
  ``local_protos1``); in the first round, before any centroid exists, there is no term (their
  ``round > 0``);
* **centroids.** After training, each client reports its per-class feature sums and counts (their
  ``get_local_protos`` after training, times the class sizes), and the server sets each class's
  centroid to the count-weighted mean over the round's clients (``tools.protos_aggregation``). A class
  none of the round's clients holds has no centroid in the next round (their dictionary of centroids
  is replaced every round). The centroids and their counts live in the head as shared tensors that no
  client trains (``head.centroids``, ``head.centroid_counts``), so they reach clients with the body;
* **classifier collaboration** (``fedpac.collaboration: true``, their ``--agg_g`` 1, the default).
  Before training, each client computes from the round's global body, over its training set, its
  label prior ``p_k``, class feature means ``mu_k``, the matrix ``H = [p_k mu_k]`` (C x d) and the
  scalar ``v = (sum_k p_k E_k||z||^2 - sum_k p_k^2 ||mu_k||^2) / n`` (``statistics_extraction``, with its
  final division by the client's size n), and reports them with the classifier it then trains. For
  each of the round's clients i, the server forms ``P = diag(v) + D`` with ``D[j, l] = sum_k (H_i[k] -
  H_j[k]) . (H_i[k] - H_l[k])``, keeps only the eigenpairs with eigenvalue >= 0.01 if P is not
  positive semi-definite, solves ``min a^T P a`` over the simplex, zeroes the weights <= 1e-3, and
  sets client i's classifier to the weighted mean of the round's trained classifiers
  (``tools.get_head_agg_weight``, ``tools.agg_classifier_weighted_p``): its next round and any
  evaluation start from it. ``collaboration: false`` is the paper's "feature alignment only" ablation.

Evaluation: ``fedpac.evaluation: own`` (the default) tests a client's model right after one more
local round from the final model (global body, its own classifier, as the last round's collaboration
left it), at the final round's lr: their reported accuracy is ``local_test`` right after
``local_training``, before the server's step. ``common`` fine-tunes like every algorithm here.
Training: ``fedpac.training: common`` (the default) uses the run's shared settings; ``authors`` uses
their CIFAR-10 run's (``federated_main.py`` sets lr 0.02, constant; batch 50, momentum 0.5, weight
decay 5e-4, 5 local epochs). ``collaboration`` applies under both.

Departures: features are computed in evaluation mode, the training split in one batch (theirs
in training mode, per batch; their network has no batch norm, so for them the two agree); clients'
bodies are averaged by sample count, as theirs. The statistics are computed in float64 (theirs
accumulate float32 values). Their quadratic program goes to cvxpy; ours to SciPy's SLSQP from the
uniform weights, on P scaled to a largest entry of 1 (the minimizer is the same, and the tolerance
then means the same for every scale of features). Their check of the rebuilt P can fail on round-off
in the eigen-directions it dropped and then keeps the client's classifier; ours takes the rebuilt P,
positive semi-definite by construction, and keeps the client's own classifier only when nothing of
P is left (no eigenvalue reaches 0.01) or P is not finite. A client without training data reports
nothing, and keeps its own classifier.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from scipy.optimize import minimize
from torch import nn

from fedbabu.algorithms.base import Algorithm, ClientUpdate, PersonalState
from fedbabu.config import AlgorithmSettings
from fedbabu.training import ClientData, Loss, body_features, class_feature_sums, load_state, sgd_epochs, state_of

FEDPAC_AUTHORS_TRAINING: dict[str, Any] = {
    "lr": 0.02, "lr_schedule": "exponential", "lr_decay": 1.0, "batch_size": 50, "momentum": 0.5,
    "weight_decay": 5e-4, "local_epochs": 5,
}
"""The shared training values of the FedPAC authors' CIFAR-10 run (``federated_main.py``, ``options.py``)."""

REPORTED_STATISTICS = ("variance", "weighted_means")
"""The entries of a client's report besides its trained classifier (whose entries are its personal state's)."""
EIGENVALUE_FLOOR = 0.01
"""Eigenvalues of a P that is not positive semi-definite below which its eigen-directions are dropped (theirs)."""
SMALL_WEIGHT = 1e-3
"""Collaboration weights at or below this are zeroed before the classifiers are mixed (their ``eps``)."""


def collaboration_statistics(features: torch.Tensor, labels: torch.Tensor,
                             num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's ``v`` and ``H`` from its training features: what the server's quadratic program reads of it.

    With ``p_k`` the share of class k in the n samples and ``mu_k`` its feature mean, ``H[k] = p_k mu_k``
    (a zero row for an absent class) and ``v = (sum_k p_k mean_k ||z||^2 - sum_k p_k^2 ||mu_k||^2) / n``, in
    float64 (``statistics_extraction``): the paper's bound on the error of a combined classifier has a
    variance term the server reads from the ``v`` of the clients combined, and a bias term from their H.
    """
    n = len(labels)
    sums, counts = class_feature_sums(features, labels, num_classes)
    squares = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, features.double().pow(2).sum(1))
    held = counts.clamp_min(1)
    prior, means = counts / n, sums / held[:, None]
    variance = ((prior * squares / held).sum() - (prior.pow(2) * means.pow(2).sum(1)).sum()) / n
    return variance.reshape(1), prior[:, None] * means


def collaboration_matrix(variances: np.ndarray, weighted_means: np.ndarray, own: int) -> np.ndarray:
    """P of the quadratic program of client ``own`` (an index into the round's m reporting clients).

    ``diag(variances) + G G^T``, where row j of G is client ``own``'s H minus client j's, flattened: the
    entry (j, l) is ``sum_k (H_own[k] - H_j[k]) . (H_own[k] - H_l[k])``, their pairwise ``dist``.
    """
    gaps = (weighted_means[own] - weighted_means).reshape(len(variances), -1)
    return np.diag(variances) + gaps @ gaps.T


def collaboration_weights(matrix: np.ndarray) -> np.ndarray | None:
    """The weights (on the simplex) minimizing ``a^T P a``, those at or below :data:`SMALL_WEIGHT` zeroed and
    the rest scaled back to sum 1; None where there is no program to solve, and the client keeps its own.

    A P that is not positive semi-definite is first rebuilt from its eigenpairs of eigenvalue at least
    :data:`EIGENVALUE_FLOOR`, as theirs. SLSQP from the uniform weights is deterministic, so every engine
    finds the same weights; P is scaled to a largest entry of 1 so that its tolerance means the same whatever
    the scale of the features.
    """
    if not np.isfinite(matrix).all():
        return None
    values, vectors = np.linalg.eigh(matrix)
    if values.min() < 0:
        kept = values >= EIGENVALUE_FLOOR
        matrix = (vectors[:, kept] * values[kept]) @ vectors[:, kept].T
    scale = np.abs(matrix).max()
    if scale == 0:
        return None
    quadratic = matrix / scale
    size = len(quadratic)
    solution = minimize(lambda a: a @ quadratic @ a, np.full(size, 1 / size), jac=lambda a: 2 * quadratic @ a,
                        method="SLSQP", bounds=[(0.0, 1.0)] * size,
                        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1, "jac": lambda a: np.ones(size)}],
                        options={"ftol": 1e-12, "maxiter": 500})
    weights = np.where(solution.x > SMALL_WEIGHT, solution.x, 0.0)
    return weights / weights.sum() if np.isfinite(weights).all() and weights.sum() > 0 else None


def mixed_classifier(weights: np.ndarray, classifiers: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The weighted mean of the classifiers (weights summing to 1), accumulated in float64 in the given order and
    returned in the classifiers' dtype; a classifier of weight zero plays no part."""
    return {name: sum((float(w) * c[name].double() for w, c in zip(weights, classifiers, strict=True) if w > 0),
                      torch.zeros_like(classifiers[0][name], dtype=torch.float64)).to(classifiers[0][name].dtype)
            for name in classifiers[0]}


class CentroidHead(nn.Module):
    """A linear classifier, plus the global class centroids and their counts, which only the server sets."""

    def __init__(self, classifier: nn.Linear) -> None:
        super().__init__()
        self.classifier = classifier
        self.in_features = classifier.in_features
        self.centroids = nn.Parameter(torch.zeros(classifier.out_features, classifier.in_features),
                                      requires_grad=False)
        self.centroid_counts = nn.Parameter(torch.zeros(classifier.out_features), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The classifier's class matrix (C x d)."""
        return self.classifier.weight

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)


class FedPAC(Algorithm):
    name = "fedpac"

    class Settings(AlgorithmSettings):
        lambda_: float = Field(1.0, ge=0, alias="lambda")
        """Weight of the feature alignment term (``--lam``: 1.0)."""
        head_epochs: int = Field(1, ge=0)
        """Classifier epochs before the body's (``epoch_classifier``: 1)."""
        head_lr: float = Field(0.1, gt=0)
        """The classifier phase's lr, not scheduled (``lr_g``: 0.1)."""
        evaluation: Literal["own", "common"] = "own"
        """``own``: one more local round from the final model, then the test (their reported accuracy);
        ``common``: the ``finetune.*`` fine-tuning every algorithm here is compared under."""
        training: Literal["common", "authors"] = "common"
        """``common``: the run's shared training settings; ``authors``: their CIFAR-10 run's."""
        collaboration: bool = True
        """Whether the server sets each client's classifier to a mix of the round's classifiers (``--agg_g``: 1);
        false is the paper's feature-alignment-only ablation."""
        evaluation_keys: ClassVar[tuple[str, ...]] = ("evaluation",)
        training_options: ClassVar[dict[str, dict[str, Any]]] = {"authors": FEDPAC_AUTHORS_TRAINING}

    settings: Settings
    training_version = 2
    """2: classifier collaboration, on by default (1 had none)."""
    shared_parts = ("body", "head.centroids", "head.centroid_counts")
    trained_parts = ("body", "head.classifier")
    personal_parts = ("head.classifier",)

    def make_head(self, head: nn.Linear, generator: torch.Generator) -> nn.Module:
        """The seeded classifier, beside centroids that do not exist yet (zero counts; no draw)."""
        return CentroidHead(head)

    def alignment_loss(self, model: nn.Module, data: ClientData, features: list[torch.Tensor]) -> Loss:
        """Cross-entropy plus lambda times the mean squared gap between the batch's features and their targets.

        ``features`` receives the body's output of each training forward pass (from a hook the caller
        registers), so the term's gradient reaches the body. Without any centroid yet the term is zero.
        """
        head: CentroidHead = model.head
        held = head.centroid_counts.detach() > 0
        targets = head.centroids.detach().clone()
        if held.any() and not held.all():
            own_sums, own_counts = class_feature_sums(body_features(model, data, "train"),
                                                      data.dataset.train_y[data.train_idx], len(held))
            own_means = (own_sums / own_counts.clamp_min(1)[:, None]).to(targets)
            targets = torch.where(held[:, None], targets, own_means)
        coefficient = self.settings.lambda_ if held.any() else 0.0

        def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            gap = nn.functional.mse_loss(features.pop().float(), targets[labels])
            return nn.functional.cross_entropy(logits, labels) + coefficient * gap

        return loss

    def client_update(self, model: nn.Module, data: ClientData, personal: PersonalState, lr: float,
                      generator: torch.Generator) -> ClientUpdate:
        """The classifier alone on cross-entropy, then the body alone on cross-entropy plus alignment; then the
        client's class feature sums and counts for the server's centroids and, with collaboration, its report:
        ``v`` and ``H`` from the body it received (before any training, as theirs) and its trained classifier."""
        load_state(model, personal)
        labels = data.dataset.train_y[data.train_idx]
        report: dict[str, torch.Tensor] = {}
        if self.settings.collaboration and data.num_train:
            variance, weighted_means = collaboration_statistics(body_features(model, data, "train"), labels,
                                                                data.dataset.num_classes)
            report = {"variance": variance, "weighted_means": weighted_means}
        settings = self.local_training(lr)
        own = self.settings
        sgd_epochs(model, data, ("head.classifier",), replace(settings, epochs=own.head_epochs, lr=own.head_lr),
                   generator)
        features: list[torch.Tensor] = []
        aligned = self.alignment_loss(model, data, features)
        hook = model.body.register_forward_hook(lambda module, inputs, output: features.append(output))
        try:
            loss = sgd_epochs(model, data, ("body",), settings, generator, loss=aligned)
        finally:
            hook.remove()
        update = ClientUpdate(loss, state_of(model, self.personal_parts))
        if data.num_train:
            sums, counts = class_feature_sums(body_features(model, data, "train"), labels, data.dataset.num_classes)
            update.statistics = {"class_sums": sums, "class_counts": counts}
        if report:
            update.report = report | update.personal
        return update

    def server_update(self, previous: dict[str, torch.Tensor], aggregated: dict[str, torch.Tensor],
                      statistics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each class's centroid: the count-weighted mean of the round's clients' class means (zero, with a zero
        count, for a class none of them holds)."""
        counts = statistics.get("class_counts")
        if counts is None:
            return {**aggregated, "head.centroids": previous["head.centroids"],
                    "head.centroid_counts": previous["head.centroid_counts"]}
        old = previous["head.centroids"]
        means = statistics["class_sums"] / counts.clamp_min(1)[:, None]
        return {**aggregated, "head.centroids": means.to(old.dtype),
                "head.centroid_counts": counts.to(previous["head.centroid_counts"].dtype)}

    def collaborate(self, reports: Mapping[int, dict[str, torch.Tensor]]) -> dict[int, PersonalState]:
        """Each reporting client's new classifier: the round's trained classifiers mixed by the weights of its
        quadratic program (``get_head_agg_weight``); a client whose program has no solution keeps its own."""
        clients = list(reports)
        variances = np.array([float(reports[c]["variance"].reshape(())) for c in clients])
        weighted_means = np.stack([reports[c]["weighted_means"].double().numpy() for c in clients])
        classifiers = [{k: v for k, v in reports[c].items() if k not in REPORTED_STATISTICS} for c in clients]
        mixed: dict[int, PersonalState] = {}
        for own, client in enumerate(clients):
            weights = collaboration_weights(collaboration_matrix(variances, weighted_means, own))
            if weights is not None:
                mixed[client] = mixed_classifier(weights, classifiers)
        return mixed

    def own_note(self) -> str:
        return (f"FedPAC's own: one local round ({self.settings.head_epochs} classifier + {self.config.local_epochs} "
                f"body epochs at the final lr {self.final_lr():g}), no fine-tuning")
