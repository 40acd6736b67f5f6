"""`fedbabu personalize`: a finished run personalized again, without training, on real digits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import fingerprint, small_config

import fedbabu
from fedbabu.cli import main
from fedbabu.errors import UserError
from fedbabu.reproduce import personalize_preset, run_preset
from fedbabu.runner import run_experiment


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Two finished runs: FedBABU (no personal state) on two workers, FedPer (personal heads)."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for algorithm, workers in (("fedbabu", 2), ("fedper", 1)):
        runs[algorithm] = root / algorithm
        run_experiment(small_config(algorithm=algorithm, workers=workers, rounds=4), runs[algorithm])
    return runs


@pytest.mark.parametrize("algorithm", ["fedbabu", "fedper"])
def test_with_the_runs_own_settings_the_result_is_the_runs_bit_for_bit(trained, tmp_path, algorithm):
    run = tmp_path / "run"
    shutil.copytree(trained[algorithm], run)
    before = fingerprint(run)
    assert main(["personalize", str(run), "--quiet", "--workers", "1" if algorithm == "fedbabu" else "2"]) == 0
    again = run / "personalize" / "full-2ep-lr0.01-mom0.9-wd0-bs10"
    assert (again / "clients.csv").read_bytes() == (run / "clients.csv").read_bytes()
    assert sorted(p.name for p in again.iterdir()) == ["clients.csv", "clients.png", "config.yaml", "finetune.png",
                                                       "report.md", "summary.json"]
    summary = json.loads((again / "summary.json").read_text())
    original = json.loads((run / "summary.json").read_text())
    assert summary["personalized_accuracy"] == original["personalized_accuracy"]
    assert summary["personalized_from"] == str(run)
    assert "Personalized again from the trained run" in (again / "report.md").read_text()
    after = fingerprint(run)
    assert {k: v for k, v in after.items() if not k.startswith("personalize/")} == before


def test_other_fine_tuning_settings_change_only_the_fine_tuning(trained, tmp_path):
    out = tmp_path / "head"
    results = fedbabu.personalize(trained["fedbabu"], finetune={"part": "head", "epochs": 3, "lr": 0.05}, out=out,
                                  progress=False)
    curve = results.accuracy_curve()
    original = np.loadtxt(trained["fedbabu"] / "clients.csv", delimiter=",", skiprows=1)[:, 4:]
    assert curve.shape == (10, 4)
    np.testing.assert_allclose(curve[:, 0], original[:, 0], atol=1e-6)  # the same trained model (csv: 6 decimals)
    assert not np.array_equal(curve[:, 1:3], original[:, 1:3])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["finetune"] == {"part": "head", "epochs": 3, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0,
                                 "batch_size": 10}
    assert results.folder == out and results.config.rounds == 4


def test_keys_that_shaped_the_training_are_refused_with_one_line(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained["fedbabu"], run)
    before = fingerprint(run)
    for argv, message in (
        (["--set", "lr=0.3"], "error: --set lr: only finetune.*, eval_batch_size, workers and device may differ from "
                              "the trained run"),
        (["--set", "finetune.epochs=-1"], "finetune.epochs"),
        (["--out", str(run)], "is the run folder itself"),
    ):
        assert main(["personalize", str(run), "--quiet", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert fingerprint(run) == before
    (run / "summary.json").unlink()
    assert main(["personalize", str(run), "--quiet"]) == 2
    assert "the run has not finished (no summary.json); finish it with fedbabu resume" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"^finetune: expected a dict"):
        fedbabu.personalize(trained["fedbabu"], finetune=5)


def test_a_stateful_run_without_its_checkpoint_is_refused(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained["fedper"], run)
    (run / "checkpoint.pt").unlink()
    assert main(["personalize", str(run), "--quiet"]) == 2
    assert "no checkpoint.pt; fedper keeps per-client parts that only the final checkpoint holds" in \
        capsys.readouterr().err
    stateless = tmp_path / "stateless"
    shutil.copytree(trained["fedbabu"], stateless)
    for name in ("checkpoint.pt", "partition.json", "metrics.jsonl"):  # config, summary and model are enough
        (stateless / name).unlink()
    assert main(["personalize", str(stateless), "--quiet"]) == 0
    again = stateless / "personalize" / "full-2ep-lr0.01-mom0.9-wd0-bs10"
    assert (again / "clients.csv").read_bytes() == (stateless / "clients.csv").read_bytes()
    summary = json.loads((stateless / "summary.json").read_text())
    (stateless / "summary.json").write_text(json.dumps({**summary, "partition": "another partition"}))
    assert main(["personalize", str(stateless), "--quiet", "--out", str(tmp_path / "x")]) == 2
    assert "the partition drawn again from the config differs" in capsys.readouterr().err


def _preset(tmp_path: Path, monkeypatch) -> None:
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "pair.yaml").write_text(
        "title: pair\nalgorithms: [fedavg, fedbabu]\nseeds: [0]\n"
        "base: {dataset: digits, model: digitcnn, num_clients: 10, partition: shards, shards_per_client: 2,\n"
        "       client_fraction: 0.5, rounds: 2, batch_size: 10, eval_every: 0, workers: 1,\n"
        "       finetune: {epochs: 2}}\n")
    monkeypatch.setattr("fedbabu.reproduce.PRESET_DIR", presets)


def test_reproduce_personalize_only_redoes_every_finished_run_and_the_table(tmp_path, monkeypatch):
    _preset(tmp_path, monkeypatch)
    out = tmp_path / "out"
    run_preset("pair", out, log=lambda line: None)
    unfinished = out / "default" / "fedbabu" / "seed-0"
    (unfinished / "summary.json").unlink()
    lines: list[str] = []
    outcomes = personalize_preset("pair", out, settings={"finetune": {"epochs": 3}}, log=lines.append)
    assert lines == ["[1/1] default fedavg seed 0: personalizing again",
                     f"[1/1] default fedbabu seed 0: not finished, skipped ({unfinished})"]
    again = out / "default" / "fedavg" / "seed-0" / "personalize" / "full-3ep-lr0.001-mom0.9-wd0-bs50"
    summary = json.loads((again / "summary.json").read_text())
    assert outcomes[0].summaries == [summary] and len(summary["finetune_curve"]) == 4
    row = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith("| default"))
    assert f"{100 * summary['personalized_accuracy']['mean']:.2f}" in row and "not run" in row
    lines.clear()
    personalize_preset("pair", out, settings={"finetune": {"epochs": 3}}, log=lines.append)
    assert lines[0] == "[1/1] default fedavg seed 0: already personalized with these settings, skipped"
    lines.clear()  # an evaluation key reaches the personalization; a runtime key does not make it stale
    personalize_preset("pair", out, log=lines.append,
                       settings={"finetune": {"epochs": 3}, "eval_batch_size": 7, "personal_memory": "1GiB"})
    assert lines[0] == "[1/1] default fedavg seed 0: personalizing again"
    assert yaml.safe_load((again / "config.yaml").read_text())["eval_batch_size"] == 7
    lines.clear()
    personalize_preset("pair", out, settings={"finetune": {"epochs": 3}, "eval_batch_size": 7}, log=lines.append)
    assert lines[0] == "[1/1] default fedavg seed 0: already personalized with these settings, skipped"
    with pytest.raises(UserError, match=r"only finetune\.\*, eval_batch_size, workers and device may differ"):
        personalize_preset("pair", out, settings={"rounds": 5}, log=lambda line: None)


def test_personalize_only_switches_each_algorithms_evaluation_on_its_own_runs(tmp_path, monkeypatch):
    """One trained preset, a second evaluation: each algorithm's section reaches only its own runs."""
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "family.yaml").write_text(
        "title: family\nalgorithms: [fedavg, feduh]\nseeds: [0]\n"
        "base: {dataset: digits, model: digitcnn, num_clients: 10, partition: shards, shards_per_client: 2,\n"
        "       client_fraction: 0.5, rounds: 2, batch_size: 10, eval_every: 0, workers: 1,\n"
        "       finetune: {epochs: 2}}\n")
    monkeypatch.setattr("fedbabu.reproduce.PRESET_DIR", presets)
    out = tmp_path / "out"
    run_preset("family", out, log=lambda line: None)
    feduh = out / "default" / "feduh" / "seed-0"
    own = json.loads((feduh / "summary.json").read_text())
    personalize_preset("family", out, settings={"feduh": {"evaluation": "common"}}, log=lambda line: None)
    assert [p.name for p in (out / "default" / "fedavg" / "seed-0" / "personalize").iterdir()] == \
        ["full-2ep-lr0.001-mom0.9-wd0-bs50"], "FedAvg's runs see no FedUH setting"
    common = json.loads((feduh / "personalize" / "full-2ep-lr0.001-mom0.9-wd0-bs50-evaluation-common" /
                         "summary.json").read_text())
    assert own["personalization"].startswith("feduh's own") and common["personalization"].startswith("common")
    assert common["initial_accuracy"] == own["initial_accuracy"], "the same trained federation"
    assert len(common["finetune_curve"]) == 3 and len(own["finetune_curve"]) == 2
    with pytest.raises(UserError, match=r"feduh\.scale: only finetune\.\*, feduh\.evaluation"):
        personalize_preset("family", out, settings={"feduh": {"scale": 2.0}}, log=lambda line: None)


def test_a_run_made_under_older_defaults_and_protocol_is_personalized_not_retrained(tmp_path, monkeypatch):
    """A finished run whose config differs only in evaluation keys or other algorithms' defaults, and whose
    summary predates the current personalization protocol, is reused: its clients are personalized again,
    nothing is trained again."""
    _preset(tmp_path, monkeypatch)
    out = tmp_path / "out"
    run_preset("pair", out, log=lambda line: None)
    run = out / "default" / "fedavg" / "seed-0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "eval_batch_size": 1000, "ditto": {"lambda": 0.1}}))
    summary = json.loads((run / "summary.json").read_text())
    del summary["personalization_protocol"]
    (run / "summary.json").write_text(json.dumps(summary))
    model = (run / "model.pt").read_bytes()
    lines: list[str] = []
    outcomes = run_preset("pair", out, log=lines.append)
    assert lines[0] == "[1/1] default fedavg seed 0: already complete, skipped"
    assert lines[1].startswith("[1/1] default fedavg seed 0: personalizing again (made under an older")
    assert (run / "model.pt").read_bytes() == model
    again = run / "personalize" / "full-2ep-lr0.001-mom0.9-wd0-bs50"
    assert outcomes[0].summaries == [json.loads((again / "summary.json").read_text())]
    lines.clear()
    run_preset("pair", out, log=lines.append)
    assert lines == ["[1/1] default fedavg seed 0: already complete, skipped",
                     "[1/1] default fedbabu seed 0: already complete, skipped"]
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "lr": 0.2}))  # trained otherwise: run again
    lines.clear()
    run_preset("pair", out, log=lines.append)
    assert lines[0] == "[1/1] default fedavg seed 0: running"


def test_a_run_of_another_training_version_is_personalized_and_says_so(trained, tmp_path, monkeypatch, capsys):
    """Personalizing re-evaluates what was trained, so an older build's run is still personalized (the kept
    runs of the results pages are), with one line naming both versions."""
    from fedbabu.algorithms import ALGORITHMS

    run = tmp_path / "run"
    shutil.copytree(trained["fedbabu"], run)
    monkeypatch.setattr(ALGORITHMS["fedbabu"], "training_version", 2)
    assert main(["personalize", str(run), "--quiet", "--workers", "1"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "training version" in line]
    assert len(warned) == 1 and "trained by fedbabu training version 1, and this build trains version 2" in warned[0]
    again = run / "personalize" / "full-2ep-lr0.01-mom0.9-wd0-bs10"
    assert (again / "clients.csv").read_bytes() == (run / "clients.csv").read_bytes()


@pytest.mark.parametrize("algorithm", ["fedbabu", "fedper"])
def test_from_the_initial_model_the_clients_fine_tune_what_training_never_moved(trained, tmp_path, algorithm):
    """A run whose lr is too small to move any float32 weight ends at its initial model, so personalizing its
    final model must give what ``--model initial`` gives for a trained run of the same seed, bit for bit, and no
    personal state: FedPer's clients start from the seeded head, not the heads they trained."""
    frozen = tmp_path / "frozen"
    run_experiment(small_config(algorithm=algorithm, workers=1, rounds=4, lr=1e-30, lr_milestones=[]), frozen)
    assert main(["personalize", str(frozen), "--quiet", "--workers", "1"]) == 0
    run = tmp_path / "run"
    shutil.copytree(trained[algorithm], run)
    assert main(["personalize", str(run), "--quiet", "--model", "initial", "--workers", "2"]) == 0
    initial = run / "personalize" / "full-2ep-lr0.01-mom0.9-wd0-bs10-initial-model"
    expected = frozen / "personalize" / "full-2ep-lr0.01-mom0.9-wd0-bs10" / "clients.csv"
    assert (initial / "clients.csv").read_bytes() == expected.read_bytes()
    from_python = fedbabu.personalize(run, model="initial", out=tmp_path / "python", progress=False)
    assert (tmp_path / "python" / "clients.csv").read_bytes() == expected.read_bytes()
    assert from_python.summary["personalized_model"] == "initial"
    assert (initial / "clients.csv").read_bytes() != (run / "clients.csv").read_bytes()
    summary = json.loads((initial / "summary.json").read_text())
    assert summary["personalized_model"] == "initial" and "final_global_accuracy" not in summary
    report = (initial / "report.md").read_text()
    assert "never_sampled_clients" not in summary and "were never sampled" not in report
    assert "| initial (the initial model, before any round) |" in report and "end of training" not in report
    assert "its initial global model, before any round" in report
