"""The worker pool: same bits for any number of workers, clear errors, and no processes left behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import small_config

from fedbabu.engine.pool import ClientPool, WorkerError
from fedbabu.engine.simulation import simulate
from fedbabu.runner import partition_for


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_results_are_bit_identical_for_one_and_two_workers(digits):
    runs = {}
    for workers in (1, 2):
        config = small_config(algorithm="fedavg", workers=workers, client_fraction=0.6, eval_every=2)
        runs[workers] = simulate(config, digits, partition_for(config, digits))
    one, two = runs[1], runs[2]
    assert all(torch.equal(one.final_state[k], two.final_state[k]) for k in one.final_state)
    assert [c["accuracies"] for c in one.clients] == [c["accuracies"] for c in two.clients]
    strip = [{k: v for k, v in m.items() if k != "seconds"} for m in one.metrics]
    assert strip == [{k: v for k, v in m.items() if k != "seconds"} for m in two.metrics]


def _die_on_three(task):
    if task == 3:
        os._exit(3)
    return task


def _square(x):
    return x * x


def test_a_dying_worker_is_a_clear_error_not_a_hang():
    pool = ClientPool(_die_on_three, workers=2)
    assert pool.map([0, 1, 2]) == [0, 1, 2]
    pids = list(pool._executor._processes)
    with pytest.raises(WorkerError, match="worker process died while running 3"), pool:
        pool.map([1, 3, 2])
    assert pids and not any(_alive(pid) for pid in pids)


def test_pool_returns_results_in_task_order_and_stops_its_workers():
    with ClientPool(_square, workers=2) as pool:
        assert pool.map(list(range(20))) == [x * x for x in range(20)]
        pids = list(pool._executor._processes)
    assert pids and not any(_alive(pid) for pid in pids)


def _marked_processes(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace") and _alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_ctrl_c_stops_the_run_and_its_workers(tmp_path):
    out = tmp_path / "interrupted-run-marker"
    process = subprocess.Popen(
        [sys.executable, "-m", "fedbabu", "run", "--quiet", "--workers", "2", "--out", str(out),
         "--set", "rounds=2000", "--set", "eval_every=0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell ignores SIGINT
    )
    try:
        deadline = time.monotonic() + 60
        while len(_marked_processes(str(out))) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_marked_processes(str(out))) >= 3, "parent and two workers should be running"
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    assert "Traceback" not in stderr and "interrupted" in stderr
    time.sleep(0.5)
    assert _marked_processes(str(out)) == []
