"""`fedbabu report` rebuilds reports from run files; `--tensorboard` logs the per-round scalars."""

import json

import pytest
from conftest import StopAtRound, small_config

from fedbabu.cli import main
from fedbabu.runner import run_experiment


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


def test_tensorboard_flag_of_the_cli(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = tmp_path / "run"
    assert main(["run", "--quiet", "--tensorboard", "--out", str(folder), "--workers", "1", "--set", "rounds=2",
                 "--set", "finetune.epochs=1", "--set", "client_failure_rate=0.5"]) == 0
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("faults/dropped_clients")] == [m["dropped"] for m in metrics]
    assert [e.step for e in events.Scalars("train/lr")] == [1, 2]
