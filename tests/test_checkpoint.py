"""Checkpoints: bit-identical resume after SIGKILL or Ctrl-C, safe loading, and refusals."""

import contextlib
import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import StopAtRound, ctrl_c_as_in_a_terminal, small_config

from fedbabu import reproduce
from fedbabu.algorithms import ALGORITHMS
from fedbabu.config import build_config, load_config
from fedbabu.engine.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng,
    encode,
    load_checkpoint,
    restore_rng,
    write_checkpoint,
)
from fedbabu.engine.simulation import Observer
from fedbabu.errors import UserError
from fedbabu.files import load_tensors
from fedbabu.runner import resume_experiment, run_experiment

FINAL_FILES = ("metrics.jsonl", "clients.csv", "model.pt")


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedbabu", *args], capture_output=True, text=True, timeout=timeout)


def _same_files(a: Path, b: Path) -> None:
    for name in FINAL_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ref, got = load_tensors(a / "model.pt"), load_tensors(b / "model.pt")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(digits, tmp_path):
    """A real process killed with SIGKILL after a checkpoint resumes to the bytes of an uninterrupted run."""
    overrides = ["rounds=12", "checkpoint_every=3", "num_clients=10", "eval_every=5", "finetune.epochs=2"]
    settings = ["--quiet"] + [a for o in overrides for a in ("--set", o)]
    run_experiment(load_config(None, overrides, {"workers": 1}), tmp_path / "ref", dataset=digits)

    folder = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "fedbabu", "run", "--out", str(folder), "--workers", "2",
                                *settings], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    metrics = folder / "metrics.jsonl"
    deadline = time.monotonic() + 240
    # 4 recorded rounds mean the checkpoint of round 3 is complete (it is written before round 4 starts)
    while (not metrics.exists() or metrics.read_text().count("\n") < 4) and process.poll() is None:
        assert time.monotonic() < deadline, "the run never reached its first checkpoint"
        time.sleep(0.02)
    # only the main process, as the out-of-memory killer would: its orphaned workers must not block the resume
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    try:
        assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        assert not (folder / "summary.json").exists()
        saved = load_checkpoint(folder / "checkpoint.pt")
        assert 3 <= saved.rounds_done < 12 and saved.rounds_done % 3 == 0
        resumed = _cli("resume", str(folder), "--quiet", "--workers", "1")
        assert resumed.returncode == 0, resumed.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    _same_files(tmp_path / "ref", folder)
    assert len((folder / "timing.jsonl").read_text().splitlines()) == 12


@pytest.mark.parametrize(("signum", "word", "to_group"), [
    (signal.SIGINT, "interrupted", False),  # what Ctrl-C delivers to the main process (the workers ignore it)
    (signal.SIGTERM, "terminated", True),  # what a batch scheduler sends to the whole job at its time limit
])
def test_a_stop_signal_on_a_real_run_is_one_line_and_leaves_a_checkpoint(tmp_path, signum, word, to_group):
    folder = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "fedbabu", "run", "--quiet", "--out", str(folder),
                                "--workers", "2", "--set", "rounds=1000", "--set", "checkpoint_every=2"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=ctrl_c_as_in_a_terminal)
    metrics = folder / "metrics.jsonl"
    deadline = time.monotonic() + 240
    try:
        while (not metrics.exists() or metrics.read_text().count("\n") < 3) and process.poll() is None:
            assert time.monotonic() < deadline, "the run never reached its first checkpoint"
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before it could be stopped"
        if to_group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signum, err
    rounds = load_checkpoint(folder / "checkpoint.pt").rounds_done
    assert rounds >= 2 and rounds % 2 == 0
    assert err == (f"{word}; {folder} keeps its last good checkpoint (round {rounds}): continue with "
                   f"`fedbabu resume {folder}`\n")
    assert not subprocess.run(["pgrep", "-g", str(process.pid)], capture_output=True).stdout, "workers outlived it"


def test_ctrl_c_leaves_a_resumable_folder_and_stale_rounds_are_dropped(digits, tmp_path):
    config = small_config(rounds=5, checkpoint_every=2, eval_every=3)
    reference = run_experiment(config, tmp_path / "ref", dataset=digits)
    folder = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, folder, StopAtRound(4), dataset=digits)
    assert load_checkpoint(folder / "checkpoint.pt").rounds_done == 2
    # rounds recorded after the checkpoint, and a line cut short by a crash, must not survive the resume
    with open(folder / "metrics.jsonl", "a") as out:
        out.write('{"round": 4, "lr": 1.0}\n{"round": 5, "lr"')
    before = sum(m["seconds"] for m in load_checkpoint(folder / "checkpoint.pt").metrics)
    resumed = resume_experiment(folder)
    _same_files(tmp_path / "ref", folder)
    assert resumed.summary["personalized_accuracy"] == reference.summary["personalized_accuracy"]
    # the wall time counts the rounds run before the interruption too
    rounds = [json.loads(line)["seconds"] for line in (folder / "timing.jsonl").read_text().splitlines()]
    assert before > 0 and resumed.summary["wall_time_s"] >= sum(rounds) - 1e-3


class _StopPersonalizing(Observer):
    def on_personalize_start(self, total):
        raise KeyboardInterrupt


def test_resume_from_the_initial_and_from_the_final_checkpoint(digits, tmp_path):
    config = small_config(rounds=3, checkpoint_every=0)
    run_experiment(config, tmp_path / "ref", dataset=digits)
    for name, stop, rounds_done in (("first", StopAtRound(2), 0), ("last", _StopPersonalizing(), 3)):
        folder = tmp_path / name
        with pytest.raises(KeyboardInterrupt):
            run_experiment(config, folder, stop, dataset=digits)
        assert load_checkpoint(folder / "checkpoint.pt").rounds_done == rounds_done
        assert not (folder / "clients.csv").exists()
        resume_experiment(folder)
        _same_files(tmp_path / "ref", folder)


def _checkpoint(**overrides) -> Checkpoint:
    config = small_config(rounds=4)
    values = dict(config=config, rounds_done=2, global_vector=torch.randn(50),
                  personal={3: {"head.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}},
                  metrics=[{"round": 1, "train_loss": float("nan")}, {"round": 2, "train_loss": 0.5}],
                  rng=capture_rng())
    values.update(overrides)
    return Checkpoint(**values)


def test_checkpoint_round_trip_keeps_every_bit(tmp_path):
    state = capture_rng()
    first = (torch.rand(3), np.random.rand(3), random.random())
    original = _checkpoint(rng=state)
    path = tmp_path / "checkpoint.pt"
    write_checkpoint(tmp_path, original)  # the personal states go to their own files beside it
    loaded = load_checkpoint(path)
    assert loaded.config == original.config and loaded.rounds_done == 2
    assert torch.equal(loaded.global_vector, original.global_vector)
    assert np.array_equal(loaded.personal[3]["head.weight"], original.personal[3]["head.weight"])
    assert json.dumps(loaded.metrics) == json.dumps(original.metrics)
    # the saved generator states reproduce the draws that followed the capture
    torch.manual_seed(123), np.random.seed(5), random.seed(9)
    restore_rng(loaded.rng)
    assert torch.equal(torch.rand(3), first[0]) and np.array_equal(np.random.rand(3), first[1])
    assert random.random() == first[2]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch exploited",))


def test_damaged_foreign_or_malicious_checkpoints_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = encode(_checkpoint())
    cases = {
        "truncated.pt": (good[: len(good) // 2], "not a readable checkpoint"),
        "empty.pt": (b"", "not a readable checkpoint"),
        "foreign.pt": (None, "not a fedbabu checkpoint"),
        "exploit.pt": (pickle.dumps({"format": _Exploit()}), "not a readable checkpoint"),
    }
    # flip one byte inside the stored payload: the file still loads, only the checksum can notice
    payload = torch.load(io.BytesIO(good), weights_only=True)["payload"].numpy().tobytes()
    tampered = bytearray(good)
    tampered[good.index(payload) + len(payload) // 2] ^= 0xFF
    cases["tampered.pt"] = (bytes(tampered), "checksum mismatch")
    torch.save({"model": torch.zeros(3)}, tmp_path / "foreign.pt")
    for name, (data, message) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=message) as err:
            load_checkpoint(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "exploited").exists()


def test_resume_refuses_another_config_and_a_finished_run(digits, tmp_path):
    config = small_config(rounds=2)
    folder = tmp_path / "run"
    run_experiment(config, folder, dataset=digits)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    other = build_config({**config.to_plain(), "lr": 0.5})
    with pytest.raises(UserError, match=r"different config \(lr is 0.05 there, 0.5 here\)"):
        resume_experiment(folder, other)
    with pytest.raises(UserError, match="already finished all 2 rounds"):
        resume_experiment(folder, build_config({**config.to_plain(), "workers": 2}))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_run_refuses_a_used_folder_and_overwrite_starts_clean(digits, tmp_path):
    folder = tmp_path / "run"
    run_experiment(small_config(rounds=2), folder, dataset=digits)
    with pytest.raises(UserError, match="not empty; pass --overwrite"):
        run_experiment(small_config(rounds=2), folder, dataset=digits)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(small_config(rounds=4, checkpoint_every=1), folder, StopAtRound(2), overwrite=True,
                       dataset=digits)
    # nothing of the first run survives next to the interrupted second one
    assert not (folder / "summary.json").exists() and not (folder / "model.pt").exists()
    assert yaml.safe_load((folder / "config.yaml").read_text())["rounds"] == 4
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_checkpoint_of_another_training_version_is_refused_by_resume_and_restarted_by_reproduce(
        digits, tmp_path, monkeypatch):
    config = small_config(rounds=3, checkpoint_every=1, eval_every=0)
    folder = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, folder, StopAtRound(2), dataset=digits)
    assert load_checkpoint(folder / "checkpoint.pt").training_version == 1
    monkeypatch.setattr(ALGORITHMS["fedbabu"], "training_version", 2)  # a later build changed how it trains
    with pytest.raises(UserError, match="trained by fedbabu training version 1, and this build trains version 2"):
        resume_experiment(folder)
    assert reproduce._state(folder, config) == "new"
    monkeypatch.setattr(ALGORITHMS["fedbabu"], "training_version", 1)
    assert reproduce._state(folder, config) == "resumable"
