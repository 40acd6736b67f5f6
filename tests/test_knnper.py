"""kNN-Per: FedAvg's training, and the evaluation that interpolates the global model with a kNN over
its features, on the real digits data."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import client_data, five_clients, run, same

from fedbabu.algorithms.knnper import KNNPer, knn_probabilities
from fedbabu.engine.simulation import client_model, runtime_for
from fedbabu.training import evaluate, load_state

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(algorithm: str = "knnper", **overrides):
    return five_clients(algorithm, **{"rounds": 3, **overrides})


@pytest.fixture(scope="module")
def trained(digits):
    """A short kNN-Per run: its final global model and the config."""
    config = tiny()
    return config, run(config, digits)


def test_knn_probabilities_weigh_the_nearest_keys_by_a_gaussian_kernel_of_the_squared_distance():
    keys = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [9.0, 9.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[0.0, 0.5]])
    got = knn_probabilities(query, keys, labels, k=3, scale=1.0, num_classes=4)
    squared = torch.tensor([0.25, 1.25, 2.25], dtype=torch.float64)  # the three nearest: keys 0, 1, 2
    weights = torch.exp(-squared / 2)  # D = 2 features, scale 1
    expected = torch.tensor([[weights[0], weights[1] + weights[2], 0, 0]]) / weights.sum()
    assert torch.allclose(got, expected.double())
    far = knn_probabilities(query + 1e4, keys, labels, k=2, scale=1.0, num_classes=4)
    assert torch.isfinite(far).all() and far.sum().item() == pytest.approx(1.0), "no 0/0 when every weight underflows"
    assert torch.allclose(knn_probabilities(query, keys, labels, k=10, scale=1.0, num_classes=4).sum(),
                          torch.tensor(1.0, dtype=torch.float64)), "k beyond the datastore takes all of it"


def test_training_is_fedavgs(digits, trained):
    _, result = trained
    fedavg = run(tiny("fedavg"), digits)
    assert same(result.final_state, fedavg.final_state)
    assert not result.personal or all(not p for p in result.personal.values()), "nothing kept per client"


def test_weight_zero_is_the_global_model_and_the_interpolation_changes_predictions(digits, trained):
    config, result = trained
    model = client_model(config, digits, runtime_for(config))
    load_state(model, result.final_state)
    differs = 0
    for client in range(config.num_clients):
        data = client_data(config, digits, client)
        global_accuracy = evaluate(model, data)
        assert KNNPer(tiny(knnper={"weight": 0.0})).interpolated_accuracy(model, data) == global_accuracy
        interpolated = KNNPer(config).interpolated_accuracy(model, data)
        differs += interpolated != global_accuracy
        assert result.clients[client]["accuracies"] == [global_accuracy, interpolated]
    assert differs, "the kNN memory changes some client's predictions"


def test_logit_interpolation_and_the_curves_unit(digits, trained):
    config, result = trained
    model = client_model(config, digits, runtime_for(config))
    load_state(model, result.final_state)
    data = client_data(config, digits, 0)
    logits = KNNPer(tiny(knnper={"interpolate": "logits"})).interpolated_accuracy(model, data)
    assert math.isfinite(logits)
    algorithm = KNNPer(config)
    assert algorithm.personalization_unit() == "interpolation"
    assert "k 10, lambda 0.5" in algorithm.personalization_note()
    common = KNNPer(tiny(knnper={"evaluation": "common"}))
    assert common.personalization_unit() == "epoch" and "common protocol" in common.personalization_note()
