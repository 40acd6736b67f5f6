"""Large federations: the global model evaluated on, and the final model personalized by, a seeded sample."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import small_config

import fedbabu
from fedbabu.analysis import analyze
from fedbabu.cli import main
from fedbabu.config import load_config
from fedbabu.engine.simulation import seeded_clients
from fedbabu.errors import UserError
from fedbabu.personalization import personalize_run
from fedbabu.runner import run_experiment


def _rows(folder: Path) -> dict[int, list[str]]:
    with (folder / "clients.csv").open(newline="") as handle:
        return {int(row["client"]): list(row.values()) for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """FedPer (personal heads) on 10 clients: every client, and samples of 3 evaluated and 4 personalized."""
    root = tmp_path_factory.mktemp("samples")
    folders = {"all": root / "all", "sampled": root / "sampled"}
    run_experiment(small_config(algorithm="fedper", rounds=4, eval_every=2), folders["all"])
    run_experiment(small_config(algorithm="fedper", rounds=4, eval_every=2, eval_clients=3, personalize_clients=4),
                   folders["sampled"])
    return folders


def test_a_sample_is_seeded_sorted_and_the_smaller_lies_inside_the_larger():
    assert seeded_clients(0, 10, "all") == seeded_clients(0, 10, 10) == seeded_clients(0, 10, 50) == list(range(10))
    small, large = seeded_clients(3, 1000, 20), seeded_clients(3, 1000, 200)
    assert small == seeded_clients(3, 1000, 20) and small == sorted(set(small)) and len(small) == 20
    assert set(small) <= set(large) and len(large) == 200
    assert seeded_clients(4, 1000, 20) != small


@pytest.mark.parametrize("key", ["eval_clients", "personalize_clients"])
@pytest.mark.parametrize("value", ["0", "-3", "some", "2.5", "true"])
def test_a_sample_size_that_is_not_all_or_a_count_is_refused_naming_the_key(key, value):
    with pytest.raises(UserError, match=rf"^config \(with --set\): {key}: expected 'all' or an integer >= 1") as err:
        load_config(None, [f"{key}={value}"])
    assert "\n" not in str(err.value)


def test_a_misspelt_key_gets_a_suggestion():
    with pytest.raises(UserError, match="did you mean 'personalize_clients'"):
        load_config(None, ["personalise_clients=5"])


def test_the_sampled_run_personalizes_and_reports_only_its_sample(runs):
    full, sampled = _rows(runs["all"]), _rows(runs["sampled"])
    chosen = seeded_clients(0, 10, 4)
    assert sorted(sampled) == chosen and len(full) == 10
    assert all(sampled[c] == full[c] for c in chosen)  # the same training, the same personalization per client
    summary = json.loads((runs["sampled"] / "summary.json").read_text())
    assert summary["personalized_clients"] == 4 and summary["evaluated_clients"] == 3
    initial = [float(full[c][4]) for c in chosen]
    assert summary["initial_accuracy"]["mean"] == pytest.approx(np.mean(initial), abs=1e-6)
    report = (runs["sampled"] / "report.md").read_text()
    assert "This run personalized 4 of 10 clients (seeded sample" in report
    assert "tested during training on 3 of 10 clients (seeded sample" in report
    assert "seeded sample" not in (runs["all"] / "report.md").read_text()
    assert json.loads((runs["all"] / "summary.json").read_text())["personalized_clients"] == 10


def test_evaluation_during_training_covers_the_sample_only(runs):
    records = [json.loads(line) for line in (runs["sampled"] / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (runs["all"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in records] == [r["train_loss"] for r in reference]
    full = _rows(runs["all"])
    evaluated = seeded_clients(0, 10, 3)
    # the last round's test is the global model (with each client's personal head) on the 3 evaluated clients
    assert records[-1]["test_accuracy"] == pytest.approx(np.mean([float(full[c][4]) for c in evaluated]), abs=1e-6)
    assert reference[-1]["test_accuracy"] == pytest.approx(np.mean([float(v[4]) for v in full.values()]), abs=1e-6)
    assert records[-1]["test_accuracy"] != pytest.approx(reference[-1]["test_accuracy"], abs=1e-6)


def test_personalizing_again_and_analyzing_work_on_the_runs_own_sample(runs, tmp_path):
    experiment, _ = personalize_run(runs["sampled"], {"workers": 2}, out=tmp_path / "again")
    assert (tmp_path / "again" / "clients.csv").read_bytes() == (runs["sampled"] / "clients.csv").read_bytes()
    assert experiment.summary["personalized_clients"] == 4
    analysis = analyze([runs["sampled"]], out=tmp_path / "inside", probe_size=50, pairs=3).runs[0]
    assert analysis["analyzed_clients"] == 4 and analysis["clients"] == 10
    assert [row["client"] for row in analysis["per_client"]] == seeded_clients(0, 10, 4)
    assert analysis["reproduces_run"] == {"checked": True, "identical_clients": 4, "clients": 4}
    assert set(analysis["cka"]["between_clients"]["clients"]) <= set(seeded_clients(0, 10, 4))
    assert "of which the 4 the run personalized" in (tmp_path / "inside" / "analysis.md").read_text()


def test_the_api_reports_the_sample_and_builds_any_clients_model(tmp_path):
    results = fedbabu.run(small_config(rounds=1, personalize_clients=2, finetune={"epochs": 1}), progress=False)
    assert len(results.clients) == 2 and "2 of 10 clients" in repr(results)
    unsampled = next(c for c in range(10) if c not in seeded_clients(0, 10, 2))
    assert results.client_model(unsampled) is not None
    with pytest.raises(UserError, match=r"0\.\.9"):
        results.client_model(10)


def test_the_cli_run_accepts_both_keys(tmp_path, capsys):
    assert main(["run", "--quiet", "--out", str(tmp_path / "run"), "--set", "rounds=1", "--set", "num_clients=5",
                 "--set", "eval_clients=2", "--set", "personalize_clients=3", "--set", "finetune.epochs=1"]) == 0
    assert len(_rows(tmp_path / "run")) == 3
