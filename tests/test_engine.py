"""The worker pool: same bits for any number of workers, clear errors, and no processes left behind."""

import contextlib
import faulthandler
import gc
import os
import signal
import struct
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import torch
from conftest import ctrl_c_as_in_a_terminal, small_config

from fedbabu.engine.checkpoint import TIMING_KEYS
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
    strip = [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in one.metrics]
    assert strip == [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in two.metrics]


def _sleep(seconds):
    time.sleep(seconds)
    return seconds


@pytest.mark.parametrize("workers", [1, 2])
def test_the_pool_counts_the_time_spent_inside_tasks_not_waiting(workers):
    with ClientPool(_sleep, workers) as pool:
        began = time.perf_counter()
        assert pool.map([0.3, 0.3, 0.3]) == [0.3, 0.3, 0.3]
        wall = time.perf_counter() - began
        time.sleep(0.2)  # idle between maps: not counted
        pool.map([0.1])
    assert 1.0 <= pool.busy_seconds < 1.15
    # with two workers the three tasks take 0.6 s of wall time, of which one worker waits 0.3 s: what
    # counts is the 0.9 s spent inside tasks, whatever the workers
    assert wall < 0.75 if workers == 2 else wall >= 0.9


def _die_on_three(task):
    if task == 3:
        os._exit(3)
    return task


def _square(x):
    return x * x


def test_a_dying_worker_is_a_clear_error_not_a_hang():
    pool = ClientPool(_die_on_three, workers=2)
    assert pool.map([0, 1, 2]) == [0, 1, 2]
    pids = [worker.process.pid for worker in pool._pool]
    with pytest.raises(WorkerError, match="worker process died while running 3"), pool:
        pool.map([1, 3, 2])
    assert pids and not any(_alive(pid) for pid in pids)


def test_pool_returns_results_in_task_order_and_stops_its_workers():
    with ClientPool(_square, workers=2) as pool:
        assert pool.map(list(range(20))) == [x * x for x in range(20)]
        pids = [worker.process.pid for worker in pool._pool]
    assert pids and not any(_alive(pid) for pid in pids)


def _die_half_way_through_a_result(task):
    # what a worker killed mid-send leaves behind: a message header promising 1 MB, and only a few bytes of it
    for conn in [o for o in gc.get_objects() if isinstance(o, Connection) and not o.closed]:
        with contextlib.suppress(OSError):
            conn._send(struct.pack("!i", 1_000_000) + b"partial")
    os._exit(9)


def test_a_worker_killed_half_way_through_sending_its_result_is_an_error_not_a_hang():
    faulthandler.dump_traceback_later(120, exit=True)  # a hang must fail the suite, not stall it
    try:
        pool = ClientPool(_die_half_way_through_a_result, workers=2)
        with pytest.raises(WorkerError, match="died while running 1"), pool:
            pool.map([1])
    finally:
        faulthandler.cancel_dump_traceback_later()


def _fail_on_two(task):
    if task == 2:
        raise ValueError(f"task {task} is bad")
    return task


def test_an_exception_in_a_worker_reaches_the_caller_with_the_worker_traceback():
    with pytest.raises(ValueError, match="task 2 is bad") as caught, ClientPool(_fail_on_two, workers=2) as pool:
        pool.map([0, 1, 2, 3])
    assert "_fail_on_two" in str(caught.value.__cause__)


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
        preexec_fn=ctrl_c_as_in_a_terminal,
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
