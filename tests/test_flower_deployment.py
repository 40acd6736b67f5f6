"""fedbabu on real Flower processes: a TLS SuperLink with node authentication and its SuperNodes.

Every process is started here by PID on 127.0.0.1 with its own FLWR_HOME and stopped in teardown;
the runs are compared bit for bit with the in-process simulator.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flower_support import REPO, SMALL, read_clients, simulator_run, small_config

from fedbabu.files import load_tensors
from fedbabu.flower.certs import make_credentials
from fedbabu.flower.launch import flower_env, free_port, stop, wait_for_port

pytestmark = pytest.mark.flower


class Deployment:
    """A TLS SuperLink with SuperNode authentication and its nodes, all on 127.0.0.1, all stopped by PID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "flwr-home"
        self.home.mkdir()
        self.env = flower_env(self.home)
        self.creds = make_credentials(root / "certs", nodes=5)
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []
        self.good: list[subprocess.Popen] = []
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "tls"\n\n[superlink.tls]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.creds.ca_cert}"\n')

    def _start(self, command: list[str], log_name: str) -> subprocess.Popen:
        with (self.root / log_name).open("wb") as log:
            process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, cwd=self.root)
        self.processes.append(process)
        return process

    def start_superlink(self) -> None:
        link = self._start(["flower-superlink", "--host", "127.0.0.1", "--port", str(self.port),
                            "--ssl-ca-certfile", str(self.creds.ca_cert), "--ssl-certfile", str(self.creds.server_cert),
                            "--ssl-keyfile", str(self.creds.server_key), "--enable-supernode-auth",
                            "--disable-runtime-dependency-installation", "--database", str(self.root / "link.db")],
                           "superlink.log")
        wait_for_port(self.port, link, "flower-superlink")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True, cwd=REPO,
                              timeout=timeout)

    def register(self, node: int) -> None:
        done = self.flwr("supernode", "register", str(self.creds.public_key(node)), "tls")
        assert done.returncode == 0, done.stdout + done.stderr

    def start_node(self, node: int, partition: int, *, key: bool = True, insecure: bool = False,
                   max_wait: int = 20) -> subprocess.Popen:
        command = ["flower-supernode", "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
                   "--node-config", f"partition-id={partition} num-partitions=3", "--max-retries", "3",
                   "--max-wait-time", str(max_wait)]
        command += ["--insecure"] if insecure else ["--root-certificates", str(self.creds.ca_cert)]
        if key:
            command += ["--auth-supernode-private-key", str(self.creds.node_keys[node])]
        return self._start(command, f"node-{node}.log")

    def online_nodes(self) -> int:
        done = self.flwr("supernode", "list", "tls", "--format", "json")
        try:
            nodes = json.loads(done.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return 0
        return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")

    def wait_online(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.online_nodes() < count:
            assert time.monotonic() < deadline, f"fewer than {count} nodes online after {timeout} s"
            time.sleep(1)

    def run(self, out: Path, log_name: str, *run_config: str) -> subprocess.Popen:
        """``flwr run`` of the repository's app (pyproject [tool.flwr.app]), streaming to a log."""
        config = " ".join([f"out='{out}'", *run_config])
        return self._start(["flwr", "run", str(REPO), "tls", "--stream", "--run-config", config], log_name)

    def status(self) -> str:
        runs = json.loads(self.flwr("ls", "tls", "--format", "json").stdout)["runs"]
        return str(runs[-1]["status"])

    def log(self, name: str) -> str:
        return (self.root / name).read_text(errors="replace")

    def close(self) -> None:
        """SIGTERM each process group, SIGKILL after 10 s; descendants in other sessions (the SuperExec) too."""
        for process in reversed(self.processes):
            stop(process, grace=10, group=True)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One SuperLink and three registered SuperNodes (clients 0, 1, 2) shared by the deployment tests.

    The killed-node test must stay last in this file: it takes client 2 away.
    """
    federation = Deployment(tmp_path_factory.mktemp("deployment"))
    try:
        federation.start_superlink()
        for node in range(3):
            federation.register(node)
        federation.good = [federation.start_node(node, partition=node) for node in range(3)]
        federation.wait_online(3)
        yield federation
    finally:
        federation.close()


@pytest.mark.slow
def test_real_deployment_tls_auth_equals_the_simulator(deployment: Deployment, tmp_path: Path) -> None:
    plaintext = deployment.start_node(3, partition=0, key=False, insecure=True, max_wait=3)
    unregistered = deployment.start_node(4, partition=1, max_wait=3)
    out = tmp_path / "out"
    run = deployment.run(out, "run-equal.log", f"set='{' '.join(SMALL)}'", "round-timeout=120.0")
    assert run.wait(400) == 0, deployment.log("run-equal.log")
    assert deployment.status() == "finished:completed", deployment.log("run-equal.log")

    assert plaintext.wait(60) != 0 and unregistered.wait(60) != 0
    assert "[code: 2004] Failed to activate SuperNode" in deployment.log("node-4.log")
    assert "No SuperNode found with the given public key" in deployment.log("superlink.log")
    assert "Connection attempt failed" in deployment.log("node-3.log")
    assert all(node.poll() is None for node in deployment.good)
    assert deployment.online_nodes() == 3

    config = small_config()
    reference = simulator_run(config)
    state = load_tensors(out / "model.pt")
    for name, tensor in reference.final_state.items():
        assert torch.equal(state[name], tensor), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flower"]["failures"] == []
    assert summary["flower"]["clients_personalized"] == 3
    assert summary["personalized_accuracy"]["mean"] == pytest.approx(
        float(sum(c["accuracies"][-1] for c in reference.clients) / 3), abs=1e-12)
    rows = read_clients(out)
    assert [int(r["client"]) for r in rows] == [0, 1, 2]
    for name in ("config.yaml", "partition.json", "metrics.jsonl", "report.md"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
def test_killed_supernode_run_completes_with_the_rest(deployment: Deployment, tmp_path: Path) -> None:
    deployment.wait_online(3)
    out = tmp_path / "out"
    run = deployment.run(out, "run-kill.log", f"set='{' '.join(SMALL)}'", "min-nodes=2", "round-timeout=150.0")
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert time.monotonic() < deadline and run.poll() is None, deployment.log("run-kill.log")
        time.sleep(0.5)
    victim = deployment.good[2]
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert run.wait(400) == 0, deployment.log("run-kill.log")
    assert deployment.status() == "finished:completed", deployment.log("run-kill.log")

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["clients"] for r in records] == [[0, 1, 2], [0, 1, 2]], "the sampled clients, as in the simulator"
    assert records[0]["failed"] == [] and records[1]["failed"] == [2]
    summary = json.loads((out / "summary.json").read_text())
    failed_clients = {f["client"] for f in summary["flower"]["failures"]}
    assert failed_clients == {2}
    assert summary["flower"]["clients_personalized"] == 2
    rows = read_clients(out)
    assert math.isnan(float(rows[2]["initial_accuracy"]))
    assert not math.isnan(float(rows[0]["initial_accuracy"]))
    assert 0.0 < summary["personalized_accuracy"]["mean"] <= 1.0

