"""pFedMe: the personal model solves the Moreau-envelope problem, the local model follows it, and the
server mixes the clients' mean into its previous model by beta, on the real digits."""

from __future__ import annotations

import pytest
import torch
from conftest import client_data, five_clients, run

from fedbabu.algorithms import ALGORITHMS
from fedbabu.engine.simulation import network
from fedbabu.errors import UserError
from fedbabu.training import evaluate, load_state, state_of

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ("body", "head")


def tiny(**overrides):
    return five_clients("pfedme", **overrides)


def one_round(config, digits, client=0):
    """A client's round from the initial model: (update, local model it leaves, received model)."""
    model = network(config, digits).to(memory_format=torch.channels_last)
    received = state_of(model, ALL)
    update = ALGORITHMS["pfedme"](config).client_update(model, client_data(config, digits, client), {}, 0.05,
                                                        torch.Generator().manual_seed(0))
    return update, state_of(model, ALL), received


def test_the_personal_model_differs_from_the_local_one_which_moves_toward_it(digits):
    """pFedMe's defining steps: without the inner solve theta stays the received model; without the local
    step toward theta the local model stays there too."""
    update, local, received = one_round(tiny(), digits)
    theta = update.personal
    assert set(theta) == set(received)
    assert all(not torch.equal(theta[n], local[n]) for n in ("body.0.0.weight", "head.weight"))
    assert not torch.equal(local["head.weight"], received["head.weight"])
    before = sum(((received[n] - theta[n]) ** 2).sum() for n in theta)
    after = sum(((local[n] - theta[n]) ** 2).sum() for n in theta)
    assert after < before, "the local model ends closer to the personal model than where it started"


def test_beta_mixes_the_mean_into_the_previous_global_model_exactly(digits):
    """The server's step: beta 1 is the mean (what every other algorithm keeps); beta 2 goes as far again."""
    algorithm = ALGORITHMS["pfedme"](tiny(pfedme={"beta": 2.0}))
    g = torch.Generator().manual_seed(0)
    previous, mean = {"w": torch.randn(5, generator=g)}, {"w": torch.randn(5, generator=g)}
    assert torch.equal(algorithm.server_update(previous, mean, {})["w"], -1.0 * previous["w"] + 2.0 * mean["w"])
    plain = ALGORITHMS["pfedme"](tiny())
    assert torch.equal(plain.server_update(previous, mean, {})["w"], mean["w"])
    config = tiny(rounds=1, pfedme={"beta": 2.0})
    result, averaged = run(config, digits), run(tiny(rounds=1), digits)
    initial = state_of(network(config, digits), ALL)
    for name, value in result.final_state.items():
        assert torch.equal(value, -1.0 * initial[name] + 2.0 * averaged.final_state[name]), name


def test_clients_are_evaluated_with_their_personal_models(digits):
    config = tiny(pfedme={"evaluation": "common"})
    result = run(config, digits)
    model = network(config, digits).to(memory_format=torch.channels_last)
    load_state(model, result.final_state)
    load_state(model, {k: torch.from_numpy(v) for k, v in result.personal[2].items()})
    assert result.clients[2]["accuracies"][0] == evaluate(model, client_data(config, digits, 2))
    own = run(tiny(), digits)
    assert len(own.clients[2]["accuracies"]) == 2, "own: before and after one more round"
    assert own.clients[2]["accuracies"][0] == result.clients[2]["accuracies"][0]


def test_pfedme_refuses_steps_that_diverge():
    with pytest.raises(UserError, match=r"pfedme\.lambda"):
        ALGORITHMS["pfedme"](tiny(lr=0.2))
    with pytest.raises(UserError, match=r"pfedme\.personal_lr"):
        ALGORITHMS["pfedme"](tiny(pfedme={"personal_lr": 0.2}))
