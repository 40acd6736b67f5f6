"""FedBN: the normalization layers stay on their clients, everything else is averaged, on the real digits."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import client_data, five_clients, run
from torch import nn

from fedbabu.algorithms import ALGORITHMS
from fedbabu.engine.params import Layout
from fedbabu.engine.simulation import network
from fedbabu.models import NORM, BodyHead, in_parts, norm_parameters
from fedbabu.training import evaluate, load_state

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides):
    return five_clients("fedbn", **overrides)


def test_the_norm_part_is_every_normalization_layer_by_type_whatever_its_name():
    model = BodyHead(nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LayerNorm(4)),
                     nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)))
    norms = norm_parameters(model)
    assert norms == {"body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias", "head.0.weight", "head.0.bias"}
    shared = ("body", "head", "-norm")
    assert [n for n, _ in model.named_parameters() if in_parts(n, shared, norms)] == \
        ["body.0.weight", "body.0.bias", "head.1.weight", "head.1.bias"]
    assert all(in_parts(n, (NORM,), norms) == (n in norms) for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="norm_parameters"):
        in_parts("body.1.weight", (NORM,))


def test_batch_norm_stays_on_each_client_while_every_other_weight_is_averaged(digits):
    """FedBN's defining step: with the norm layers among the shared parts, this fails."""
    config = tiny()
    result = run(config, digits)
    initial = dict(network(config, digits).named_parameters())
    norms = Layout(network(config, digits)).norms
    assert norms == {"body.0.1.weight", "body.0.1.bias", "body.1.1.weight", "body.1.1.bias"}
    for name in norms:
        assert torch.equal(result.final_state[name], initial[name]), "the server never averages a norm layer"
    assert not torch.equal(result.final_state["body.0.0.weight"], initial["body.0.0.weight"]), "convs are averaged"
    for a, b in itertools.combinations(range(5), 2):
        assert set(result.personal[a]) == norms
        assert not torch.equal(torch.from_numpy(result.personal[a]["body.0.1.weight"]),
                               torch.from_numpy(result.personal[b]["body.0.1.weight"]))
    model = network(config, digits).to(memory_format=torch.channels_last)
    for client in (0, 3):
        load_state(model, result.final_state)
        load_state(model, {k: torch.from_numpy(v) for k, v in result.personal[client].items()})
        assert result.clients[client]["accuracies"][0] == evaluate(model, client_data(config, digits, client))


def test_a_client_never_sampled_starts_from_the_initial_norm_layers(digits):
    config = tiny(client_fraction=0.2, rounds=1)
    result = run(config, digits)
    untrained = [c for c in range(5) if c not in result.personal]
    assert len(untrained) == 4
    model = network(config, digits).to(memory_format=torch.channels_last)
    load_state(model, result.final_state)
    assert result.clients[untrained[0]]["accuracies"][0] == evaluate(model, client_data(config, digits, untrained[0]))


def test_fedbn_describes_its_parts():
    algorithm = ALGORITHMS["fedbn"](tiny())
    assert algorithm.shared_parts == ("body", "head", "-norm") and algorithm.personal_parts == ("norm",)
