"""Faults during training: broken updates are screened out, dropouts are survived, divergence stops."""

import json
import logging
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import small_config

from fedbabu.algorithms import ALGORITHMS
from fedbabu.algorithms.fedavg import FedAvg
from fedbabu.cli import main
from fedbabu.config import registered_algorithms
from fedbabu.engine import simulation
from fedbabu.engine.checkpoint import load_checkpoint
from fedbabu.engine.faults import TrainingDiverged, dropped_clients, rejection_reason
from fedbabu.engine.round import DROPOUT_STREAM, sample_clients, stream_seed
from fedbabu.engine.simulation import simulate
from fedbabu.runner import partition_for, run_experiment

SHAPES = {"head.weight": (2, 3), "head.bias": (2,)}
SOUND_HEAD = {"head.weight": np.ones((2, 3), np.float32), "head.bias": np.ones(2, np.float32)}


@pytest.mark.parametrize(("vector", "personal", "reason"), [
    (np.ones(4, np.float32), {}, None),
    (np.ones(4, np.float32), SOUND_HEAD, None),
    (np.array([1, np.nan, 0, 0], np.float32), {}, "non-finite values"),
    (np.array([1, np.inf, 0, 0], np.float32), {}, "non-finite values"),
    (np.ones(5, np.float32), {}, "wrong shape: expected (4,)"),
    (np.ones((2, 2), np.float32), {}, "wrong shape"),
    (np.ones(4, np.float64), {}, "wrong dtype"),
    (np.full(4, 1e5, np.float32), {}, "update norm 2e+05 exceeds max_update_norm 1000"),
    (np.ones(4, np.float32), {**SOUND_HEAD, "head.weight": np.ones((3, 2), np.float32)},
     "shape (3, 2), expected (2, 3)"),
    (np.ones(4, np.float32), {**SOUND_HEAD, "head.weight": np.full((2, 3), np.nan, np.float32)}, "non-finite values"),
    (np.ones(4, np.float32), {**SOUND_HEAD, "extra": np.ones(7, np.float32)}, "personal 'extra' is not a tensor"),
    (np.ones(4, np.float32), {"head.weight": np.ones((2, 3), np.float32)}, "personal state lacks 'head.bias'"),
])
def test_rejection_reasons(vector, personal, reason):
    got = rejection_reason(vector, personal, np.zeros(4, np.float32), SHAPES, max_norm=1000.0)
    if reason is None:
        assert got is None
    else:
        assert reason in got


def test_the_norm_bound_can_be_disabled():
    assert rejection_reason(np.full(4, 1e30, np.float32), {}, np.zeros(4, np.float32), {}, None) is None


def test_dropouts_are_seeded_and_follow_the_rate():
    sampled = list(range(1000))
    first = dropped_clients(sampled, 0.3, 42)
    assert first == dropped_clients(sampled, 0.3, 42) and first != dropped_clients(sampled, 0.3, 43)
    assert 240 < len(first) < 360 and set(first) <= set(sampled)
    assert dropped_clients(sampled, 0.0, 42) == []


class Saboteur(FedAvg):
    """FedAvg whose chosen clients return NaN, huge, or (from a given round) only NaN updates."""

    name = "saboteur"
    nan_clients: frozenset[int] = frozenset()
    huge_clients: frozenset[int] = frozenset()
    everyone_nan = False
    first_index: ClassVar[dict[int, int]] = {}
    calls = 0
    out_of_memory_at: int | None = None

    def client_update(self, model, data, personal, lr, generator):
        type(self).calls += 1
        if self.calls == self.out_of_memory_at:
            raise MemoryError
        update = super().client_update(model, data, personal, lr, generator)
        client = self.first_index.get(int(data.train_idx[0]), -1)
        with torch.no_grad():
            first = next(model.parameters())
            if self.everyone_nan or client in self.nan_clients:
                first.view(-1)[0] = float("nan")
            elif client in self.huge_clients:
                first.mul_(1e6)
        return update


@pytest.fixture
def saboteur(monkeypatch, digits):
    monkeypatch.setitem(ALGORITHMS, "saboteur", Saboteur)
    monkeypatch.setitem(registered_algorithms(), "saboteur", Saboteur.Settings)

    def configure(config, nan=(), huge=(), everyone_nan=False, out_of_memory_at=None):
        partition = partition_for(config, digits)
        monkeypatch.setattr(Saboteur, "first_index", {int(t[0]): c for c, t in enumerate(partition.train)})
        monkeypatch.setattr(Saboteur, "nan_clients", frozenset(nan))
        monkeypatch.setattr(Saboteur, "huge_clients", frozenset(huge))
        monkeypatch.setattr(Saboteur, "everyone_nan", everyone_nan)
        monkeypatch.setattr(Saboteur, "calls", 0)
        monkeypatch.setattr(Saboteur, "out_of_memory_at", out_of_memory_at)
        return partition

    return configure


def test_bad_updates_are_rejected_logged_and_counted(digits, saboteur, caplog):
    config = small_config(algorithm="saboteur", rounds=4, client_fraction=0.6, eval_every=2)
    a, b, c = sample_clients(config.seed, 0, config.num_clients, config.client_fraction)[:3]
    partition = saboteur(config, nan=[a, b], huge=[c])
    with caplog.at_level(logging.WARNING, logger="fedbabu"):
        result = simulate(config, digits, partition)
    assert result.metrics[0]["rejected"] == 3
    for record in result.metrics:
        bad = [client for client in record["clients"] if client in (a, b, c)]
        assert record["rejected"] == len(bad)
        assert np.isfinite(record["train_loss"]) and record["dropped"] == 0
    assert any(m["rejected"] for m in result.metrics)
    assert all(torch.isfinite(v).all() for v in result.final_state.values())
    assert f"round 1: rejected the update of client {a}: non-finite values" in caplog.text
    assert f"round 1: rejected the update of client {c}: update norm" in caplog.text
    assert "exceeds max_update_norm 10000" in caplog.text
    # rejected for other reasons, the same clients leave exactly the same model: nothing of theirs got in
    saboteur(config, huge=[a, b, c])
    other = simulate(config, digits, partition)
    assert [m["rejected"] for m in other.metrics] == [m["rejected"] for m in result.metrics]
    assert all(torch.equal(result.final_state[k], other.final_state[k]) for k in result.final_state)


class _GlobalRecorder:
    """Copies the server's global vector before the first round and after every round, by wrapping the
    round policy the simulator calls (the server state is explicit, passed to it)."""

    def __init__(self, monkeypatch) -> None:
        self.vectors = []
        finish = simulation.finish_round

        def recording(plan, replies, server, *args, **kwargs):
            if not self.vectors:
                self.vectors.append(server.global_vector.clone())
            outcome = finish(plan, replies, server, *args, **kwargs)
            self.vectors.append(server.global_vector.clone())
            return outcome

        monkeypatch.setattr(simulation, "finish_round", recording)


def _not_json(constant: str) -> None:
    raise AssertionError(f"metrics.jsonl holds {constant}, which is not JSON")


def test_client_failures_are_survived_and_an_empty_round_keeps_the_model(digits, caplog, tmp_path, monkeypatch):
    config = small_config(rounds=6, client_fraction=0.2, client_failure_rate=0.7, eval_every=0)
    recorder = _GlobalRecorder(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="fedbabu"):
        result = run_experiment(config, tmp_path / "run", dataset=digits).result
    written = [json.loads(line, parse_constant=_not_json)
               for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(w["dropped"], w["rejected"]) for w in written] == [(m["dropped"], m["rejected"]) for m in result.metrics]
    assert [w["train_loss"] is None for w in written] == [bool(np.isnan(m["train_loss"])) for m in result.metrics]
    empty = []
    for index, record in enumerate(result.metrics):
        sampled = sample_clients(config.seed, index, config.num_clients, config.client_fraction)
        dropped = dropped_clients(sampled, 0.7, stream_seed(config.seed, index, 0, DROPOUT_STREAM))
        assert record["dropped"] == len(dropped) and record["rejected"] == 0
        kept = torch.equal(recorder.vectors[index + 1], recorder.vectors[index])
        if len(dropped) == len(sampled):
            empty.append(record["round"])
            assert np.isnan(record["train_loss"]) and kept
        else:
            assert np.isfinite(record["train_loss"]) and not kept
    assert empty, "the seed should give at least one round in which every client drops out"
    assert f"round {empty[0]}: no client update arrived or was accepted; the global model of round " \
           f"{empty[0] - 1} is kept" in caplog.text
    assert len(result.clients) == config.num_clients


def test_divergence_stops_and_keeps_the_last_good_checkpoint(digits, saboteur, tmp_path):
    config = small_config(algorithm="saboteur", rounds=6, checkpoint_every=2)
    partition = saboteur(config, everyone_nan=True)
    with pytest.raises(TrainingDiverged, match=r"round 1: training diverged \(every client update"):
        run_experiment(config, tmp_path / "run", dataset=digits, partition=partition)
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert saved.rounds_done == 0 and torch.isfinite(saved.global_vector).all()


def test_divergence_through_the_cli_is_one_clear_line(digits, saboteur, tmp_path, capsys):
    saboteur(small_config(), everyone_nan=True)
    code = main(["run", "--quiet", "--out", str(tmp_path / "run"), "--set", "algorithm=saboteur",
                 "--set", "rounds=3", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 1
    *warnings, last = err.splitlines()
    assert last.startswith("error: round 1: training diverged")
    assert last.endswith(f"{tmp_path / 'run'} keeps its last good checkpoint (round 0)")
    assert warnings and all(w.startswith("warning: round 1: rejected the update of client") for w in warnings)


def test_out_of_memory_says_how_to_resume_and_the_resume_finishes(digits, saboteur, tmp_path, capsys):
    saboteur(small_config(), out_of_memory_at=15)  # 10 clients per round: the 2nd round runs out
    folder = tmp_path / "run"
    code = main(["run", "--quiet", "--out", str(folder), "--set", "algorithm=saboteur", "--set", "rounds=3",
                 "--set", "checkpoint_every=1", "--set", "finetune.epochs=1", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert err == (f"error: out of memory (lower batch_size, eval_batch_size or workers); {folder} keeps its last "
                   f"good checkpoint (round 1): continue with `fedbabu resume {folder}`\n")
    assert main(["resume", str(folder), "--quiet"]) == 0
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 3 and (folder / "summary.json").exists()
