"""FedPAC: head-then-body rounds, the feature alignment term, and the server's count-weighted class
centroids, on the real digits data."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import client_data, five_clients, model_for, run
from torch import nn

from fedbabu.algorithms import fedpac
from fedbabu.algorithms.fedpac import CentroidHead, FedPAC
from fedbabu.training import body_features, class_feature_sums, load_state, state_of

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ("body", "head")


def tiny(**overrides):
    return five_clients("fedpac", **overrides)


def with_centroids(model, digits, config, held=None) -> None:
    """Give the model's head centroids: the class means of every client's features (for ``held`` classes)."""
    sums, counts = 0, 0
    for client in range(config.num_clients):
        data = client_data(config, digits, client)
        s, c = class_feature_sums(body_features(model, data, "train"), data.dataset.train_y[data.train_idx], 10)
        sums, counts = sums + s, counts + c
    if held is not None:
        counts = torch.where(torch.isin(torch.arange(10), torch.tensor(held)), counts, torch.zeros_like(counts))
    with torch.no_grad():
        model.head.centroids.copy_(sums / counts.clamp_min(1)[:, None])
        model.head.centroid_counts.copy_(counts)


def test_the_server_sets_each_centroid_to_the_count_weighted_mean_of_the_clients_class_means():
    algorithm = FedPAC(tiny())
    g = torch.Generator().manual_seed(0)
    means = [torch.randn(10, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    counts = [torch.tensor([3., 0, 5, 1, 0, 0, 2, 0, 0, 0], dtype=torch.float64),
              torch.tensor([1., 0, 0, 4, 0, 0, 6, 0, 0, 7], dtype=torch.float64)]
    summed = {"class_sums": sum(m * c[:, None] for m, c in zip(means, counts, strict=True)),
              "class_counts": sum(counts)}
    previous = {"body.w": torch.zeros(2), "head.centroids": torch.ones(10, 4), "head.centroid_counts": torch.ones(10)}
    aggregated = {**previous, "body.w": torch.full((2,), 0.5)}
    new = algorithm.server_update(previous, aggregated, summed)
    for c in range(10):
        total = counts[0][c] + counts[1][c]
        if total:
            expected = (counts[0][c] * means[0][c] + counts[1][c] * means[1][c]) / total
            assert torch.allclose(new["head.centroids"][c].double(), expected, atol=1e-6), c
        else:
            assert torch.equal(new["head.centroids"][c], torch.zeros(4)), "no client of the round held it"
    assert torch.equal(new["head.centroid_counts"], (counts[0] + counts[1]).float())
    assert torch.equal(new["body.w"], aggregated["body.w"])
    assert algorithm.server_update(previous, aggregated, {})["head.centroids"] is previous["head.centroids"]


def test_a_client_reports_its_class_feature_sums_and_counts_after_training(digits):
    config = tiny()
    model = model_for(config, digits)
    data = client_data(config, digits, 0)
    update = FedPAC(config).client_update(model, data, {}, 0.05, torch.Generator().manual_seed(0))
    features = body_features(model, data, "train")
    labels = data.dataset.train_y[data.train_idx]
    assert torch.equal(update.statistics["class_counts"], data.class_counts().double())
    for c in labels.unique():
        assert torch.allclose(update.statistics["class_sums"][c], features[labels == c].double().sum(0))


def test_the_alignment_term_changes_the_body_update_and_pulls_features_to_the_centroids(digits):
    model = model_for(tiny(), digits)
    with_centroids(model, digits, tiny())
    start = state_of(model, ALL)
    data = client_data(tiny(), digits, 1)
    bodies, gaps = [], []
    for lam in (0.0, 5.0):
        load_state(model, start)
        FedPAC(tiny(fedpac={"lambda": lam})).client_update(model, data, {}, 0.05, torch.Generator().manual_seed(2))
        bodies.append(state_of(model, ("body",)))
        z = body_features(model, data, "train")
        gaps.append(((z - model.head.centroids[data.dataset.train_y[data.train_idx]]) ** 2).mean().item())
    assert any(not torch.equal(bodies[0][n], bodies[1][n]) for n in bodies[0]), "the term moves the body"
    assert gaps[1] < gaps[0], "and brings the features closer to their class centroids"


def test_the_alignment_loss_is_cross_entropy_plus_lambda_times_the_mean_squared_gap(digits):
    config = tiny(fedpac={"lambda": 0.7})
    model = model_for(config, digits)
    data = client_data(config, digits, 2)
    held = data.class_counts().nonzero().flatten()[:1].tolist()
    with_centroids(model, digits, config, held=held)
    own_sums, own_counts = class_feature_sums(body_features(model, data, "train"),
                                              data.dataset.train_y[data.train_idx], 10)
    own_means = own_sums / own_counts.clamp_min(1)[:, None]
    targets = torch.where((model.head.centroid_counts > 0)[:, None], model.head.centroids, own_means.float())
    features: list[torch.Tensor] = []
    loss = FedPAC(config).alignment_loss(model, data, features)
    x, y = next(data.train_batches(20, torch.Generator().manual_seed(0)))
    z = model.body(x)
    features.append(z)
    logits = model.head(z)
    expected = nn.functional.cross_entropy(logits, y) + 0.7 * ((z - targets[y]) ** 2).mean()
    assert torch.allclose(loss(logits, y), expected, atol=1e-6), "a class without centroid: the client's own mean"
    assert not features, "each forward pass's features are read once"


def test_without_centroids_the_round_is_free_of_the_term(digits):
    config = tiny()
    model = model_for(config, digits)
    start = state_of(model, ALL)
    data = client_data(config, digits, 3)
    results = []
    for lam in (0.0, 1.0):
        load_state(model, start)
        FedPAC(tiny(fedpac={"lambda": lam})).client_update(model, data, {}, 0.05, torch.Generator().manual_seed(2))
        results.append(state_of(model, ALL))
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0]), "their round 0: no alignment"


def test_a_round_trains_the_classifier_at_its_own_lr_then_the_body(digits, monkeypatch):
    config = tiny(local_epochs=2)
    model = model_for(config, digits)
    assert isinstance(model.head, CentroidHead) and model.head.weight is model.head.classifier.weight
    phases = []
    real = fedpac.sgd_epochs

    def recording(model, data, parts, settings, generator, *args, **kwargs):
        phases.append((parts, settings.epochs, settings.lr))
        return real(model, data, parts, settings, generator, *args, **kwargs)

    monkeypatch.setattr(fedpac, "sgd_epochs", recording)
    update = FedPAC(config).client_update(model, client_data(config, digits, 0), {}, 0.03,
                                          torch.Generator().manual_seed(0))
    assert phases == [(("head.classifier",), 1, 0.1), (("body",), 2, 0.03)]
    assert set(update.personal) == {"head.classifier.weight", "head.classifier.bias"}
    assert math.isfinite(update.loss)


def test_a_run_shares_the_centroids_and_keeps_the_classifiers(digits):
    result = run(tiny(), digits)
    counts = result.final_state["head.centroid_counts"]
    assert counts.sum() > 0 and torch.equal(counts, counts.round()), "counts of the last round's images"
    assert all(set(p) == {"head.classifier.weight", "head.classifier.bias"} for p in result.personal.values())
    assert len(result.clients[0]["accuracies"]) == 2, "own evaluation: before and after one more local round"
