"""kNN-Per (Marfoq et al., ICML 2022): FedAvg, then a local k-nearest-neighbours memory at evaluation.

Training is FedAvg's, unchanged: the server averages the whole network, clients keep nothing. The
method is in the evaluation (the paper's Section 3, Eq. 5; the authors' omarfoq/knn-per,
``client.py``'s ``KNNPerClient``, ``datastore.py`` and ``eval_knnper.py``): each client

* builds a datastore of the global body's features of all its training images with their labels
  (their ``capacity=-1``: the whole training set);
* for each test image, takes its ``knnper.k`` nearest stored features by Euclidean distance (their
  ``faiss.IndexFlatL2``) and weighs each by the Gaussian kernel ``exp(-d^2 / (D * scale))``, ``d^2`` the
  squared distance, ``D`` the feature dimension, ``scale`` = 1.0 (their ``gather_knn_outputs``);
  ``p_knn(c)`` is the weights' share carried by neighbours of class ``c``;
* predicts ``argmax(lambda * p_knn + (1 - lambda) * p_global)``, ``p_global`` the global model's softmax
  and lambda ``knnper.weight`` (their ``weight``).

Defaults: ``k = 10`` (the authors' scripts vary it over 1, 3, 5, 7, 10; ``base_model_effect.sh``,
which uses the whole datastore as here, runs 10); ``lambda = 0.5``. Their scripts report a whole grid
of lambda (0 to 1 in steps of 0.01) rather than one value, so no lambda is theirs; 0.5 is the middle of
that grid and FL-bench's default. ``lambda = 0`` is the global model.

Own evaluation (``knnper.evaluation: own``, the default): the curve is the global model's accuracy,
then the interpolated prediction's at the chosen lambda; its one step is the interpolation, not an
epoch. ``common`` fine-tunes the global model like every algorithm here. All of ``k``, ``weight``,
``scale`` and ``interpolate`` change only the evaluation, so ``fedbabu personalize`` may vary them
without training again.

Departures: ``knnper.interpolate: probabilities`` (the default) interpolates the global model's
probabilities, as the paper's Eq. 5 and the code's ``--interpolate_logits`` flag intend; their
``eval_knnper.py`` gives that flag the default ``"store_true"`` (a string, so always true) and so in
fact interpolates raw logits, which ``interpolate: logits`` reproduces. The kernel's weights are
normalized in log space, which equals theirs wherever theirs is defined and stays finite where every
neighbour's weight underflows (theirs divides zero by zero). ``k`` larger than a client's training set
takes all of it (faiss would return missing neighbours); a client without training images predicts
with the global model (their evaluation skips it). Their grid over the datastore's capacity (a random
fraction of the training set) is left out: the datastore is the whole training set.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from fedbabu.algorithms.base import Algorithm, PersonalState
from fedbabu.config import AlgorithmSettings
from fedbabu.training import ClientData, body_features, evaluate, load_state


def knn_probabilities(queries: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, k: int, scale: float,
                      num_classes: int) -> torch.Tensor:
    """Each query's class distribution among its ``k`` nearest keys, weighted by ``exp(-d^2 / (D * scale))``."""
    distances = torch.cdist(queries.double(), keys.double()).square()
    nearest, indices = distances.topk(min(k, len(keys)), dim=1, largest=False)
    weights = torch.softmax(-nearest / (queries.shape[1] * scale), dim=1)
    return torch.zeros(len(queries), num_classes, dtype=torch.float64).scatter_add_(1, labels[indices], weights)


class KNNPer(Algorithm):
    name = "knnper"

    class Settings(AlgorithmSettings):
        k: int = Field(10, ge=1)
        """Neighbours each test image is given (the authors' scripts: 1 to 10; 10 with the whole datastore)."""
        weight: float = Field(0.5, ge=0, le=1)
        """lambda, the weight of the kNN distribution in the prediction (their ``weight``); 0 is the global
        model; 0.5, the middle of their grid."""
        scale: float = Field(1.0, gt=0)
        """The kernel's length scale, times the feature dimension (``gather_knn_outputs``: 1.0)."""
        interpolate: Literal["probabilities", "logits"] = "probabilities"
        """What of the global model is interpolated: its softmax (the paper) or its raw logits (their script)."""
        evaluation: Literal["own", "common"] = "own"
        """``own``: the kNN interpolation; ``common``: the ``finetune.*`` fine-tuning every algorithm here is
        compared under."""
        evaluation_keys: ClassVar[tuple[str, ...]] = ("k", "weight", "scale", "interpolate", "evaluation")

    settings: Settings

    def own_personalize(self, model: nn.Module, data: ClientData, personal: PersonalState,
                        generator: torch.Generator) -> list[float]:
        """The global model's accuracy, then the interpolated prediction's."""
        load_state(model, personal)
        accuracies = [evaluate(model, data)]
        accuracies.append(self.interpolated_accuracy(model, data))
        return accuracies

    @torch.no_grad()
    def interpolated_accuracy(self, model: nn.Module, data: ClientData) -> float:
        """Accuracy on the client's test set of ``lambda * p_knn + (1 - lambda) * p_global``."""
        if data.num_test == 0:
            return float("nan")
        own = self.settings
        test = body_features(model, data, "test")
        logits = model.head(test.to(data.runtime.device)).double().cpu()
        scores = torch.softmax(logits, dim=1) if own.interpolate == "probabilities" else logits
        if data.num_train:
            stored = body_features(model, data, "train")
            knn = knn_probabilities(test, stored, data.dataset.train_y[data.train_idx], own.k, own.scale,
                                    logits.shape[1])
            scores = own.weight * knn + (1 - own.weight) * scores
        labels = data.dataset.test_y[data.test_idx]
        return float((scores.argmax(1) == labels).double().mean())

    def own_unit(self) -> str:
        return "interpolation"

    def own_note(self) -> str:
        own = self.settings
        return (f"kNN-Per's own: global model interpolated with a kNN on its features (k {own.k}, lambda "
                f"{own.weight:g}, {own.interpolate}), no fine-tuning")
