"""A plain `fedbabu run` leaves the promised run folder; `fedbabu report` rebuilds reports from run files;
`--tensorboard` logs the per-round scalars; `--quiet` drops the progress but keeps the partition summary."""

import contextlib
import csv
import io
import json
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import StopAtRound, small_config

from fedbabu.cli import main
from fedbabu.config import build_config
from fedbabu.data.partition import Partition
from fedbabu.engine.round import sample_clients
from fedbabu.runner import partition_for, run_experiment

CLI_SETTINGS = ["--workers", "1", "--set", "rounds=3", "--set", "eval_every=2", "--set", "finetune.epochs=2",
                "--set", "client_failure_rate=0.5"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Two plain `fedbabu run`s of the embedded digits experiment, in-process, their output captured.

    ``quiet``: ``--quiet --tensorboard --seed 3``; ``bars``: the default seed (0) with its progress, which
    output that is not a terminal gets as plain lines. Each maps to (run folder, stdout, stderr).
    """
    root = tmp_path_factory.mktemp("cli")
    runs = {}
    for name, options in (("quiet", ["--quiet", "--tensorboard", "--seed", "3"]), ("bars", [])):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["run", *options, "--out", str(root / name), *CLI_SETTINGS])
        assert code == 0, err.getvalue()
        runs[name] = (root / name, out.getvalue(), err.getvalue())
    return runs


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_run_folder_of_a_plain_cli_run(cli_runs):
    folder = cli_runs["quiet"][0]
    config = build_config(yaml.safe_load((folder / "config.yaml").read_text()))
    assert (config.seed, config.rounds, config.eval_every, config.num_clients) == (3, 3, 2, 20)
    assert (config.finetune.epochs, config.client_failure_rate) == (2, 0.5)

    with (folder / "clients.csv").open() as f:
        header, *rows = list(csv.reader(f))
    assert header == ["client", "train_size", "test_size", "classes", "initial_accuracy", "accuracy_after_epoch_1",
                      "accuracy_after_epoch_2"]
    clients = json.loads((folder / "partition.json").read_text())["clients"]
    assert [[int(v) for v in r[:4]] for r in rows] == [
        [c["client"], len(c["train_indices"]), len(c["test_indices"]), int(np.count_nonzero(c["train_label_counts"]))]
        for c in clients]
    assert len(rows) == 20
    accuracies = np.array([[float(v) for v in r[4:]] for r in rows])
    assert ((accuracies >= 0) & (accuracies <= 1)).all()

    summary = json.loads((folder / "summary.json").read_text())
    assert {k: summary[k] for k in ("algorithm", "dataset", "model", "rounds", "num_clients", "seed")} == {
        "algorithm": "fedbabu", "dataset": "digits", "model": "digitcnn", "rounds": 3, "num_clients": 20, "seed": 3}
    assert summary["finetune"] == {"part": "full", "epochs": 2, "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0,
                                   "batch_size": 10}
    for key, column in (("initial_accuracy", 0), ("personalized_accuracy", -1)):
        assert summary[key] == pytest.approx({"mean": accuracies[:, column].mean(), "std": accuracies[:, column].std()},
                                             abs=1e-6)

    metrics = _jsonl(folder / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2, 3]
    assert [m["lr"] for m in metrics] == [config.lr_at(r) for r in range(3)]
    assert [m["clients"] for m in metrics] == [sample_clients(3, r, 20, 0.5) for r in range(3)]
    assert all(math.isfinite(m["train_loss"]) and m["train_loss"] > 0 for m in metrics)
    assert ["test_accuracy" in m for m in metrics] == [False, True, True]  # every eval_every rounds, and the last
    assert metrics[-1]["test_accuracy"] == pytest.approx(summary["initial_accuracy"]["mean"], abs=1e-6)
    assert not any("seconds" in m or "utilization" in m for m in metrics)
    timing = _jsonl(folder / "timing.jsonl")
    assert [t["round"] for t in timing] == [1, 2, 3] and all(t["seconds"] > 0 for t in timing)
    # the share of the (one, in-process) worker's time in client tasks: the server's own work is the rest
    assert all(0 < t["utilization"] <= 1.0 for t in timing)
    assert summary["wall_time_s"] >= sum(t["seconds"] for t in timing) - 0.01

    state = torch.load(folder / "model.pt", weights_only=True)
    assert {k.split(".")[0] for k in state} == {"body", "head"}
    for plot in ("rounds.png", "clients.png", "finetune.png"):
        data = (folder / plot).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000, plot
    report = (folder / "report.md").read_text()
    assert report.startswith("# fedbabu on digits (digitcnn)") and "20 clients, 3 rounds, seed 3" in report


def test_the_seed_option_draws_another_partition_and_is_recorded(cli_runs, digits):
    partitions = {}
    for name, seed in (("quiet", 3), ("bars", 0)):
        folder = cli_runs[name][0]
        config = build_config(yaml.safe_load((folder / "config.yaml").read_text()))
        assert config.seed == seed and json.loads((folder / "summary.json").read_text())["seed"] == seed
        partitions[name] = Partition.load(folder / "partition.json")
        drawn = partition_for(config, digits)
        assert all(np.array_equal(a, b) for a, b in zip(partitions[name].train, drawn.train, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(partitions["quiet"].train, partitions["bars"].train,
                                                          strict=True))


def test_quiet_keeps_the_partition_summary_and_drops_the_bars(cli_runs):
    folder, out, err = cli_runs["quiet"]
    line = f"fedbabu: {Partition.load(folder / 'partition.json').summary()}"
    assert line.startswith("fedbabu: partition shards: 20 clients, classes per client mean ")
    assert out.splitlines()[0] == line
    assert err == ""  # no bars (they draw on stderr) and no warnings in this run
    assert "fedbabu rounds" not in out and "fedbabu personalize" not in out and "run folder: " in out

    folder, _, err = cli_runs["bars"]
    evaluated = [m for m in _jsonl(folder / "metrics.jsonl") if "test_accuracy" in m]
    assert [m["round"] for m in evaluated] == [2, 3]
    assert err.splitlines() == [
        f"fedbabu: {Partition.load(folder / 'partition.json').summary()}",
        *(f"fedbabu round {m['round']}/3: lr {m['lr']:.4g}"
          + ("" if math.isnan(m["train_loss"]) else f", loss {m['train_loss']:.3f}")
          + f", accuracy {100 * m['test_accuracy']:.1f}%" for m in evaluated),
        "fedbabu: personalized 20 clients"]  # a pipe gets one plain line per evaluation round, no bar


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("runs")
    finished = {a: run_experiment(small_config(algorithm=a, rounds=3, eval_every=1), root / a, dataset=digits)
                for a in ("fedavg", "fedbabu")}
    with pytest.raises(KeyboardInterrupt):
        run_experiment(small_config(rounds=5, eval_every=1), root / "cut", StopAtRound(3), dataset=digits)
    return root, finished


def test_report_rebuilds_a_finished_run_identically(runs, capsys):
    root, _ = runs
    folder = root / "fedbabu"
    original = (folder / "report.md").read_bytes()
    for name in ("report.md", "rounds.png", "clients.png", "finetune.png"):
        (folder / name).unlink()
    assert main(["report", str(folder)]) == 0
    assert (folder / "report.md").read_bytes() == original
    assert all((folder / n).stat().st_size > 1000 for n in ("rounds.png", "clients.png", "finetune.png"))


def test_report_of_an_interrupted_run_and_a_comparison_table(runs, tmp_path, capsys):
    root, finished = runs
    out = tmp_path / "runs.md"
    assert main(["report", str(root / "fedavg"), str(root / "fedbabu"), str(root / "cut"), "--out", str(out)]) == 0
    cut = (root / "cut" / "report.md").read_text()
    assert "interrupted" in cut and "2 of 5 rounds were recorded" in cut and "fedbabu resume" in cut
    assert (root / "cut" / "rounds.png").exists() and not (root / "cut" / "clients.png").exists()
    table = out.read_text().splitlines()
    cut_row, = (r for r in table if str(root / "cut") in r)
    rows = {line.split(" | ")[1]: line for line in table if line.startswith(f"| {root}") and line != cut_row}
    assert set(rows) == {"fedavg", "fedbabu"}
    for algorithm, experiment in finished.items():
        s = experiment.summary
        expected = f"{100 * s['personalized_accuracy']['mean']:.2f} ± {100 * s['personalized_accuracy']['std']:.2f}"
        assert expected in rows[algorithm] and "| 3/3 |" in rows[algorithm]
    last = json.loads((root / "cut" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "| 2/5 |" in cut_row and f"| {100 * last['test_accuracy']:.2f} |" in cut_row
    assert "fedavg" in capsys.readouterr().out


def test_tensorboard_gets_every_round_once_even_after_a_resume(digits, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedbabu.results.live import ObserverGroup, TensorBoardObserver
    from fedbabu.runner import resume_experiment

    folder = tmp_path / "run"
    config = small_config(rounds=4, checkpoint_every=2, eval_every=2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, folder, ObserverGroup(TensorBoardObserver(folder), StopAtRound(4)), dataset=digits)
    resume_experiment(folder, observer=TensorBoardObserver(folder))
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4]
    assert [e.value for e in losses] == pytest.approx([m["train_loss"] for m in metrics], rel=1e-6)
    accuracy = events.Scalars("global/test_accuracy")
    assert [(e.step, round(e.value, 6)) for e in accuracy] == [
        (m["round"], round(m["test_accuracy"], 6)) for m in metrics if "test_accuracy" in m]
    assert [e.value for e in events.Scalars("faults/rejected_updates")] == [0, 0, 0, 0]


def test_tensorboard_flag_of_the_cli(cli_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = cli_runs["quiet"][0]
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    metrics = _jsonl(folder / "metrics.jsonl")
    assert [e.value for e in events.Scalars("faults/dropped_clients")] == [m["dropped"] for m in metrics]
    assert any(m["dropped"] for m in metrics)
    assert [e.step for e in events.Scalars("train/lr")] == [1, 2, 3]
    assert not (cli_runs["bars"][0] / "tensorboard").exists()


def test_clients_csv_curves_are_read_whatever_the_personalization_unit(tmp_path):
    """Per-FedAvg's columns are adaptation steps, not epochs; both read back whole."""
    from fedbabu.results.rebuild import read_curves

    for unit in ("epoch", "step"):
        path = tmp_path / f"{unit}.csv"
        path.write_text(f"client,train_size,test_size,classes,initial_accuracy,accuracy_after_{unit}_1,"
                        f"accuracy_after_{unit}_2\n0,10,5,2,0.2,0.4,0.6\n1,10,5,1,0.0,1.0,1.0\n")
        np.testing.assert_array_equal(read_curves(path), [[0.2, 0.4, 0.6], [0.0, 1.0, 1.0]])
