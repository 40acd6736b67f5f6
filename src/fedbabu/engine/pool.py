"""Client work on a pool of forked worker processes, one torch thread each.

Why processes: on a CPU, two threads in one process never beat one (benchmarks/README.md), while two
processes with one thread each nearly double throughput. Why fork: the dataset, the partition and
the algorithm are inherited, never pickled; the global parameters go out through one
shared-memory vector written before each round, and updates come back as flat arrays.

Results never depend on the number of workers: each task seeds its own generator from
(seed, round, client), every process computes with one thread and the same memory format, and
the caller receives results in task order.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import torch


class WorkerError(RuntimeError):
    """A worker process died or failed; the message says which task and why."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, attached as its ``__cause__``."""

    def __str__(self) -> str:
        return self.args[0]


def tune_process(threads: int = 1) -> None:
    """Settings that make one CPU worker fast: one thread, and an allocator that keeps its memory.

    glibc's malloc returns large buffers to the OS after each step and faults them back in on the
    next; raising the mmap and trim thresholds (mallopt, so no environment variable is needed
    before start-up) removes that cost.
    """
    torch.set_num_threads(threads)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)


_STOP = None
"""Sent instead of a task: the worker returns."""


def _serve(fn: Callable[[Any], Any], conn: Connection, threads: int, inherited: list[Connection]) -> None:
    """A worker's life: run tasks as they arrive until told to stop or the parent goes away.

    Workers leave Ctrl-C to the parent and die with it even when it is SIGKILLed (Linux); the
    other workers' pipe ends inherited through fork are closed so that each pipe has one reader.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6").prctl(pr_set_pdeathsig, signal.SIGKILL)
    for other in inherited:
        other.close()
    tune_process(threads)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is _STOP:
            return
        try:
            began = time.perf_counter()
            result = fn(task)
            reply = (True, result, time.perf_counter() - began)
        except BaseException as exc:  # every failure goes back to the parent
            reply = (False, exc, traceback.format_exc())
        try:
            conn.send(reply)
        except OSError:
            return
        except Exception as exc:  # a result or an exception that cannot be pickled
            conn.send((False, WorkerError(f"the result of {task!r} could not be sent back: {exc}"),
                       traceback.format_exc()))


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection


class ClientPool:
    """Runs ``fn(task)`` for a list of tasks, in-process (``workers=1``) or on forked workers.

    Each worker has its own pipe and takes the next task when it returns a result, so fast and
    slow clients balance out. No helper threads: a worker killed half-way through sending a result
    shows up as a closed pipe in the caller, and Ctrl-C at any moment leaves nothing to wait for.

    ``busy_seconds`` adds up the time spent inside ``fn`` over every task so far, measured where
    it ran: against the wall time times the workers it says how much of the workers' time went to
    tasks rather than to waiting (for the round's last client, for the caller, for messages).
    """

    def __init__(self, fn: Callable[[Any], Any], workers: int, threads: int = 1) -> None:
        self.fn = fn
        self.workers = workers
        self.busy_seconds = 0.0
        self._pool: list[_Worker] = []
        self._previous_threads = torch.get_num_threads()
        tune_process(threads)
        if workers > 1:
            context = multiprocessing.get_context("fork")
            for _ in range(workers):
                mine, theirs = context.Pipe()
                process = context.Process(target=_serve, daemon=True,
                                          args=(fn, theirs, threads, [w.conn for w in self._pool] + [mine]))
                process.start()
                theirs.close()
                self._pool.append(_Worker(process, mine))

    def map(self, tasks: Sequence[Any]) -> list[Any]:
        """Results in the order of ``tasks``; a dead worker becomes a :class:`WorkerError`, never a hang."""
        if not self._pool:
            return [self._run_here(task) for task in tasks]
        results: list[Any] = [None] * len(tasks)
        queue = iter(range(len(tasks)))
        running: dict[Connection, tuple[_Worker, int]] = {}

        def give_next(worker: _Worker) -> None:
            index = next(queue, None)
            if index is not None:
                running[worker.conn] = (worker, index)
                try:
                    worker.conn.send(tasks[index])
                except OSError:
                    raise self._died(tasks[index]) from None

        for worker in self._pool:
            give_next(worker)
        while running:
            for ready in wait(list(running)):
                worker, index = running.pop(ready)
                try:
                    reply = worker.conn.recv()
                except (EOFError, OSError):
                    raise self._died(tasks[index]) from None
                if not reply[0]:
                    self.close(force=True)
                    _, exc, text = reply
                    raise exc from RemoteTraceback(text)
                results[index] = reply[1]
                self.busy_seconds += reply[2]
                give_next(worker)
        return results

    def _run_here(self, task: Any) -> Any:
        began = time.perf_counter()
        try:
            return self.fn(task)
        finally:
            self.busy_seconds += time.perf_counter() - began

    def _died(self, task: Any) -> WorkerError:
        self.close(force=True)
        return WorkerError(f"a worker process died while running {task!r} (killed, or out of memory?); "
                           "rerun with workers=1 to see the error in-process")

    def close(self, force: bool = False) -> None:
        """Stop the workers; with ``force`` they are killed at once (errors, Ctrl-C)."""
        pool, self._pool = self._pool, []
        for worker in pool:
            if force:
                worker.process.kill()
            else:
                with contextlib.suppress(OSError):
                    worker.conn.send(_STOP)
        for worker in pool:
            worker.process.join(timeout=None if force else 5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        torch.set_num_threads(self._previous_threads)

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(force=exc_type is not None)
