"""Client work on a pool of forked worker processes, one torch thread each.

Why processes: on a CPU, two threads in one process never beat one (perf-notes), while two
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
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch


class WorkerError(RuntimeError):
    """A worker process died or failed; the message says which task and why."""


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


def _init_worker(threads: int) -> None:
    """Workers leave Ctrl-C to the parent, and die with it even when it is SIGKILLed (Linux)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6").prctl(pr_set_pdeathsig, signal.SIGKILL)
    tune_process(threads)


class ClientPool:
    """Runs ``fn(task)`` for a list of tasks, in-process (``workers=1``) or on forked workers."""

    def __init__(self, fn: Callable[[Any], Any], workers: int, threads: int = 1) -> None:
        self.fn = fn
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None
        self._previous_threads = torch.get_num_threads()
        tune_process(threads)
        if workers > 1:
            self._executor = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_init_worker,
                initargs=(threads,),
            )

    def map(self, tasks: Sequence[Any]) -> list[Any]:
        """Results in the order of ``tasks``; a dead worker becomes a :class:`WorkerError`, never a hang."""
        if self._executor is None:
            return [self.fn(task) for task in tasks]
        futures = [self._executor.submit(self.fn, task) for task in tasks]
        results = []
        for task, future in zip(tasks, futures, strict=True):
            try:
                results.append(future.result())
            except BrokenProcessPool:
                self.close(force=True)
                raise WorkerError(
                    f"a worker process died while running {task!r} (killed, or out of memory?); "
                    "rerun with workers=1 to see the error in-process"
                ) from None
        return results

    def close(self, force: bool = False) -> None:
        """Stop the workers; with ``force`` they are terminated at once (errors, Ctrl-C)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            processes = list(getattr(executor, "_processes", {}).values())
            if force:
                for process in processes:
                    if process.is_alive():
                        process.terminate()
            executor.shutdown(wait=True, cancel_futures=True)
            for process in processes:
                process.join(timeout=5)
                if process.is_alive():
                    os.kill(process.pid, signal.SIGKILL)
        torch.set_num_threads(self._previous_threads)

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(force=exc_type is not None)
