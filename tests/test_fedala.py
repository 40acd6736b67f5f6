"""FedALA: the adaptive local aggregation that starts a client's round, the weights it keeps, and its
evaluation, on the real digits data."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import client_data, five_clients, run
from torch import nn

from fedbabu.algorithms import ALGORITHMS
from fedbabu.algorithms.fedala import LEARNED, WEIGHTS, FedALA
from fedbabu.engine.contract import keeps_client_state, personal_shapes
from fedbabu.engine.simulation import client_model, runtime_for
from fedbabu.training import evaluate, load_state, state_of

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ("body", "head")
TOP = ("head.weight", "head.bias")


def tiny(**overrides):
    return five_clients("fedala", **overrides)


def shifted(state: dict, seed: int, size: float = 0.1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + size * torch.randn(v.shape, generator=g) for k, v in state.items()}


def setup(digits, config, client: int = 0):
    """A model holding the global state, the client's data, and a kept local model that differs from it."""
    model = client_model(config, digits, runtime_for(config))
    received = state_of(model, ALL)
    local = shifted(received, client + 10, size=0.3)
    return model, client_data(config, digits, client), received, local


def kept(local: dict, learned: float, weights: dict | None = None) -> dict:
    weights = weights or {n: torch.ones_like(local[n]) for n in TOP}
    return {**local, **{WEIGHTS + n: w for n, w in weights.items()}, LEARNED: torch.tensor(learned)}


def test_aggregation_takes_the_global_lower_layers_and_mixes_the_top_with_learned_weights(digits):
    config = tiny()
    model, data, received, local = setup(digits, config)
    algorithm = FedALA(config)
    aux = algorithm.local_initialization(model, data, kept(local, 0.0), torch.Generator().manual_seed(0))
    got = state_of(model, ALL)
    assert algorithm.aggregated_names(list(got)) == list(TOP), "layer_idx 2: the head's weight and bias"
    for name in got:
        if name not in TOP:
            assert torch.equal(got[name], received[name]), f"{name}: a lower layer is the global model's"
    for name in TOP:
        weights = aux[WEIGHTS + name]
        assert not torch.equal(got[name], received[name]) and not torch.equal(got[name], local[name]), name
        assert (weights >= 0).all() and (weights <= 1).all()
        assert (weights < 1).any(), f"{name}: the weights moved from their initial ones"
        assert torch.allclose(got[name], local[name] + (received[name] - local[name]) * weights, atol=1e-6)
    assert aux[LEARNED].item() == 1.0


def test_the_first_aggregation_trains_until_the_losses_settle_and_later_ones_one_pass(digits):
    config = tiny()
    algorithm = FedALA(config)
    batches = {}
    for learned in (0.0, 1.0):
        model, data, _, local = setup(digits, config, client=1)
        calls: list[int] = []
        model.body.register_forward_hook(lambda module, inputs, output, calls=calls: calls.append(1))
        algorithm.local_initialization(model, data, kept(local, learned), torch.Generator().manual_seed(0))
        batches[learned] = len(calls)
    window = int(0.8 * data.num_train)
    per_epoch = math.ceil(window / config.batch_size)
    assert batches[1.0] == per_epoch, "one pass over the 80% slice"
    assert batches[0.0] % per_epoch == 0 and batches[0.0] >= 11 * per_epoch, "at least num_pre_loss + 1 epochs"


def test_a_client_without_a_local_model_starts_from_the_global_one(digits):
    config = tiny()
    model, data, received, _ = setup(digits, config)
    aux = FedALA(config).local_initialization(model, data, {}, torch.Generator().manual_seed(0))
    assert all(torch.equal(p, received[n]) for n, p in model.named_parameters())
    assert all(torch.equal(aux[WEIGHTS + n], torch.ones_like(received[n])) for n in TOP)
    assert aux[LEARNED].item() == 0.0, "the first aggregation is still to come"


def test_the_weights_and_flag_are_declared_kept_and_never_loaded_into_the_network(digits):
    config = tiny()
    algorithm = ALGORITHMS["fedala"](config)
    model = client_model(config, digits, runtime_for(config))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    expected = shapes | {WEIGHTS + n: shapes[n] for n in TOP} | {LEARNED: ()}
    assert personal_shapes(algorithm, shapes) == expected and keeps_client_state(algorithm)
    before = state_of(model, ALL)
    load_state(model, {WEIGHTS + "head.bias": torch.zeros(10), LEARNED: torch.tensor(1.0)})
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    result = run(config, digits)
    for state in result.personal.values():
        assert set(state) == set(expected)
    assert all(state[LEARNED] == 1.0 for state in result.personal.values()), "every client aggregated in round 2"


def test_own_evaluation_tests_the_kept_local_model_then_its_aggregation_with_the_final_model(digits):
    config = tiny()
    algorithm = FedALA(config)
    model, data, received, local = setup(digits, config, client=2)
    personal = kept(local, 1.0)
    curve = algorithm.own_personalize(model, data, personal, torch.Generator().manual_seed(4))
    reference = client_model(config, digits, runtime_for(config))
    load_state(reference, local)
    assert curve[0] == evaluate(reference, data)
    load_state(reference, received)
    FedALA(config).local_initialization(reference, data, personal, torch.Generator().manual_seed(4))
    assert curve[1] == evaluate(reference, data)
    assert algorithm.personalization_unit() == "aggregation"
    common = FedALA(tiny(fedala={"evaluation": "common"}))
    assert common.personalization_unit() == "epoch" and "common protocol" in common.personalization_note()


def test_a_round_trains_the_aggregated_model_with_plain_cross_entropy(digits):
    config = tiny()
    model, data, _, local = setup(digits, config, client=3)
    update = FedALA(config).client_update(model, data, kept(local, 1.0), 0.05, torch.Generator().manual_seed(1))
    assert math.isfinite(update.loss)
    assert set(update.personal) >= set(state_of(model, ALL))
    assert all(torch.equal(update.personal[n], p) for n, p in model.named_parameters()), "keeps what it sent"
    assert not any(p.requires_grad for p in model.parameters()), "nothing is left trainable"
    assert isinstance(model.head, nn.Linear)


def test_max_settle_epochs_bounds_the_first_aggregation_whose_losses_never_settle(digits):
    """A threshold no loss std can reach would loop for ever, as ALA.py would; the bound stops it there."""
    batches = {}
    for cap in (3, 5):
        config = tiny(fedala={"threshold": 1e-12, "max_settle_epochs": cap})
        model, data, _, local = setup(digits, config, client=1)
        calls: list[int] = []
        model.body.register_forward_hook(lambda module, inputs, output, calls=calls: calls.append(1))
        FedALA(config).local_initialization(model, data, kept(local, 0.0), torch.Generator().manual_seed(0))
        batches[cap] = len(calls)
    per_epoch = math.ceil(int(0.8 * data.num_train) / config.batch_size)
    assert batches == {3: 3 * per_epoch, 5: 5 * per_epoch}
