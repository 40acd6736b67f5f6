"""Each method as its authors train and evaluate it: the FedBABU authors' FedPer and FedRep, the head
family's own training settings, gradient clipping and the per-round lr decay they need, and runs of
an older build of an algorithm recognised instead of reused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import client_data, run, same
from test_baselines import initial_model, tiny
from test_reproduce import _digits_preset

from fedbabu.algorithms import ALGORITHMS
from fedbabu.config import build_config, dump_config, load_config
from fedbabu.engine.simulation import client_model, personalize_generator, runtime_for
from fedbabu.reproduce import cells, load_preset, run_preset
from fedbabu.training import OPTIMIZER_STATE, LocalTraining, evaluate, load_state, sgd_epochs, state_of

pytestmark = pytest.mark.usefixtures("one_thread")


def part(state: dict, name: str) -> dict:
    return {k: torch.as_tensor(v) for k, v in state.items() if k.startswith(f"{name}.")}


def test_fedper_as_the_fedbabu_authors_run_it_discards_every_trained_head(digits):
    config = tiny(algorithm="fedper", fedper={"keep_head": False})
    result = run(config, digits)
    initial = state_of(initial_model(config, digits), ("head",))
    assert same(part(result.final_state, "head"), initial)
    assert all(not result.personal.get(c) for c in range(5)), "no client keeps a head of its own"
    for c in (0, 3):
        model = initial_model(config, digits)
        load_state(model, {k: torch.as_tensor(v) for k, v in result.final_state.items()})
        assert same(state_of(model, ("head",)), initial)
        assert result.clients[c]["accuracies"][0] == evaluate(model, client_data(config, digits, c)), \
            "every client is evaluated (and fine-tuned) from the final body and the initial head"
    fedbabu = run(tiny(algorithm="fedbabu"), digits)
    assert not same(part(result.final_state, "body"), part(fedbabu.final_state, "body")), \
        "the head is trained within the round (its gradients shape the body) before it is thrown away"
    kept = run(tiny(algorithm="fedper"), digits)
    assert not same(part(kept.personal[0], "head"), initial), "keep_head (the default) keeps personal heads"


def test_fedrep_own_evaluation_is_one_fedrep_update_from_the_final_body_and_the_kept_head(digits):
    config = tiny(algorithm="fedrep", local_epochs=2, fedrep={"head_epochs": None, "evaluation": "own"})
    result = run(config, digits)
    assert ALGORITHMS["fedrep"](config).personalization_unit() == "round"
    for c in (0, 2):
        model = initial_model(config, digits)
        load_state(model, {k: torch.as_tensor(v) for k, v in result.final_state.items()})
        load_state(model, {k: torch.as_tensor(v) for k, v in result.personal[c].items()})
        data = client_data(config, digits, c)
        before = evaluate(model, data)
        lr, generator = config.lr_at(config.rounds - 1), personalize_generator(config, c)
        body = [p for n, p in model.named_parameters() if n.startswith("body.")]
        head = [p for n, p in model.named_parameters() if n.startswith("head.")]
        optimizer = torch.optim.SGD([{"params": body, "lr": 0.0}, {"params": head, "lr": lr}],
                                    momentum=config.momentum)
        for body_lr, head_lr, epochs in ((0.0, lr, 2), (lr, 0.0, 1)):  # by hand: head x local_epochs, body x1
            optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"] = body_lr, head_lr
            for _ in range(epochs):
                model.train()
                for x, y in data.train_batches(config.batch_size, generator):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        assert result.clients[c]["accuracies"] == [before, evaluate(model, data)]


@pytest.mark.parametrize("algorithm", ["fedrod", "feduh", "fednh"])
def test_the_fednh_authors_training_resolves_to_their_cifar10_script(algorithm):
    common = load_config(overrides=[f"algorithm={algorithm}"])
    config = load_config(overrides=[f"algorithm={algorithm}", f"{algorithm}.training=authors", "lr=0.5"])
    assert (common.lr, common.lr_schedule, common.clip_grad_norm) == (0.05, "step", None), "common changes nothing"
    assert (config.lr, config.lr_schedule, config.lr_decay, config.batch_size, config.momentum, config.weight_decay,
            config.clip_grad_norm) == (0.01, "exponential", 0.99, 64, 0.9, 1e-5, 10.0)
    assert [config.lr_at(r) for r in (0, 1, 5)] == [0.01, 0.01 * 0.99, 0.01 * 0.99**5], "x0.99 every round"
    assert (config.rounds, config.local_epochs) == (common.rounds, common.local_epochs), "the run's own budget"
    assert build_config(json.loads(json.dumps(config.to_plain()))) == config, "config.yaml reloads to itself"
    assert "training: authors" in dump_config(config)


def test_the_fedetf_authors_training_resolves_to_theirs_and_keeps_each_clients_optimizer():
    config = load_config(overrides=["algorithm=fedetf", "fedetf.training=authors"])
    assert (config.lr, config.batch_size, config.momentum, config.weight_decay, config.clip_grad_norm) == \
        (0.04, 128, 0.9, 5e-4, None)
    assert {config.lr_at(r) for r in range(config.rounds)} == {0.04}, "constant: their scheduler call is off"
    fedetf = ALGORITHMS["fedetf"](config)
    untrained_way = ALGORITHMS["fedetf"](load_config(overrides=["algorithm=fedetf"]))
    assert fedetf.keeps_momentum and not untrained_way.keeps_momentum
    assert fedetf.adaptation().lr == 0.04
    assert fedetf.alternation_lrs() == pytest.approx((0.1, 0.05)), "their ETF and projection lrs"
    common = ALGORITHMS["fedetf"](load_config(overrides=["algorithm=fedetf", "rounds=4", "lr=0.1"]))
    assert common.adaptation().lr == pytest.approx(0.001), "the final lr, after both decays"
    assert common.alternation_lrs() == pytest.approx((0.0025, 0.00125)), "the same ratios to the adaptation lr"


def test_the_head_family_authors_preset_trains_each_method_its_authors_way_and_reuses_fedavg_and_fedbabu():
    (own,) = cells(load_preset("head-family-authors"))
    (untuned,) = cells(load_preset("head-family"))
    configs = {a: build_config({**own.values_for(a), "algorithm": a}) for a in ("fedrod", "feduh", "fednh", "fedetf")}
    assert {a: (c.lr, c.batch_size, c.clip_grad_norm) for a, c in configs.items()} == {
        "fedrod": (0.01, 64, 10.0), "feduh": (0.01, 64, 10.0), "fednh": (0.01, 64, 10.0), "fedetf": (0.04, 128, None)}
    assert {(c.rounds, c.local_epochs) for c in configs.values()} == {(32, 10)}
    for reference in ("fedavg", "fedbabu"):
        assert own.values_for(reference) == untuned.values_for(reference)


def test_gradient_clipping_bounds_every_local_step(digits):
    config = tiny(algorithm="fedavg")
    data = client_data(config, digits, 0)
    moved = {}
    for clip in (None, 1e-3):
        model = initial_model(config, digits)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        sgd_epochs(model, data, ("body", "head"), LocalTraining(1, data.num_train, 1.0, clip_grad_norm=clip),
                   torch.Generator().manual_seed(0))
        moved[clip] = float(torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in model.parameters()])
                                                     - before))
    assert moved[1e-3] == pytest.approx(1e-3, rel=1e-3), "one plain SGD step of lr 1 moves exactly the clipped norm"
    assert moved[None] > 100 * moved[1e-3]


def test_fedetf_under_its_authors_training_carries_each_clients_momentum_into_its_next_round(digits):
    config = tiny(algorithm="fedetf", rounds=2, fedetf={"training": "authors", "alternations": 1})
    result = run(config, digits)
    trained = [n for n in result.final_state if n.startswith(("body.", "head.projection", "head.temperature"))]
    assert set(result.personal[0]) == {OPTIMIZER_STATE + n for n in trained}
    fedetf, data = ALGORITHMS["fedetf"](config), client_data(config, digits, 0)
    starts = {k: torch.as_tensor(v) for k, v in result.final_state.items()}
    updates = []
    for personal in ({k: torch.as_tensor(v) for k, v in result.personal[0].items()}, {}):
        model = client_model(config, digits, runtime_for(config))
        load_state(model, starts)
        fedetf.client_update(model, data, personal, 0.04, torch.Generator().manual_seed(1))
        updates.append(state_of(model, ("body",)))
    assert not same(*updates), "the kept momentum moves the next round"


def test_a_run_of_an_older_build_of_its_algorithm_is_trained_again_not_reused(tmp_path, monkeypatch):
    _digits_preset(tmp_path, monkeypatch, "stale", "local", 2)
    out = tmp_path / "out"
    run_preset("stale", out, log=lambda line: None)
    summary_path = out / "default" / "local" / "seed-0" / "summary.json"
    summary = json.loads(summary_path.read_text())
    assert summary["algorithm_version"] == {"training": 2, "evaluation": 1}
    del summary["algorithm_version"]  # as a build from before local kept its momentum left it
    summary_path.write_text(json.dumps(summary))
    lines = []
    run_preset("stale", out, log=lines.append)
    assert "trained by an older build of local (training version 1, now 2): training again" in lines[0]
    assert json.loads(summary_path.read_text())["algorithm_version"]["training"] == 2
    lines.clear()
    run_preset("stale", out, log=lines.append)
    assert "already complete, skipped" in lines[0]


def test_a_run_evaluated_by_an_older_build_is_personalized_again_and_not_retrained(tmp_path, monkeypatch):
    _digits_preset(tmp_path, monkeypatch, "rod", "fedrod", 2)
    out = tmp_path / "out"
    run_preset("rod", out, log=lambda line: None)
    folder = out / "default" / "fedrod" / "seed-0"
    summary = json.loads((folder / "summary.json").read_text())
    summary["algorithm_version"]["evaluation"] = 1  # FedRoD's earlier own evaluation, without a final local round
    (folder / "summary.json").write_text(json.dumps(summary))
    model = (folder / "model.pt").read_bytes()
    lines = []
    run_preset("rod", out, log=lines.append)
    assert "already complete, skipped" in lines[0] and "personalizing again" in lines[1]
    assert (folder / "model.pt").read_bytes() == model
    (again,) = (folder / "personalize").iterdir()
    assert json.loads((again / "summary.json").read_text())["algorithm_version"]["evaluation"] == 2
