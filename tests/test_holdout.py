"""Clients the federation never saw (``holdout_clients``): never trained, personalized like the others, and
reported apart as seen and unseen clients with the participation gap between them."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import StopAtRound, client_data, run
from contract_support import assert_same_run, config_for, records

import fedbabu
from fedbabu.algorithms import ALGORITHMS
from fedbabu.cli import main
from fedbabu.config import load_config
from fedbabu.engine.contract import evaluate_client
from fedbabu.engine.round import held_out_clients, held_out_of, participating_clients, plan_round, sample_clients
from fedbabu.engine.simulation import network
from fedbabu.files import load_tensors
from fedbabu.models import in_parts, norm_parameters
from fedbabu.results.report import comparison_markdown, comparison_rows
from fedbabu.runner import resume_experiment, run_experiment
from fedbabu.training import load_state

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = ["num_clients=20", "holdout_clients=10", "algorithm=fedper", "rounds=3", "client_fraction=0.5",
            "local_epochs=1", "eval_every=2", "checkpoint_every=1", "finetune.epochs=1"]
"""What ``--set`` gives the run every test here reads: 20 digits clients, 10 of them held out."""


def settings(*more: str):
    return load_config(None, [*SETTINGS, *more])


def read_rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "clients.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def held_out_run(tmp_path_factory):
    """The run with ``--set holdout_clients=10``, through the CLI, on one worker."""
    folder = tmp_path_factory.mktemp("holdout") / "run"
    sets = [arg for pair in SETTINGS for arg in ("--set", pair)]
    assert main(["run", *sets, "--workers", "1", "--out", str(folder), "--quiet"]) == 0
    return folder


def unseen_of(config) -> list[int]:
    return held_out_of(config, config.num_clients)


# --- sampling ----------------------------------------------------------------------------------------------


def test_without_a_holdout_the_samples_are_those_of_earlier_builds():
    """Hard-coded from the sampler before held-out clients existed: a run without them trains the same clients."""
    expected = {(0, 0, 10, 0.5): [0, 1, 5, 8, 9], (0, 1, 10, 0.5): [0, 1, 2, 4, 8],
                (3, 2, 20, 0.5): [1, 2, 4, 5, 8, 10, 11, 12, 16, 18],
                (0, 5, 100, 0.1): [1, 20, 22, 57, 59, 69, 71, 77, 78, 99]}
    for (seed, round_index, num_clients, fraction), clients in expected.items():
        assert sample_clients(seed, round_index, num_clients, fraction) == clients
        assert sample_clients(seed, round_index, num_clients, fraction, held_out=()) == clients
        config = load_config(None, [f"seed={seed}", f"num_clients={num_clients}", f"client_fraction={fraction}"])
        plan = plan_round(config, ALGORITHMS["fedavg"](config), round_index, num_clients)
        assert list(plan.sampled) == clients


def test_held_out_clients_are_seeded_nested_and_never_sampled():
    unseen = held_out_clients(0, 20, 10)
    assert unseen == held_out_clients(0, 20, 10) and len(set(unseen)) == 10
    assert unseen != held_out_clients(1, 20, 10)
    assert set(held_out_clients(0, 20, 3)) < set(unseen), "a smaller holdout lies inside a larger one"
    assert held_out_clients(0, 20, 0) == []
    assert participating_clients(20, unseen) == sorted(set(range(20)) - set(unseen))
    for round_index in range(50):
        sample = sample_clients(0, round_index, 20, 0.3, unseen)
        assert not set(sample) & set(unseen)
        assert len(sample) == max(1, math.floor(0.3 * 10)), "the fraction is of the participating clients"
    config = settings()
    assert config.resolved_holdout() == 10 and unseen_of(config) == unseen
    assert load_config(None, ["num_clients=20", "holdout_clients=0.25"]).resolved_holdout() == 5
    assert load_config(None, ["num_clients=20", "holdout_clients=0.01"]).resolved_holdout() == 1


def test_every_client_but_the_held_out_trains_in_local_training():
    config = settings("algorithm=local")
    participating = participating_clients(20, unseen_of(config))
    for round_index in range(3):
        assert list(plan_round(config, ALGORITHMS["local"](config), round_index, 20).sampled) == participating


# --- the run's files ---------------------------------------------------------------------------------------


def test_a_held_out_client_never_trains_and_the_files_say_which_clients_were_unseen(held_out_run):
    config = settings()
    unseen = unseen_of(config)
    trained = [set(r["clients"]) for r in records(held_out_run)]
    assert len(trained) == 3 and all(clients and not clients & set(unseen) for clients in trained)
    assert all(len(clients) == 5 for clients in trained), "f = 0.5 of the 10 participating clients"
    rows = read_rows(held_out_run)
    assert list(rows[0])[:6] == ["client", "train_size", "test_size", "classes", "group", "initial_accuracy"]
    assert [int(r["client"]) for r in rows if r["group"] == "unseen"] == unseen
    assert sum(r["group"] == "seen" for r in rows) == 10
    summary = json.loads((held_out_run / "summary.json").read_text())
    assert summary["holdout_clients"] == 10 and summary["never_sampled_clients"] <= 10
    final = {int(r["client"]): float(r["accuracy_after_epoch_1"]) for r in rows}
    first = {int(r["client"]): float(r["initial_accuracy"]) for r in rows}
    for group, members in (("seen", [c for c in final if c not in unseen]), ("unseen", unseen)):
        assert summary[group]["clients"] == 10
        assert summary[group]["personalized_accuracy"]["mean"] == pytest.approx(
            np.mean([final[c] for c in members]), abs=1e-6)
        assert summary[group]["initial_accuracy"]["mean"] == pytest.approx(
            np.mean([first[c] for c in members]), abs=1e-6)
    seen_values = np.array([final[c] for c in final if c not in unseen])
    unseen_values = np.array([final[c] for c in unseen])
    gap = summary["participation_gap"]
    assert gap["mean"] == pytest.approx(seen_values.mean() - unseen_values.mean(), abs=1e-6)
    assert gap["standard_error"] == pytest.approx(
        math.sqrt(seen_values.var(ddof=1) / 10 + unseen_values.var(ddof=1) / 10), abs=1e-6)
    report = (held_out_run / "report.md").read_text()
    assert "10 of 20 clients were held out" in report and "Participation gap" in report


def test_without_a_holdout_a_run_is_the_run_without_the_key(digits, tmp_path):
    without = tmp_path / "without"
    run_experiment(config_for("fedper", workers=1), without, dataset=digits)
    zero = tmp_path / "zero"
    run_experiment(config_for("fedper", workers=1, holdout_clients=0), zero, dataset=digits)
    assert_same_run(without, zero)
    assert (without / "clients.csv").read_bytes() == (zero / "clients.csv").read_bytes()
    assert "group" not in read_rows(zero)[0]
    summary = json.loads((zero / "summary.json").read_text())
    assert not {"holdout_clients", "seen", "unseen", "participation_gap"} & set(summary)
    assert "held out" not in (zero / "report.md").read_text()


def test_two_workers_and_a_resume_give_the_one_worker_runs_bytes(held_out_run, digits, tmp_path):
    two = tmp_path / "two"
    run_experiment(settings("workers=2"), two, dataset=digits)
    assert_same_run(held_out_run, two)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(settings("workers=1"), interrupted, StopAtRound(2), dataset=digits)
    resume_experiment(interrupted)
    assert_same_run(held_out_run, interrupted)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_starts_an_unseen_client_from_the_global_model_without_personal_state(algorithm, digits):
    """The start docs/new-clients.md states: no personal state, so the final global model with the parts no
    algorithm shares at their initial values (FedPer's head, LG-FedAvg's body, Ditto's and local's whole model)."""
    config = config_for(algorithm, workers=1, holdout_clients=3)
    result = run(config, digits)
    unseen = unseen_of(config)
    assert not {c for m in result.metrics for c in m["clients"]} & set(unseen)
    assert not set(result.personal) & set(unseen)
    shared = ALGORITHMS[algorithm](config).shared_parts
    model = network(config, digits)
    norms = norm_parameters(model)
    for name, tensor in model.named_parameters():
        if not in_parts(name, shared, norms):
            assert torch.equal(result.final_state[name], tensor), name
    load_state(model, result.final_state)
    curves = {c["client"]: c["accuracies"] for c in result.clients}
    for client in unseen:
        assert curves[client][0] == pytest.approx(evaluate_client(model, client_data(config, digits, client), {}),
                                                  abs=1e-6)


# --- personalize, analyze, the CLI -------------------------------------------------------------------------


def test_personalize_and_analyze_select_a_group(held_out_run, tmp_path, capsys):
    unseen = unseen_of(settings())
    out = tmp_path / "unseen"
    assert main(["personalize", str(held_out_run), "--clients", "unseen", "--workers", "1", "--out", str(out),
                 "--quiet"]) == 0
    rows = read_rows(out)
    assert [int(r["client"]) for r in rows] == unseen and {r["group"] for r in rows} == {"unseen"}
    original = {r["client"]: r for r in read_rows(held_out_run)}
    assert rows == [original[r["client"]] for r in rows], "the run's own curves, bit for bit"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["client_group"] == "unseen" and summary["seen"]["clients"] == 0
    analysis = fedbabu.analyze(held_out_run, out=tmp_path / "analysis", workers=1, progress=False,
                               clients="seen").runs[0]
    assert [r["client"] for r in analysis["per_client"]] == sorted(set(range(20)) - set(unseen))
    assert analysis["client_group"] == "seen" and analysis["reproduces_run"]["identical_clients"] == 10
    page = (tmp_path / "analysis" / "analysis.md").read_text()
    assert "of which the 10 seen ones (those the federation could train; `--clients seen`) are analyzed" in page
    assert "personalize_clients" not in page and "| linear probe on the analyzed clients (test) |" in page


def test_unseen_clients_of_a_run_without_a_holdout_are_refused(digits, tmp_path, capsys):
    folder = tmp_path / "plain"
    run_experiment(config_for("fedavg", workers=1), folder, dataset=digits)
    capsys.readouterr()
    assert main(["personalize", str(folder), "--clients", "unseen", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --clients unseen: the run held out no clients") and error.count("\n") == 1
    assert not (folder / "personalize").exists()


@pytest.mark.parametrize(("value", "fragment"), [
    ("20", "holdout_clients=20 holds out 20 of num_clients=20, leaving no client to train"),
    ("0.99", "holdout_clients=0.99 holds out 20 of num_clients=20"),
    ("-1", "holdout_clients: expected a number of clients >= 0 or a fraction of num_clients in (0, 1)"),
    ("1.5", "holdout_clients: expected a number of clients >= 0"),
    ("0.0", "holdout_clients: expected a number of clients >= 0"),
    ("some", "holdout_clients: expected a number of clients >= 0"),
])
def test_a_holdout_that_cannot_work_is_refused_in_one_line(value, fragment, tmp_path, capsys):
    code = main(["run", "--set", "num_clients=20", "--set", f"holdout_clients={value}", "--out",
                 str(tmp_path / "run"), "--quiet"])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("error: ") and error.count("\n") == 1, error
    assert fragment in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_under_dp_the_accountant_counts_only_the_clients_that_may_train(sampling, digits, tmp_path):
    from fedbabu.engine import privacy

    dp = [f"dp.sampling={sampling}", "dp.noise_multiplier=1", "dp.clipping_norm=1", "algorithm=fedbabu"]
    config = settings(*dp)
    alone = load_config(None, [*SETTINGS, *dp, "num_clients=10", "holdout_clients=0"])
    assert privacy.population(config) == 10 and privacy.expected_clients(config) == 5
    assert config.resolved_delta() == 1 / 10**1.1
    assert privacy.epsilon(config, 3) == privacy.epsilon(alone, 3), "as a federation of its 10 training clients"
    run_experiment(config, tmp_path / "run", dataset=digits)
    trained = {c for record in records(tmp_path / "run") for c in record["clients"]}
    assert trained and not trained & set(unseen_of(config))


def test_the_report_table_gives_the_gap_of_a_run_that_held_clients_out(held_out_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(held_out_run, copy)
    assert main(["report", str(copy), "--out", str(tmp_path / "runs.md")]) == 0
    gap = json.loads((copy / "summary.json").read_text())["participation_gap"]
    table = (tmp_path / "runs.md").read_text()
    assert "| gap |" in table and f"{100 * gap['mean']:+.2f} ± {100 * gap['standard_error']:.2f} |" in table


# --- comparison table and TensorBoard ----------------------------------------------------------------------


def test_the_comparison_and_tensorboard_give_both_groups_and_the_gap(held_out_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedbabu.results.live import TensorBoardObserver

    summary = json.loads((held_out_run / "summary.json").read_text())
    curves = np.array([[float(r["initial_accuracy"]), float(r["accuracy_after_epoch_1"])]
                       for r in read_rows(held_out_run)])
    row = comparison_rows({"fedper": [summary, summary]}, {"fedper": [curves, curves]})[0]
    gap = summary["participation_gap"]
    assert row["participation_gap"] == pytest.approx(gap["mean"], abs=1e-9)
    assert row["unseen_personalized_mean"] == pytest.approx(summary["unseen"]["personalized_accuracy"]["mean"])
    # two identical seeds: twice the clients, each group's variance a little smaller (n - 1 over 2n - 1)
    assert row["participation_gap_standard_error"] < gap["standard_error"]
    table = comparison_markdown([row], "t")
    assert "| seen | unseen | gap |" in table and f"{100 * gap['mean']:+.2f}" in table
    TensorBoardObserver(tmp_path).on_finish(summary)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalar = events.Scalars("holdout/participation_gap")
    assert [(e.step, round(e.value, 5)) for e in scalar] == [(3, round(gap["mean"], 5))]
    assert "holdout/unseen_initial_accuracy" in events.Tags()["scalars"]


# --- Flower ------------------------------------------------------------------------------------------------


@pytest.mark.flower
@pytest.mark.parametrize("algorithm", ["fedper", "local"])
def test_flower_never_trains_a_held_out_client_and_equals_the_simulator(algorithm, tmp_path):
    from flower_support import read_records, small_config
    from test_flower import LoopbackGrid, assert_same_records

    from fedbabu.flower.server import run_on_grid

    config = small_config(f"algorithm={algorithm}", "holdout_clients=1", "eval_every=1", "finetune.epochs=1")
    (unseen,) = unseen_of(config)
    grid = LoopbackGrid(3)
    summary = run_on_grid(grid, config, tmp_path / "flower", min_nodes=3, timeout=60)
    reference = run_experiment(config.model_copy(update={"workers": 1}), tmp_path / "simulator")
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    nodes = {node: int(context.node_config["partition-id"]) for node, context in grid.contexts.items()}
    assert train and all(nodes[m.metadata.dst_node_id] != unseen for m in train)
    assert any(nodes[m.metadata.dst_node_id] == unseen for m in grid.sent if m.metadata.message_type != "train")
    state = load_tensors(tmp_path / "flower" / "model.pt")
    for name, tensor in reference.result.final_state.items():
        assert torch.equal(state[name], tensor), name
    assert_same_records(read_records(tmp_path / "flower"), reference.result.metrics)
    flower_rows, simulator_rows = read_rows(tmp_path / "flower"), read_rows(tmp_path / "simulator")
    assert [r["group"] for r in flower_rows] == [r["group"] for r in simulator_rows]
    for ours, theirs in zip(flower_rows, simulator_rows, strict=True):
        assert [float(v) for k, v in ours.items() if "accuracy" in k] == pytest.approx(
            [float(v) for k, v in theirs.items() if "accuracy" in k], abs=1e-6)
    assert summary["participation_gap"]["mean"] == pytest.approx(
        reference.summary["participation_gap"]["mean"], abs=1e-6)
