"""FedPAC (Xu et al., ICLR 2023): feature alignment to global class centroids, without classifier collaboration.

The body is averaged and each client keeps its own linear classifier, as in FedPer. What FedPAC adds
(the paper's Section 4, Algorithm 1; the authors' JianXu95/FedPAC, ``methods/fedpac.py`` and
``running.py``'s ``train_round_fedpac``):

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
  client trains (``head.centroids``, ``head.centroid_counts``), so they reach clients with the body.

**Departure: no classifier collaboration.** Their server also replaces each client's classifier by a
combination of the round's classifiers, with per-client weights from a quadratic program over the
clients' feature statistics (``tools.get_head_agg_weight``). That needs each client's statistics and
classifier on the server and a different head sent back to each client; our engine (simulator and
Flower alike) moves only sums of statistics and one global state, and a client's classifier never
leaves it. So the classifiers stay personal: this is FedPAC without classifier collaboration, the
paper's "feature alignment only" ablation.

Evaluation: ``fedpac.evaluation: own`` (the default) tests a client's model right after one more
local round from the final model (global body, its own classifier), at the final round's lr: their
reported accuracy is ``local_test`` right after ``local_training``. ``common`` fine-tunes like every
algorithm here. Training: ``fedpac.training: common`` (the default) uses the run's shared settings;
``authors`` uses their CIFAR-10 run's (``federated_main.py`` sets lr 0.02, constant; batch 50,
momentum 0.5, weight decay 5e-4, 5 local epochs).

Other departures: features are computed in evaluation mode, the training split in one batch (theirs
in training mode, per batch; their network has no batch norm, so for them the two agree); clients'
bodies are averaged by sample count, as theirs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from fedbabu.algorithms.base import Algorithm, ClientUpdate, PersonalState
from fedbabu.config import AlgorithmSettings
from fedbabu.training import ClientData, Loss, body_features, class_feature_sums, load_state, sgd_epochs, state_of

FEDPAC_AUTHORS_TRAINING: dict[str, Any] = {
    "lr": 0.02, "lr_schedule": "exponential", "lr_decay": 1.0, "batch_size": 50, "momentum": 0.5,
    "weight_decay": 5e-4, "local_epochs": 5,
}
"""The shared training values of the FedPAC authors' CIFAR-10 run (``federated_main.py``, ``options.py``)."""


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
        evaluation_keys: ClassVar[tuple[str, ...]] = ("evaluation",)
        training_options: ClassVar[dict[str, dict[str, Any]]] = {"authors": FEDPAC_AUTHORS_TRAINING}

    settings: Settings
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
        client's class feature sums and counts for the server's centroids."""
        load_state(model, personal)
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
            sums, counts = class_feature_sums(body_features(model, data, "train"),
                                              data.dataset.train_y[data.train_idx], data.dataset.num_classes)
            update.statistics = {"class_sums": sums, "class_counts": counts}
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

    def own_note(self) -> str:
        return (f"FedPAC's own: one local round ({self.settings.head_epochs} classifier + {self.config.local_epochs} "
                f"body epochs at the final lr {self.final_lr():g}), no fine-tuning")
