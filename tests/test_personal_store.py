"""Personal state beyond memory: the disk-backed store, incremental checkpoints, and resumes that survive a kill."""

from __future__ import annotations

import gc
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import StopAtRound, run, small_config

import fedbabu.engine.personal as personal_module
from fedbabu.cli import main
from fedbabu.config import build_config, dump_config
from fedbabu.engine.checkpoint import CheckpointError, load_checkpoint, seal
from fedbabu.engine.personal import PERSONAL_FOLDER, PersonalStateError, PersonalStore, encode_state
from fedbabu.engine.simulation import Observer
from fedbabu.errors import UserError
from fedbabu.files import load_tensors
from fedbabu.runner import resume_experiment, run_experiment

FINAL_FILES = ("metrics.jsonl", "clients.csv", "model.pt")
DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
          np.uint64, np.bool_, np.complex64, np.complex128, np.dtype(">f4"), np.dtype(">i8")]


def ditto(**overrides):
    """Ditto (a whole personal model per client) on 10 digits clients, 5 trained per round, a checkpoint every round.

    Seed 0 samples clients [0, 1, 5, 8, 9], [0, 1, 2, 4, 8], [0, 1, 6, 7, 9] and [0, 1, 2, 5, 9] in rounds 1-4.
    """
    values = {"algorithm": "ditto", "rounds": 4, "checkpoint_every": 1, "eval_every": 2, "finetune": {"epochs": 1}}
    return small_config(**{**values, **overrides})


def identical(a: Mapping, b: Mapping) -> bool:
    """Two states with the same names in the same order and arrays equal bit for bit (dtype, shape, bytes)."""
    return list(a) == list(b) and all(
        np.asarray(a[k]).dtype == np.asarray(b[k]).dtype and np.shape(a[k]) == np.shape(b[k])
        and np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes() for k in a)


def same_states(a: Mapping, b: Mapping) -> bool:
    return sorted(a) == sorted(b) and all(identical(a[c], b[c]) for c in a)


def same_run(reference: Path, folder: Path) -> None:
    """The files an uninterrupted run is compared on, and the final personal states, are bit-identical."""
    for name in FINAL_FILES:
        assert (reference / name).read_bytes() == (folder / name).read_bytes(), name
    ref, got = load_tensors(reference / "model.pt"), load_tensors(folder / "model.pt")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert same_states(load_checkpoint(reference / "checkpoint.pt").personal,
                       load_checkpoint(folder / "checkpoint.pt").personal)


def referenced(folder: Path) -> set[str]:
    """The state files a run folder's checkpoint references."""
    return {f.name for f in load_checkpoint(folder / "checkpoint.pt").personal.files_for_checkpoint().values()}


def on_disk(folder: Path) -> set[str]:
    return {p.name for p in (folder / PERSONAL_FOLDER).iterdir()}


class Rounds(Observer):
    """Writes each round's record into a shared event list, between the state files written."""

    def __init__(self, events: list) -> None:
        self.events = events

    def on_round(self, record):
        self.events.append(record)


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    """The uninterrupted Ditto run with the default budget, and every state file write and round, in order."""
    folder = tmp_path_factory.mktemp("reference") / "run"
    events: list = []
    real = personal_module.atomic_write_bytes
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(personal_module, "atomic_write_bytes", lambda path, data: (events.append(Path(path)),
                                                                                 real(path, data)))
        experiment = run_experiment(ditto(), folder, Rounds(events), dataset=digits)
    return folder, experiment, events


def _random_array(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) > 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    values = rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4)
    if dtype.kind == "c":
        values = values + 1j * rng.standard_normal(shape)
    return values.astype(dtype)


def test_the_disk_store_round_trips_bit_identically_to_the_in_memory_one(tmp_path):
    rng = np.random.default_rng(0)
    shapes = [(), (0,), (1,), (7,), (3, 0, 2), (4, 5), (2, 3, 4)]
    states = {}
    for client in range(40):
        state = {f"part{i}.weight": _random_array(rng, DTYPES[rng.integers(len(DTYPES))],
                                                   shapes[rng.integers(len(shapes))]) for i in range(rng.integers(4))}
        states[client * 3] = state
    states[1] = {"fortran": np.asfortranarray(rng.standard_normal((3, 4)).astype(np.float32)),
                 "strided": rng.standard_normal((6, 8))[::2, 1::3], "nan": np.array([np.nan, -np.inf, -0.0])}
    memory, disk = PersonalStore(1 << 40), PersonalStore(0, tmp_path / "personal")
    for client, state in states.items():
        memory[client], disk[client] = state, state
    assert disk.memory_bytes == 0 and len(list((tmp_path / "personal").iterdir())) == len(states)
    assert list(disk) == list(memory) == list(states) and len(disk) == len(states) and 1 in disk and 2 not in disk
    for client in states:
        assert identical(disk[client], memory[client]) and identical(disk[client], states[client])
    # reopened from its files as a checkpoint references them, with a budget that holds a few states at a time
    files = disk.files_for_checkpoint()
    reopened = PersonalStore.open(tmp_path / "personal", files, memory_budget=4096)
    for client in reversed(states):
        assert identical(reopened[client], states[client]) and reopened.memory_bytes <= 4096
    assert encode_state(states[1]) == encode_state({k: v.copy() for k, v in states[1].items()})

    # without a run folder the states spill to a temporary folder, which goes with the store
    spilled = PersonalStore(0)
    spilled[5] = states[1]
    temporary = spilled.folder
    assert temporary.is_dir() and identical(spilled[5], states[1])
    del spilled
    gc.collect()
    assert not temporary.exists()


def test_a_run_that_spills_every_state_is_bit_identical_to_one_that_keeps_them_in_memory(digits, reference,
                                                                                      tmp_path):
    folder, experiment, _ = reference
    assert experiment.result.personal.memory_bytes > 0 and not experiment.result.personal.changed
    spilled = run_experiment(ditto(personal_memory=0), tmp_path / "run", dataset=digits)
    assert spilled.result.personal.memory_bytes == 0
    same_run(folder, tmp_path / "run")
    assert same_states(spilled.result.personal, experiment.result.personal)
    # the Python API without a run folder spills to a temporary folder that lives as long as the result
    in_memory = run(ditto(personal_memory="0 KiB"), digits)
    store = in_memory.personal
    assert store.memory_bytes == 0 and store.folder.is_dir() and same_states(store, experiment.result.personal)
    assert in_memory.clients == experiment.result.clients
    assert all(torch.equal(in_memory.final_state[k], experiment.result.final_state[k]) for k in in_memory.final_state)
    store.close()
    assert not store.folder.exists()


def test_a_checkpoint_writes_only_the_states_that_changed_since_the_last(reference):
    folder, _, events = reference
    records = [i for i, event in enumerate(events) if not isinstance(event, Path)]
    assert len(records) == 4 and records[0] == 0  # the initial checkpoint has no state to write
    held: set[int] = set()
    for start, end in zip(records, [*records[1:], len(events)], strict=True):
        record, written = events[start], events[start + 1:end]  # after a round's record: its checkpoint's files
        assert record["dropped"] == record["rejected"] == 0
        held |= set(record["clients"])
        # one new file per client the round trained, none for the clients it did not touch
        assert sorted(int(path.name.split("-")[1]) for path in written) == record["clients"]
        assert all(path.parent == folder / PERSONAL_FOLDER for path in written)
        assert len(written) == 5 and (record["round"] == 1 or len(held) > len(written))
    assert len(held) == 9  # client 3 never trained
    assert on_disk(folder) == referenced(folder) and len(referenced(folder)) == 9


@pytest.mark.parametrize("budget", ["10GiB", 0])
def test_resume_from_an_incremental_checkpoint_is_bit_identical(digits, reference, tmp_path, budget):
    folder = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(ditto(personal_memory=budget), folder, StopAtRound(4), dataset=digits)
    saved = load_checkpoint(folder / "checkpoint.pt")
    assert saved.rounds_done == 3
    # round 3 trained clients 0, 1, 6, 7, 9: the others' files were written by earlier checkpoints and kept
    assert sorted(saved.personal) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    resume_experiment(folder)
    same_run(reference[0], folder)
    assert on_disk(folder) == referenced(folder)


KILLED_RUN = """
import os, signal, sys
import yaml
import fedbabu.engine.checkpoint as checkpoint
import fedbabu.engine.personal as personal
from fedbabu.config import build_config
from fedbabu.data.datasets import load_digits
from fedbabu.runner import run_experiment

folder, config, point, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
written = {"state files": 0, "checkpoints": 0}
write_state, write_checkpoint = personal.atomic_write_bytes, checkpoint.atomic_write_bytes

def state_file(path, data):
    written["state files"] += 1
    if point == "between-state-files" and written["state files"] == count:
        os.kill(os.getpid(), signal.SIGKILL)  # before the count-th state file: the ones before it are written
    write_state(path, data)

def checkpoint_file(path, data):
    write_checkpoint(path, data)
    if path.name == "checkpoint.pt":
        written["checkpoints"] += 1
        if point == "before-cleanup" and written["checkpoints"] == count:
            os.kill(os.getpid(), signal.SIGKILL)  # the new checkpoint is in place, the superseded files not removed

personal.atomic_write_bytes, checkpoint.atomic_write_bytes = state_file, checkpoint_file
run_experiment(build_config(yaml.safe_load(open(config))), folder, dataset=load_digits())
"""


@pytest.mark.slow
@pytest.mark.parametrize(("point", "count", "rounds_done", "left_over"), [
    ("between-state-files", 8, 1, 2),  # round 2's checkpoint had written 2 of its 5 state files
    ("before-cleanup", 3, 2, 3),  # round 2's checkpoint.pt is in place; clients 0, 1, 8's round-1 files remain
])
def test_a_process_killed_during_a_checkpoint_resumes_bit_identically(reference, tmp_path, point, count,
                                                                      rounds_done, left_over):
    """A real process SIGKILLed inside a checkpoint leaves a complete one, old or new, and resumes to the same bits."""
    folder, config = tmp_path / "run", tmp_path / "config.yaml"
    config.write_text(dump_config(ditto()))
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(folder), str(config), point, str(count)],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (folder / "summary.json").exists()
    assert load_checkpoint(folder / "checkpoint.pt").rounds_done == rounds_done
    assert len(on_disk(folder) - referenced(folder)) == left_over
    resume_experiment(folder)
    same_run(reference[0], folder)
    assert on_disk(folder) == referenced(folder)  # what the killed run left is gone


def test_a_missing_or_damaged_state_file_is_refused_in_one_line(reference, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(reference[0], folder)
    checkpoint = folder / "checkpoint.pt"
    name = sorted(referenced(folder))[0]
    path = folder / PERSONAL_FOLDER / name
    store = load_checkpoint(checkpoint).personal
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged") as damaged:
        load_checkpoint(checkpoint)
    # a store opened before the damage refuses the file when it reads it
    with pytest.raises(PersonalStateError, match="damaged") as read:
        store[int(name.split("-")[1])]
    path.unlink()
    with pytest.raises(CheckpointError, match="missing") as missing:
        load_checkpoint(checkpoint)
    for err in (damaged, read, missing):
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert main(["personalize", str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and name in err


def _version_1(folder: Path) -> None:
    """Rewrite a folder's checkpoint as earlier builds wrote it: format version 1, the states inside, no personal/."""
    saved = load_checkpoint(folder / "checkpoint.pt")
    config = {k: v for k, v in saved.config.to_plain().items() if k != "personal_memory"}  # a key they did not have
    payload = {
        "config": yaml.safe_dump(config, sort_keys=False),
        "rounds_done": saved.rounds_done,
        "sampler": {"seed": saved.config.seed, "next_round": saved.rounds_done},
        "lr_next_round": saved.config.lr_at(saved.rounds_done),
        "global_vector": saved.global_vector,
        "personal": {c: {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
                     for c, state in saved.personal.items()},
        "metrics": "".join(json.dumps(m) + "\n" for m in saved.metrics),
        "rng": saved.rng,
    }
    (folder / "checkpoint.pt").write_bytes(seal(payload, version=1))
    shutil.rmtree(folder / PERSONAL_FOLDER)


def test_a_version_1_checkpoint_still_loads_resumes_and_is_personalized_again(digits, reference, tmp_path):
    finished = tmp_path / "finished"
    shutil.copytree(reference[0], finished)
    _version_1(finished)
    loaded = load_checkpoint(finished / "checkpoint.pt")
    assert isinstance(loaded.personal, dict) and same_states(loaded.personal, reference[1].result.personal)
    assert main(["personalize", str(finished), "--quiet", "--workers", "1"]) == 0
    again = finished / "personalize" / "full-1ep-lr0.01-mom0.9-wd0-bs10"
    assert (again / "clients.csv").read_bytes() == (reference[0] / "clients.csv").read_bytes()

    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(ditto(), interrupted, StopAtRound(3), dataset=digits)
    _version_1(interrupted)
    assert load_checkpoint(interrupted / "checkpoint.pt").rounds_done == 2
    resume_experiment(interrupted)
    same_run(reference[0], interrupted)
    assert on_disk(interrupted) == referenced(interrupted)  # the resumed run checkpoints in the new layout


def test_personal_memory_is_a_number_of_bytes_or_a_size():
    base = small_config().to_plain()
    for value, expected in ((0, 0), (4096, 4096), ("512MiB", 512 * 2**20), ("2 GiB", 2 * 2**30), ("1.5GB", 15 * 10**8),
                            ("10gib", 10 * 2**30)):
        assert build_config({**base, "personal_memory": value}).resolved_personal_memory() == expected
    assert small_config().personal_memory == "10GiB"  # what config.yaml shows is what was written
    for value in ("lots", -1, True, 1.5, "2 XB", None):
        with pytest.raises(UserError, match=r"^config: personal_memory: expected a number of bytes") as err:
            build_config({**base, "personal_memory": value})
        assert "\n" not in str(err.value)
