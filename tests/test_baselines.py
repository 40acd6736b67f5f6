"""The baselines and ablations: one test per defining property, plus an end-to-end digits compare."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import client_data, run, same

from fedbabu.algorithms import ALGORITHMS
from fedbabu.algorithms.perfedavg import hessian_vector_product
from fedbabu.config import DIGITS_DEFAULT, Config, build_config
from fedbabu.engine.params import Layout
from fedbabu.engine.simulation import TRAIN_STREAM, client_generator, preflight
from fedbabu.errors import UserError
from fedbabu.files import load_tensors
from fedbabu.models import build_model, count_parameters
from fedbabu.results.report import comparison_markdown, comparison_rows, write_comparison
from fedbabu.runner import run_comparison, run_experiment
from fedbabu.training import OPTIMIZER_STATE, evaluate, load_state, set_trainable, state_of

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ["fedavg", "fedbabu", "fedper", "lg_fedavg", "fedrep", "perfedavg", "ditto", "fedprox", "local"]


def tiny(**overrides):
    """Five digits clients, all sampled every round, three rounds: about a second per run."""
    values = {**DIGITS_DEFAULT, "num_clients": 5, "rounds": 3, "client_fraction": 1.0, "eval_every": 0,
              "workers": 1, "fedrep": {"head_epochs": 1}, "finetune": {**DIGITS_DEFAULT["finetune"], "epochs": 1}}
    values.update(overrides)
    return build_config(values)


def initial_model(config, digits):
    model = build_model(config.resolved_model(), digits.channels, digits.image_size, digits.num_classes,
                        config.head_init, config.seed)
    return model.to(memory_format=torch.channels_last)


def part_state(state: dict, part: str) -> dict:
    return {k: v for k, v in state.items() if k.startswith(f"{part}.")}


def accuracy_with(config, digits, client, *states) -> float:
    """A client's test accuracy with the given states loaded, one after the other, into the initial model."""
    model = initial_model(config, digits)
    for state in states:
        load_state(model, {k: torch.as_tensor(v) for k, v in state.items()})
    return evaluate(model, client_data(config, digits, client))


def test_fedper_heads_are_personal_and_never_averaged(digits):
    config = tiny(algorithm="fedper")
    result = run(config, digits)
    init = dict(initial_model(config, digits).named_parameters())
    assert torch.equal(result.final_state["head.weight"], init["head.weight"]), "the server never touches heads"
    assert not torch.equal(result.final_state["body.0.0.weight"], init["body.0.0.weight"])
    heads = [torch.from_numpy(result.personal[c]["head.weight"]) for c in range(5)]
    assert set(result.personal[0]) == {"head.weight", "head.bias"}
    for a, b in itertools.combinations(heads, 2):
        assert not torch.equal(a, b)
    for c in (0, 3):
        assert result.clients[c]["accuracies"][0] == accuracy_with(config, digits, c, result.final_state,
                                                                   result.personal[c])


def test_lg_fedavg_bodies_are_personal_and_never_averaged(digits):
    config = tiny(algorithm="lg_fedavg")
    result = run(config, digits)
    init = initial_model(config, digits)
    assert same(part_state(result.final_state, "body"), state_of(init, ("body",)))
    assert not torch.equal(result.final_state["head.weight"], init.head.weight)
    bodies = [torch.from_numpy(result.personal[c]["body.0.0.weight"]) for c in range(5)]
    assert all(k.startswith("body.") for k in result.personal[0])
    for a, b in itertools.combinations(bodies, 2):
        assert not torch.equal(a, b)
    assert result.bytes_per_round_per_client == 8 * count_parameters(init, "head")


def test_fedrep_freezes_the_body_in_the_head_phase_and_the_head_in_the_body_phase(digits, monkeypatch):
    import fedbabu.algorithms.fedrep as fedrep

    config = tiny(algorithm="fedrep", fedrep={"head_epochs": 2, "body_epochs": 1})
    phases = []
    original = fedrep.sgd_epochs

    def spy(model, data, parts, settings, generator, **options):
        before = state_of(model, ("body", "head"))
        loss = original(model, data, parts, settings, generator, **options)
        after = state_of(model, ("body", "head"))
        moved = {part: not same(part_state(before, part), part_state(after, part)) for part in ("body", "head")}
        phases.append((settings.epochs, moved))
        return loss

    monkeypatch.setattr(fedrep, "sgd_epochs", spy)
    model = initial_model(config, digits)
    own_head = {k: v + 0.01 for k, v in state_of(model, ("head",)).items()}
    update = ALGORITHMS["fedrep"](config).client_update(model, client_data(config, digits, 0), own_head, 0.05,
                                                        torch.Generator().manual_seed(0))
    assert phases == [(2, {"body": False, "head": True}), (1, {"body": True, "head": False})]
    assert set(update.personal) == {"head.weight", "head.bias"}
    assert not same(update.personal, own_head), "the client's own head is the one trained"


def test_fedrep_keeps_heads_per_client_and_aggregates_only_the_body(digits):
    config = tiny(algorithm="fedrep")
    result = run(config, digits)
    init = initial_model(config, digits)
    assert same(part_state(result.final_state, "head"), state_of(init, ("head",)))
    assert not torch.equal(torch.from_numpy(result.personal[0]["head.weight"]),
                           torch.from_numpy(result.personal[1]["head.weight"]))


def personal_distance(config, digits, lam: float) -> float:
    """How far one Ditto round moves client 0's personal model from the global model it received."""
    model = initial_model(config.with_settings("ditto", **{"lambda": lam}), digits)
    received = state_of(model, ("body", "head"))
    algorithm = ALGORITHMS["ditto"](config.with_settings("ditto", **{"lambda": lam}))
    update = algorithm.client_update(model, client_data(config, digits, 0), {}, config.lr,
                                     torch.Generator().manual_seed(1))
    return float(sum(((update.personal[k] - received[k]) ** 2).sum() for k in received)) ** 0.5


def test_ditto_large_lambda_pulls_the_personal_model_onto_the_global_one(digits):
    config = tiny(algorithm="ditto", local_epochs=3, lr=0.01)
    free, mild, strong = (personal_distance(config, digits, lam) for lam in (0.0, 10.0, 100.0))
    assert free > mild > strong
    assert strong < 0.1 * free


def test_ditto_with_lambda_zero_is_local_training_and_is_evaluated_on_personal_models(digits):
    """Without momentum: local keeps its optimizer's momentum from round to round, Ditto's personal
    model gets a new optimizer every round, and with no momentum the two are the same training."""
    ditto = run(tiny(algorithm="ditto", ditto={"lambda": 0.0}, momentum=0.0), digits)
    local = run(tiny(algorithm="local", momentum=0.0), digits)
    for c in range(5):
        assert same(ditto.personal[c], local.personal[c]), f"client {c}"
    assert ditto.accuracy_curve()[:, 0].tolist() == local.accuracy_curve()[:, 0].tolist()
    with_lambda = run(tiny(algorithm="ditto", ditto={"lambda": 0.5}, momentum=0.0), digits)
    assert not same(with_lambda.personal[0], local.personal[0])


def test_ditto_refuses_a_lambda_that_diverges():
    with pytest.raises(UserError, match=r"ditto\.lambda"):
        ALGORITHMS["ditto"](tiny(algorithm="ditto", ditto={"lambda": 100.0}, lr=0.05))


def test_fedprox_with_mu_zero_equals_fedavg_bit_for_bit(digits):
    fedavg = run(tiny(algorithm="fedavg"), digits)
    prox0 = run(tiny(algorithm="fedprox", fedprox={"mu": 0.0}), digits)
    assert same(fedavg.final_state, prox0.final_state)
    assert np.array_equal(fedavg.accuracy_curve(), prox0.accuracy_curve())
    prox = run(tiny(algorithm="fedprox", fedprox={"mu": 1.0}), digits)
    assert not same(fedavg.final_state, prox.final_state)
    with pytest.raises(UserError, match=r"fedprox\.mu"):  # beyond 2 (1 + momentum) / lr SGD on the term diverges
        ALGORITHMS["fedprox"](tiny(algorithm="fedprox", fedprox={"mu": 100.0}, lr=0.05))
    init = state_of(initial_model(tiny(), digits), ("body", "head"))

    def drift(state):
        return sum(float(((state[k] - init[k]) ** 2).sum()) for k in init)

    assert drift(prox.final_state) < drift(fedavg.final_state), "the proximal term holds clients back"


def test_perfedavg_fo_and_hf_both_train_and_differ(digits):
    results = {v: run(tiny(algorithm="perfedavg", perfedavg={"variant": v, "adapt_steps": 2}), digits)
               for v in ("fo", "hf")}
    init = state_of(initial_model(tiny(), digits), ("body", "head"))
    for result in results.values():
        assert not same(result.final_state, init)
        assert all(torch.isfinite(v).all() for v in result.final_state.values())
        assert result.accuracy_curve().shape == (5, 3), "initial + one column per adaptation step"
        assert result.personal == {}
    assert not same(results["fo"].final_state, results["hf"].final_state)


def test_perfedavg_personalization_is_the_authors_one_sgd_step(digits):
    """one_sgd_step by hand: one new momentum SGD, a step at the final round's lr, then one at beta,
    each on the next batch and without going back to the starting weights (on training data here)."""
    config = tiny(algorithm="perfedavg", rounds=4, lr=0.05)
    algorithm = ALGORITHMS["perfedavg"](config)
    data = client_data(config, digits, 0)
    model = initial_model(config, digits)
    accuracies = algorithm.personalize(model, data, {}, torch.Generator().manual_seed(0))
    expected = initial_model(config, digits)
    optimizer = torch.optim.SGD(expected.parameters(), lr=1.0, momentum=config.momentum)
    stream = _shuffled_stream(data, config.batch_size, torch.Generator().manual_seed(0))
    expected.train()
    for lr in (config.lr_at(3), 0.1):
        x, y = next(stream)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(expected(x), y).backward()
        optimizer.step()
    assert same(state_of(model, ("body", "head")), state_of(expected, ("body", "head")))
    assert len(accuracies) == 3 and config.lr_at(3) == pytest.approx(0.0005)
    assert algorithm.personalization_note() == ("Per-FedAvg adaptation (fo), 2 momentum SGD step(s) at lr "
                                                "0.0005 then 0.1, alternately")


def _shuffled_stream(data, batch_size, generator):
    """Batches of one shuffle after another, as a DataLoader iterator restarted when it runs out."""
    return itertools.chain.from_iterable(data.train_batches(batch_size, generator) for _ in itertools.count())


def test_perfedavg_hessian_free_product_matches_autograd(digits):
    config = tiny(algorithm="perfedavg")
    model = initial_model(config, digits).double()
    data = client_data(config, digits, 0)
    params = set_trainable(model, ("body", "head"))
    x, y = next(data.train_batches(20, torch.Generator().manual_seed(0)))
    batch = (x.double(), y)
    vector = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
              for i, p in enumerate(params)]
    norm = sum(float((v**2).sum()) for v in vector) ** 0.5
    vector = [v / norm for v in vector]
    approx = hessian_vector_product(model, params, batch, data, vector, 1e-6)
    loss = torch.nn.functional.cross_entropy(model(batch[0]), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    exact = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vector, strict=True)), params)
    a, e = torch.cat([t.reshape(-1) for t in approx]), torch.cat([t.reshape(-1) for t in exact])
    assert torch.nn.functional.cosine_similarity(a, e, dim=0) > 0.99
    assert abs(a.norm() / e.norm() - 1) < 0.05


def test_local_communicates_nothing_and_trains_every_client_alone(digits):
    config = tiny(algorithm="local")
    result = run(config, digits)
    assert result.bytes_per_round_per_client == 0
    init = initial_model(config, digits)
    assert same(result.final_state, state_of(init, ("body", "head")))
    for a, b in itertools.combinations(range(5), 2):
        assert not torch.equal(torch.from_numpy(result.personal[a]["body.0.0.weight"]),
                               torch.from_numpy(result.personal[b]["body.0.0.weight"]))
    assert same(_trained_alone(config, digits, 2), weights(result.personal[2])), "exactly training alone"


def weights(personal):
    """A personal state without the optimizer buffers local training keeps beside its model."""
    return {k: v for k, v in personal.items() if not k.startswith(OPTIMIZER_STATE)}


def _trained_alone(config, digits, client):
    """A client's model after local training, by hand as the authors' main_local.py trains it: one SGD
    optimizer through every epoch, its lr stepped by the schedule, each round's batches drawn from
    that round's generator."""
    model = initial_model(config, digits)
    data = client_data(config, digits, client)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    model.train()
    for r in range(config.rounds):
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(r)
        generator = client_generator(config.seed, r, client, TRAIN_STREAM)
        for _ in range(config.local_epochs):
            for x, y in data.train_batches(config.batch_size, generator):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return state_of(model, ("body", "head"))


def test_local_keeps_one_optimizer_across_rounds_and_its_momentum_only_beside_the_model(digits):
    """Two-epoch rounds under a decaying lr: still one optimizer. The buffers travel in the personal
    state but never into a model: evaluation, personalization and the API read only weights."""
    config = tiny(algorithm="local", rounds=4, local_epochs=2, client_fraction=0.4)
    result = run(config, digits)
    assert len({config.lr_at(r) for r in range(4)}) == 3, "the lr steps down twice"
    assert same(_trained_alone(config, digits, 3), weights(result.personal[3]))
    names = [n for n, _ in initial_model(config, digits).named_parameters()]
    assert sorted(result.personal[3]) == sorted(names + [OPTIMIZER_STATE + n for n in names])
    model = initial_model(config, digits)
    load_state(model, {k: torch.from_numpy(v) for k, v in result.personal[3].items()})
    assert same(state_of(model, ("body", "head")), weights(result.personal[3]))
    assert evaluate(model, client_data(config, digits, 3)) == result.accuracy_curve()[3, 0]


@pytest.mark.parametrize("part", ["body", "head", "full"])
def test_update_part_moves_only_the_named_part(digits, part):
    config = tiny(algorithm="fedavg", fedavg={"update_part": part})
    result = run(config, digits)
    init = initial_model(config, digits)
    layout = Layout(init)
    for name in ("body", "head"):
        moved = not same(part_state(result.final_state, name), state_of(init, (name,)))
        assert moved == (part in (name, "full")), name
    assert result.bytes_per_round_per_client == 8 * layout.count(("body", "head") if part == "full" else (part,))


def test_update_part_body_is_fedbabu_bit_for_bit(digits):
    ablation = run(tiny(algorithm="fedavg", fedavg={"update_part": "body"}), digits)
    fedbabu = run(tiny(algorithm="fedbabu"), digits)
    assert same(ablation.final_state, fedbabu.final_state)
    assert np.array_equal(ablation.accuracy_curve(), fedbabu.accuracy_curve())


def test_zero_head_is_refused_for_body_only_training_and_learns_when_the_head_trains(digits):
    with pytest.raises(UserError, match="head_init"):
        ALGORITHMS["fedavg"](tiny(algorithm="fedavg", fedavg={"update_part": "body"}, head_init="zeros"))
    result = run(tiny(algorithm="fedavg", fedavg={"update_part": "head"}, head_init="zeros", rounds=4), digits)
    assert result.final_state["head.weight"].abs().sum() > 0
    assert np.mean(result.accuracy_curve()[:, 0]) > 0.3, "a trained zero head learns (chance is 0.1)"


def test_another_algorithms_section_is_kept_but_changes_nothing(digits):
    """A compare's base config carries every entry's settings; a run reads only its own section."""
    config = tiny(algorithm="fedbabu", fedavg={"update_part": "head"}, ditto={"lambda": 0.5})
    assert ALGORITHMS["fedbabu"](config).trained_parts == ("body",)
    assert config.to_plain()["fedavg"] == {"update_part": "head"} and config.settings_for("ditto").lambda_ == 0.5
    assert same(run(config, digits).final_state, run(tiny(algorithm="fedbabu"), digits).final_state)


def test_orthogonal_head_has_orthonormal_rows(digits):
    config = tiny(head_init="orthogonal")
    weight = initial_model(config, digits).head.weight.detach()
    assert torch.allclose(weight @ weight.T, torch.eye(weight.shape[0]), atol=1e-5)
    default = initial_model(tiny(), digits).head.weight.detach()
    assert not torch.allclose(default @ default.T, torch.eye(default.shape[0]), atol=1e-2)
    assert torch.count_nonzero(initial_model(tiny(head_init="zeros"), digits).head.weight) == 0


def test_personal_state_does_not_depend_on_the_number_of_workers(digits):
    one = run(tiny(algorithm="ditto", client_fraction=0.5, rounds=2), digits)
    two = run(tiny(algorithm="ditto", client_fraction=0.5, rounds=2, workers=2), digits)
    assert one.personal.keys() == two.personal.keys() and len(one.personal) >= 3
    for c in one.personal:
        assert same(one.personal[c], two.personal[c])
    assert same(one.final_state, two.final_state)


def test_compare_entries_must_share_the_partition_and_be_unique(tmp_path):
    with pytest.raises(UserError, match="num_clients"):
        run_comparison(tiny(), ["fedavg", "fedbabu:num_clients=4"], tmp_path / "a")
    with pytest.raises(UserError, match="once"):
        run_comparison(tiny(), ["fedavg", "fedavg"], tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_compare_all_algorithms_end_to_end_on_digits(tmp_path, digits):
    out = tmp_path / "cmp"
    entries = [*ALL, "perfedavg:variant=hf", "fedavg:update_part=head"]
    overrides = ["num_clients=5", "rounds=2", "client_fraction=1.0", "eval_every=0", "fedrep.head_epochs=1",
                 "finetune.epochs=2", "local_epochs=1"]
    cmd = [sys.executable, "-m", "fedbabu", "compare", "--algorithms", ",".join(entries), "--seeds", "1",
           "--out", str(out), "--quiet", "--workers", "1"] + [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    with (out / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["algorithm"] for r in rows] == entries
    assert next(iter(rows[0])) == "algorithm"
    by_name = {r["algorithm"]: r for r in rows}
    model = build_model("digitcnn", digits.channels, digits.image_size, digits.num_classes)
    body, head = count_parameters(model, "body"), count_parameters(model, "head")
    expected_bytes = {"fedavg": body + head, "fedbabu": body, "fedper": body, "lg_fedavg": head, "fedrep": body,
                      "perfedavg": body + head, "ditto": body + head, "fedprox": body + head, "local": 0,
                      "fedavg:update_part=head": head}
    for name, floats in expected_bytes.items():
        assert int(by_name[name]["bytes_per_round_per_client"]) == 8 * floats, name
    for r in rows:
        assert r["seeds"] == "1"
        for key in ("initial_mean", "personalized_mean"):
            assert 0.0 <= float(r[key]) <= 1.0
        assert float(r["wall_time_s"]) > 0
    assert float(by_name["fedbabu"]["personalized_mean"]) > 0.3
    markdown = (out / "comparison.md").read_text()
    assert all(f"| {name} |" in markdown for name in entries)
    assert "Per-FedAvg adaptation (hf)" in markdown
    for png in ("comparison.png", "finetune.png"):
        assert (out / png).stat().st_size > 1000
    summary = json.loads((out / "perfedavg_variant-hf" / "summary.json").read_text())
    assert summary["seed"] == 1 and summary["personalization_unit"] == "step"
    header = (out / "perfedavg" / "clients.csv").read_text().splitlines()[0]
    assert header.endswith("initial_accuracy,accuracy_after_step_1,accuracy_after_step_2")
    partitions = {(out / name / "partition.json").read_text() for name in ("fedavg", "local", "ditto")}
    assert len(partitions) == 1, "every algorithm of a seed runs on the identical partition"


def _summary(initial: float, personalized: float) -> dict:
    return {"initial_accuracy": {"mean": initial}, "personalized_accuracy": {"mean": personalized},
            "bytes_per_round_per_client": 8, "wall_time_s": 1.0, "personalization": "5 epochs",
            "personalization_unit": "epoch"}


def test_comparison_spread_over_seeds_is_the_sample_std_and_absent_for_one_seed(tmp_path):
    curve = np.array([[0.5, 0.8], [0.7, 1.0]])
    one = comparison_rows({"fedbabu": [_summary(0.6, 0.9)]}, {"fedbabu": [curve]})
    two = comparison_rows({"fedbabu": [_summary(0.6, 0.9), _summary(0.5, 0.7)]}, {"fedbabu": [curve, curve]})
    assert np.isnan(one[0]["personalized_seed_std"])
    assert two[0]["personalized_seed_std"] == pytest.approx(np.std([0.9, 0.7], ddof=1))
    assert "60.00 ± 10.00 | 90.00 ± 10.00 |" in comparison_markdown(one, "t")
    assert "60.00 ± 10.00 [7.07] | 90.00 ± 10.00 [14.14] |" in comparison_markdown(two, "t")
    write_comparison(one, {"fedbabu": [curve]}, tmp_path, "t")
    row = next(csv.DictReader((tmp_path / "comparison.csv").open()))
    assert row["personalized_seed_std"] == "" and row["personalized_mean"] == "0.900000"


# --- the baselines as the FedBABU authors' scripts run them ----------------------------------------------------


def test_baseline_defaults_are_the_authors_and_pass_the_proximal_check():
    defaults = Config()
    fedrep, perfedavg = defaults.settings_for("fedrep"), defaults.settings_for("perfedavg")
    assert (fedrep.head_epochs, fedrep.body_epochs) == (None, 1)
    assert (perfedavg.alpha, perfedavg.beta) == (None, 0.1)
    assert (defaults.settings_for("ditto").lambda_, defaults.settings_for("fedprox").mu) == (0.75, 1.0)
    assert defaults.settings_for("lg_fedavg").warm_start is None
    for name in ("ditto", "fedprox"):  # lr 0.1 and momentum 0.9: the limit is 38
        ALGORITHMS[name](Config(algorithm=name))


def test_fedrep_round_is_local_epochs_of_head_then_one_body_epoch_through_one_optimizer(digits, monkeypatch):
    """The authors' LocalUpdateFedRep: one SGD with a group per part; the head trains local_epochs epochs
    (body lr 0), then the lrs swap and the body trains one epoch. Momentum carries across the phases."""
    import fedbabu.algorithms.fedrep as fedrep

    config = tiny(algorithm="fedrep", local_epochs=3, fedrep={"head_epochs": None})
    assert config.settings_for("fedrep").body_epochs == 1
    phases = []
    original = fedrep.sgd_epochs

    def spy(model, data, parts, settings, generator, **options):
        phases.append([group["lr"] for group in options["optimizer"].param_groups] + [settings.epochs])
        return original(model, data, parts, settings, generator, **options)

    monkeypatch.setattr(fedrep, "sgd_epochs", spy)
    data = client_data(config, digits, 0)
    model = initial_model(config, digits)
    ALGORITHMS["fedrep"](config).client_update(model, data, {}, 0.05, torch.Generator().manual_seed(3))
    assert phases == [[0.0, 0.05, 3], [0.05, 0.0, 1]]
    expected = initial_model(config, digits)
    generator = torch.Generator().manual_seed(3)
    body = [p for n, p in expected.named_parameters() if n.startswith("body.")]
    head = [p for n, p in expected.named_parameters() if n.startswith("head.")]
    optimizer = torch.optim.SGD([{"params": body, "lr": 0.0}, {"params": head, "lr": 0.05}], momentum=config.momentum)
    expected.train()
    for body_lr, head_lr, epochs in ((0.0, 0.05, 3), (0.05, 0.0, 1)):  # by hand: one SGD, lrs swapped
        optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"] = body_lr, head_lr
        before = [p.detach().clone() for p in (body if body_lr == 0 else head)]
        for _ in range(epochs):
            for x, y in data.train_batches(config.batch_size, generator):
                loss = torch.nn.functional.cross_entropy(expected(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        frozen = body if body_lr == 0 else head
        assert all(torch.equal(a, b) for a, b in zip(before, frozen, strict=True)), "lr 0 leaves a part untouched"
    assert same(state_of(model, ("body", "head")), state_of(expected, ("body", "head"))), "head x3, then body x1"


def test_local_trains_every_client_every_round_whatever_the_sampling(digits):
    config = tiny(algorithm="local", client_fraction=0.2, rounds=2)
    result = run(config, digits)
    assert [m["clients"] for m in result.metrics] == [[0, 1, 2, 3, 4]] * 2
    assert sorted(result.personal) == [0, 1, 2, 3, 4]
    assert same(_trained_alone(config, digits, 4), weights(result.personal[4])), "every round, not only when sampled"


@pytest.mark.parametrize(("alpha", "inner_lr"), [(None, 0.005), (0.02, 0.02)])
def test_perfedavg_round_is_the_authors_train_loop(digits, alpha, inner_lr):
    """LocalUpdatePerFedAvg.train by hand: one momentum SGD whose lr switches between the inner step
    (alpha: the round's lr unless set) and the outer step (beta = 0.1), the weights put back before the
    outer step, and per epoch a new shuffle of floor(batches / local_epochs) + 1 iterations."""
    config = tiny(algorithm="perfedavg", local_epochs=2, perfedavg={"alpha": alpha})
    data = client_data(config, digits, 0)
    model = initial_model(config, digits)
    ALGORITHMS["perfedavg"](config).client_update(model, data, {}, 0.005, torch.Generator().manual_seed(0))
    expected = initial_model(config, digits)
    optimizer = torch.optim.SGD(expected.parameters(), lr=1.0, momentum=config.momentum)
    generator = torch.Generator().manual_seed(0)
    iterations = math.ceil(data.num_train / config.batch_size) // 2 + 1
    expected.train()
    for _ in range(2):
        stream = _shuffled_stream(data, config.batch_size, generator)
        for _ in range(iterations):
            start = [p.detach().clone() for p in expected.parameters()]
            for lr, outer in ((inner_lr, False), (0.1, True)):
                x, y = next(stream)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(expected(x), y).backward()
                if outer:
                    with torch.no_grad():
                        for p, value in zip(expected.parameters(), start, strict=True):
                            p.copy_(value)
                optimizer.step()
    assert same(state_of(model, ("body", "head")), state_of(expected, ("body", "head")))


def test_perfedavg_hf_is_refused_in_bf16():
    with pytest.raises(UserError, match=r"perfedavg\.variant: hf cannot run with precision bf16"):
        ALGORITHMS["perfedavg"](tiny(algorithm="perfedavg", perfedavg={"variant": "hf"}, precision="bf16"))
    ALGORITHMS["perfedavg"](tiny(algorithm="perfedavg", perfedavg={"variant": "fo"}, precision="bf16"))


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory, digits):
    """A finished FedAvg run of the tiny federation: what LG-FedAvg starts from."""
    folder = tmp_path_factory.mktemp("warm") / "fedavg"
    run_experiment(tiny(algorithm="fedavg", rounds=2), folder, dataset=digits)
    return folder


def test_lg_fedavg_starts_from_the_fedavg_runs_final_model(digits, fedavg_run):
    config = tiny(algorithm="lg_fedavg", lg_fedavg={"warm_start": fedavg_run})
    fedavg_model = load_tensors(fedavg_run / "model.pt")
    _, _, template, _ = preflight(config, digits)
    assert same(dict(template.named_parameters()), fedavg_model)
    untrained = run(config.model_copy(update={"rounds": 0}), digits)
    assert same(untrained.final_state, fedavg_model)
    fedavg = json.loads((fedavg_run / "summary.json").read_text())
    assert untrained.accuracy_curve()[:, 0].mean() == pytest.approx(fedavg["initial_accuracy"]["mean"])
    trained = run(config.model_copy(update={"rounds": 1}), digits)
    plain = run(tiny(algorithm="lg_fedavg", rounds=1), digits)
    assert not same(trained.personal[0], plain.personal[0]), "the bodies start from FedAvg's, not the seed"


def _edited_copy(source, target, **changes):
    import shutil

    shutil.copytree(source, target)
    values = yaml.safe_load((target / "config.yaml").read_text())
    (target / "config.yaml").write_text(yaml.safe_dump({**values, **changes}))
    return target


@pytest.mark.parametrize(("case", "overrides", "message"), [
    ("missing", {}, "is not a run folder"),
    ("unfinished", {}, "is not a finished run (no summary.json)"),
    ("fedbabu", {}, "is a fedbabu run; expected a fedavg run"),
    ("update_part", {}, "is a fedavg (update_part=body) run"),
    ("model", {}, "trained model '4convnet', this run builds 'digitcnn'"),
    ("seed", {"seed": 1}, "ran with seed=0, this run has 1"),
    ("clients", {"num_clients": 10}, "ran with num_clients=5, this run has 10"),
    ("shards", {"shards_per_client": 4}, "ran with shards_per_client=2, this run has 4"),
])
def test_lg_fedavg_refuses_a_warm_start_that_cannot_serve(tmp_path, digits, fedavg_run, case, overrides, message):
    source = tmp_path / case
    if case == "unfinished":
        _edited_copy(fedavg_run, source)
        (source / "summary.json").unlink()
    elif case in ("fedbabu", "model", "update_part"):
        changes = {"fedbabu": {"algorithm": "fedbabu"}, "model": {"model": "4convnet"},
                   "update_part": {"fedavg": {"update_part": "body"}}}[case]
        _edited_copy(fedavg_run, source, **changes)
    elif case != "missing":
        source = fedavg_run
    config = tiny(algorithm="lg_fedavg", lg_fedavg={"warm_start": source}, **overrides)
    with pytest.raises(UserError, match=re.escape(message)) as refused:
        run_experiment(config, tmp_path / "lg", dataset=digits)
    assert str(refused.value).startswith("lg_fedavg.warm_start: ") and "\n" not in str(refused.value)
    assert not (tmp_path / "lg").exists(), "refused before the run folder is made"


def test_compare_starts_lg_fedavg_from_its_own_fedavg_run_or_a_fedavg_phase(tmp_path, digits):
    config = tiny(rounds=2)
    both = run_comparison(config, ["lg_fedavg", "fedavg"], tmp_path / "both", dataset=digits)
    saved = yaml.safe_load((tmp_path / "both" / "lg_fedavg" / "config.yaml").read_text())
    assert saved["lg_fedavg"]["warm_start"] == str(tmp_path / "both" / "fedavg")
    assert not (tmp_path / "both" / "fedavg-phase").exists(), "the comparison's FedAvg run is reused"
    assert [r["algorithm"] for r in both.rows] == ["lg_fedavg", "fedavg"]
    alone = run_comparison(config, ["fedbabu", "lg_fedavg:lr=0.01:rounds=1"], tmp_path / "alone", seeds=[0, 1],
                           dataset=digits)
    for seed in (0, 1):
        phase = tmp_path / "alone" / "fedavg-phase" / f"seed-{seed}"
        phase_config = yaml.safe_load((phase / "config.yaml").read_text())
        assert (phase_config["algorithm"], phase_config["rounds"], phase_config["lr"], phase_config["seed"]) == \
            ("fedavg", 2, config.lr, seed), "FedAvg's own budget"
        lg = yaml.safe_load((tmp_path / "alone" / "lg_fedavg_lr-0.01_rounds-1" / f"seed-{seed}" / "config.yaml")
                            .read_text())
        assert (lg["lg_fedavg"]["warm_start"], lg["rounds"], lg["lr"]) == (str(phase), 1, 0.01)
    assert [r["algorithm"] for r in alone.rows] == ["fedbabu", "lg_fedavg:lr=0.01:rounds=1"]
    assert [r["seeds"] for r in alone.rows] == [2, 2], "each row pools its algorithm's two seeds"
    seed_means = [json.loads((tmp_path / "alone" / "fedbabu" / f"seed-{seed}" / "summary.json").read_text())
                  ["personalized_accuracy"]["mean"] for seed in (0, 1)]
    assert alone.rows[0]["personalized_seed_std"] == pytest.approx(float(np.std(seed_means, ddof=1)))


def test_compare_refuses_a_named_warm_start_of_another_seed_before_any_run(tmp_path, digits, fedavg_run):
    with pytest.raises(UserError, match=r"lg_fedavg\.warm_start: .* ran with seed=0, this run has 1"):
        run_comparison(tiny(), ["fedavg", f"lg_fedavg:warm_start={fedavg_run}"], tmp_path / "cmp", seeds=[0, 1],
                       dataset=digits)
    assert not (tmp_path / "cmp").exists()


def test_never_sampled_clients_are_counted_in_the_summary_and_the_report(tmp_path, digits):
    experiment = run_experiment(tiny(algorithm="fedper", client_fraction=0.2, rounds=2), tmp_path / "fedper",
                                dataset=digits)
    taking_part = {c for m in experiment.result.metrics for c in m["clients"]}
    summary = json.loads((tmp_path / "fedper" / "summary.json").read_text())
    assert summary["never_sampled_clients"] == 5 - len(taking_part) >= 3
    assert sorted(experiment.result.personal) == sorted(taking_part), "only sampled clients have own heads"
    report = (tmp_path / "fedper" / "report.md").read_text()
    assert f"{5 - len(taking_part)} of 5 clients were never sampled for a training round: each keeps the head" \
        in report
    local = run_experiment(tiny(algorithm="local", client_fraction=0.2, rounds=1), tmp_path / "local", dataset=digits)
    assert local.summary["never_sampled_clients"] == 0
    assert "never sampled" not in (tmp_path / "local" / "report.md").read_text()
