"""FedPAC: head-then-body rounds, the feature alignment term, the server's count-weighted class
centroids and its classifier collaboration, on the real digits data."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import client_data, five_clients, model_for, run, same
from torch import nn

from fedbabu.algorithms import fedpac
from fedbabu.algorithms.fedpac import (
    CentroidHead,
    FedPAC,
    collaboration_matrix,
    collaboration_statistics,
    collaboration_weights,
    mixed_classifier,
)
from fedbabu.engine.round import MEASURED_KEYS
from fedbabu.engine.simulation import TRAIN_STREAM, client_generator
from fedbabu.training import body_features, class_feature_sums, load_state, state_of

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ("body", "head")


def tiny(**overrides):
    return five_clients("fedpac", **overrides)


def overlapping(**overrides):
    """Five clients whose classes overlap (``tiny``'s two shards each do not), so that their classifiers mix."""
    return tiny(partition="dirichlet", dirichlet_alpha=0.5, **overrides)


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


def two_client_optimum(p: np.ndarray) -> float:
    """The first weight minimizing ``a^T P a`` over a + b = 1, a, b >= 0, in closed form."""
    curvature = p[0, 0] + p[1, 1] - 2 * p[0, 1]
    return float(np.clip((p[1, 1] - p[0, 1]) / curvature, 0, 1))


def simplex_optimum(p: np.ndarray) -> np.ndarray:
    """The minimizer of ``a^T P a`` over the simplex by brute force over its supports (P positive definite): on
    a support S the optimum is P_SS^-1 1, scaled to sum 1, where that is nonnegative."""
    best, argbest = math.inf, None
    for size in range(1, len(p) + 1):
        for support in map(list, itertools.combinations(range(len(p)), size)):
            inner = np.linalg.solve(p[np.ix_(support, support)], np.ones(size))
            if (inner < 0).any():
                continue
            weights = np.zeros(len(p))
            weights[support] = inner / inner.sum()
            if weights @ p @ weights < best:
                best, argbest = weights @ p @ weights, weights
    return argbest


@pytest.mark.parametrize("p", [
    [[2.0, 0.5], [0.5, 1.0]],
    [[1.0, 0.0], [0.0, 3.0]],
    [[1e-4, 2e-5], [2e-5, 4e-4]],  # the scale of a client's v: the same weights
    [[1.0, 1.5], [1.5, 4.0]],  # the optimum is a vertex: the first client alone
])
def test_two_clients_weights_are_the_closed_form_optimum(p):
    p = np.array(p)
    weights = collaboration_weights(p)
    first = two_client_optimum(p)
    assert weights == pytest.approx([first, 1 - first], abs=1e-5)


def test_the_weights_are_the_brute_force_optimum_on_the_simplex():
    rng = np.random.default_rng(3)
    for clients in (3, 4, 5):
        for _ in range(10):
            gaps = rng.normal(size=(clients, 6)) * rng.uniform(0.01, 1)
            p = np.diag(rng.uniform(0, 0.1, clients)) + gaps @ gaps.T
            weights = collaboration_weights(p)
            assert (weights >= 0).all() and weights.sum() == pytest.approx(1, abs=1e-12)
            assert np.count_nonzero(weights) == np.count_nonzero(simplex_optimum(p) > 1e-3), "zeroed as theirs"
            assert weights == pytest.approx(simplex_optimum(p), abs=1e-4)


def test_weights_at_or_below_one_in_a_thousand_are_zeroed():
    weights = collaboration_weights(np.array([[1999.0, 0.0], [0.0, 1.0]]))
    assert two_client_optimum(np.array([[1999.0, 0.0], [0.0, 1.0]])) == pytest.approx(5e-4)
    assert weights.tolist() == [0.0, 1.0]


def test_a_matrix_that_is_not_positive_semidefinite_keeps_its_large_eigenpairs_only():
    # eigenvalues 3 and -1: the rebuilt P is 1.5 everywhere, which every point of the simplex minimizes, so the
    # uniform start stays; the matrix as given would send all the weight to one client
    assert collaboration_weights(np.array([[1.0, 2.0], [2.0, 1.0]])) == pytest.approx([0.5, 0.5], abs=1e-9)
    assert collaboration_weights(np.diag([-1.0, 0.001])) is None, "nothing left: the client keeps its own"
    assert collaboration_weights(np.array([[1.0, math.nan], [math.nan, 1.0]])) is None


def test_the_matrix_is_the_variances_plus_the_authors_pairwise_distances():
    rng = np.random.default_rng(0)
    variances, means = rng.uniform(size=3), rng.normal(size=(3, 4, 2))
    for own in range(3):
        expected = np.diag(variances) + np.array(
            [[sum((means[own, k] - means[j1, k]) @ (means[own, k] - means[j2, k]) for k in range(4))
              for j2 in range(3)] for j1 in range(3)])
        assert collaboration_matrix(variances, means, own) == pytest.approx(expected, abs=1e-12)


def test_the_statistics_are_the_authors_v_and_h():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(9, 3)).astype(np.float32)
    labels = np.array([0, 2, 2, 0, 3, 2, 0, 0, 3])  # class 1 absent
    variance, weighted_means = collaboration_statistics(torch.from_numpy(features), torch.from_numpy(labels), 4)
    n, v, h = len(labels), 0.0, np.zeros((4, 3))
    for k in range(4):
        rows = features[labels == k].astype(np.float64)
        if len(rows):
            prior, mean = len(rows) / n, rows.mean(0)
            h[k] = prior * mean
            v += prior * np.trace(rows.T @ rows / len(rows)) - prior ** 2 * mean @ mean
    assert weighted_means.numpy() == pytest.approx(h, abs=1e-12)
    assert variance.shape == (1,) and float(variance) == pytest.approx(v / n, abs=1e-12)


def test_the_mix_is_the_weighted_mean_and_a_one_hot_weight_gives_the_classifier_back():
    g = torch.Generator().manual_seed(0)
    classifiers = [{"w": torch.randn(3, 2, generator=g), "b": torch.randn(3, generator=g)} for _ in range(3)]
    mixed = mixed_classifier(np.array([0.25, 0.0, 0.75]), classifiers)
    assert torch.allclose(mixed["w"], 0.25 * classifiers[0]["w"] + 0.75 * classifiers[2]["w"])
    assert mixed["b"].dtype == torch.float32
    assert same(mixed_classifier(np.array([0.0, 1.0, 0.0]), classifiers), classifiers[1])


def test_after_a_round_each_classifier_is_the_mix_its_weights_give_of_the_rounds_trained_ones(digits):
    config = overlapping(rounds=1)
    result = run(config, digits)
    algorithm = FedPAC(config)
    updates = {c: algorithm.client_update(model_for(config, digits), client_data(config, digits, c), {},
                                          config.lr_at(0), client_generator(config.seed, 0, c, TRAIN_STREAM))
               for c in range(config.num_clients)}
    variances = np.array([float(u.report["variance"]) for u in updates.values()])
    means = np.stack([u.report["weighted_means"].numpy() for u in updates.values()])
    trained = [u.personal for u in updates.values()]
    mixes = 0
    for own, update in updates.items():
        weights = collaboration_weights(collaboration_matrix(variances, means, own))
        assert same(result.personal[own], mixed_classifier(weights, trained)), own
        if np.count_nonzero(weights) > 1:
            mixes += 1
            assert not same(result.personal[own], update.personal), "a mix is not the client's own classifier"
    assert mixes, "the test needs a client whose classifier is a mix"


def test_without_collaboration_a_run_is_feature_alignment_only(digits, monkeypatch):
    """``collaboration: false`` reports nothing and trains exactly as a collaborating run whose server ignores the
    reports: computing them changes no training, and the setting removes exactly the server's mix."""
    alone = run(overlapping(fedpac={"collaboration": False}), digits)
    update = FedPAC(overlapping(fedpac={"collaboration": False})).client_update(
        model_for(tiny(), digits), client_data(overlapping(), digits, 0), {}, 0.05, torch.Generator().manual_seed(0))
    assert update.report == {}
    collaborating = run(overlapping(), digits)
    monkeypatch.setattr(FedPAC, "collaborate", lambda self, reports: {})
    ignored = run(overlapping(), digits)
    assert same(alone.final_state, ignored.final_state)
    assert all(same(alone.personal[c], ignored.personal[c]) for c in alone.personal)
    assert measured_apart(alone) == measured_apart(ignored)
    assert not all(same(alone.personal[c], collaborating.personal[c]) for c in alone.personal)


def measured_apart(result) -> tuple[list, list]:
    """A run's round records without what measures the execution, and its clients' curves."""
    return ([{k: v for k, v in m.items() if k not in MEASURED_KEYS} for m in result.metrics],
            [c["accuracies"] for c in result.clients])
