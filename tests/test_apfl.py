"""APFL: a local model and a mixing weight per client, learned beside the global model, on the real digits."""

from __future__ import annotations

import pytest
import torch
from conftest import client_data, five_clients, run

from fedbabu.algorithms import ALGORITHMS
from fedbabu.algorithms.apfl import ALPHA, LOCAL
from fedbabu.engine.simulation import network
from fedbabu.training import evaluate, load_state, state_of

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ("body", "head")


def tiny(**overrides):
    return five_clients("apfl", **overrides)


def test_alpha_moves_and_the_client_predicts_with_the_mixture_not_the_global_model(digits):
    """APFL's defining steps: without alpha's update alpha stays 0.5; without the local model's update the
    local model stays the received one."""
    config = tiny()
    model = network(config, digits).to(memory_format=torch.channels_last)
    data = client_data(config, digits, 0)
    received = state_of(model, ALL)
    update = ALGORITHMS["apfl"](config).client_update(model, data, {}, 0.05, torch.Generator().manual_seed(0))
    alpha = float(update.personal[ALPHA])
    assert alpha != 0.5 and 0.0 <= alpha <= 1.0
    trained = state_of(model, ALL)
    local = {n: update.personal[LOCAL + n] for n in trained}
    mixture = {n: update.personal[n] for n in trained}
    for name in trained:
        assert torch.allclose(mixture[name], alpha * local[name] + (1 - alpha) * trained[name], atol=1e-6)
    assert not torch.equal(local["head.weight"], trained["head.weight"])
    assert not torch.equal(local["head.weight"], received["head.weight"]), "the local model learns"
    x = next(data.test_batches())[0]
    model.eval()
    with torch.no_grad():
        global_logits = model(x)
        load_state(model, mixture)
        assert not torch.allclose(model(x), global_logits), "the mixture predicts otherwise than the global model"


def test_a_fixed_alpha_stays_and_alpha_one_is_the_local_model_alone(digits):
    config = tiny(apfl={"adaptive_alpha": False, "alpha": 1.0})
    model = network(config, digits).to(memory_format=torch.channels_last)
    update = ALGORITHMS["apfl"](config).client_update(model, client_data(config, digits, 1), {}, 0.05,
                                                      torch.Generator().manual_seed(0))
    assert float(update.personal[ALPHA]) == 1.0
    for name in state_of(model, ALL):
        assert torch.equal(update.personal[name], update.personal[LOCAL + name])


def test_the_local_model_and_alpha_persist_across_rounds_and_evaluation_reads_the_mixture(digits):
    config = tiny(apfl={"evaluation": "common"})
    result = run(config, digits)
    personal = result.personal[3]
    assert set(personal) == {*result.final_state, *(LOCAL + n for n in result.final_state), ALPHA}
    model = network(config, digits).to(memory_format=torch.channels_last)
    load_state(model, result.final_state)
    load_state(model, {k: torch.from_numpy(v) for k, v in personal.items()})
    assert result.clients[3]["accuracies"][0] == evaluate(model, client_data(config, digits, 3))
    one = run(tiny(rounds=1), digits)
    assert float(personal[ALPHA][0]) != float(one.personal[3][ALPHA][0]), "round 2 continues round 1's alpha"
