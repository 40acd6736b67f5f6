"""Shared fixtures: the real datasets (built or located once) and small federations on digits."""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedbabu.algorithms import ALGORITHMS
from fedbabu.engine.simulation import Observer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
CACHE = ROOT / ".cache" / "datasets"
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


LONGEST_FIRST = ("test_flower_deployment.py", "test_flower_ray.py", "test_reproduce.py", "test_baselines.py",
                 "test_checkpoint.py")
"""Files that take minutes, handed to the test workers first (whole files go to one worker) so that
none of them starts last and leaves the other worker idle."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file, and among the other files, is kept


def _absent(reason: str) -> None:
    """Real-data tests skip on a user's machine without the data, but never in CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must have the real data)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """CIFAR-10 in the official python layout, built once from the offline JPEG copy into .cache/."""
    folder = CACHE / "cifar-10-batches-py"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the test workers share one cache: one builds, the others wait
        if not (folder / "test_batch").exists():
            script = SHARED / "build_cifar10.py"
            if not script.exists():
                _absent(f"CIFAR-10 not built and {script} is absent")
            subprocess.run([sys.executable, str(script), str(CACHE)], check=True, capture_output=True)
    return folder


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        _absent(f"Fashion-MNIST not installed at {FMNIST_DIR} (apt-get install dataset-fashion-mnist)")
    return FMNIST_DIR


@pytest.fixture(scope="session")
def digits():
    from fedbabu.data.datasets import load_digits

    return load_digits()


@pytest.fixture
def one_thread():
    """One torch thread, as the engine's worker processes compute: references computed in the test
    process then match the engine's bit for bit (and busy cores are not oversubscribed)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def same(a: dict, b: dict) -> bool:
    """Two states hold the same names and bit-identical tensors."""
    import torch

    return a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def run(config, digits):
    """A simulated run of ``config`` on its seeded partition of the digits."""
    from fedbabu.engine.simulation import simulate
    from fedbabu.runner import partition_for

    return simulate(config, digits, partition_for(config, digits))


def five_clients(algorithm: str, **overrides):
    """Five digits clients, all sampled every round, two rounds of one local epoch, one fine-tuning epoch:
    an algorithm's own tests run it in about two seconds."""
    from fedbabu.config import DIGITS_DEFAULT, build_config

    values = {**DIGITS_DEFAULT, "algorithm": algorithm, "num_clients": 5, "rounds": 2, "client_fraction": 1.0,
              "local_epochs": 1, "eval_every": 0, "workers": 1,
              "finetune": {**DIGITS_DEFAULT["finetune"], "epochs": 1}}
    values.update(overrides)
    return build_config(values)


def model_for(config, digits):
    """The run's network at its seeded initial weights, as every party builds it."""
    from fedbabu.engine.simulation import client_model, runtime_for

    return client_model(config, digits, runtime_for(config))


def client_data(config, digits, client: int):
    """One client's data of the config's partition, as a worker sees it."""
    from fedbabu.engine.simulation import runtime_for
    from fedbabu.runner import partition_for
    from fedbabu.training import ClientData

    partition = partition_for(config, digits)
    return ClientData(digits, partition.train[client], partition.test[client], runtime_for(config))


def small_config(**overrides):
    """A digits federation that trains in about a second."""
    from fedbabu.config import DIGITS_DEFAULT, build_config

    values = {**DIGITS_DEFAULT, "num_clients": 10, "rounds": 6, "client_fraction": 0.5, "eval_every": 3,
              "workers": 1, "finetune": {**DIGITS_DEFAULT["finetune"], "epochs": 2}}
    for key, value in overrides.items():
        if key == "finetune":
            values["finetune"] = {**values["finetune"], **value}
        else:
            values[key] = value
    return build_config(values)


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file below a folder with its content hash: equal fingerprints mean nothing was written there."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class StopAtRound(Observer):
    """Raises Ctrl-C's exception when a given round is reported (an interrupted run, in-process)."""

    def __init__(self, round_number: int) -> None:
        self.round_number = round_number

    def on_round(self, record):
        if record["round"] == self.round_number:
            raise KeyboardInterrupt


def ctrl_c_as_in_a_terminal() -> None:
    """For ``preexec_fn`` of a run that a test stops with SIGINT: a suite started in the background
    (``make test &``) ignores SIGINT, the child inherits that, and Python installs its Ctrl-C
    handler only where SIGINT is not ignored at start-up."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module", params=sorted(ALGORITHMS))
def contract_reference(request, digits, tmp_path_factory):
    """One uninterrupted one-worker run of each registered algorithm, made once per test file that asks
    (so the contract files, which the suite's two workers take one each, share nothing)."""
    from contract_support import reference_run

    return reference_run(request.param, digits, tmp_path_factory)
