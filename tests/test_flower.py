"""fedbabu on Flower 1.41: in-process strategy checks, the Ray simulation engine, and real processes.

Every Flower process is started here by PID on 127.0.0.1 with its own FLWR_HOME and stopped in
teardown. Deterministic configurations (fixed seed, one thread per client, replies averaged in
client order) make the Flower runs *bit-identical* to the in-process simulator, so the tests
compare with ``torch.equal`` rather than a tolerance.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedbabu.algorithms import ALGORITHMS
from fedbabu.config import Config, load_config
from fedbabu.data.datasets import load_digits
from fedbabu.errors import UserError
from fedbabu.flower.certs import make_credentials
from fedbabu.flower.client import app as client_app
from fedbabu.flower.launch import flower_env, free_port, stop, wait_for_port
from fedbabu.flower.server import run_on_grid
from fedbabu.models import build_model
from fedbabu.results.files import load_tensors
from fedbabu.runner import run_experiment

pytestmark = pytest.mark.flower

REPO = Path(__file__).resolve().parents[1]

SMALL = ["num_clients=3", "partition=dirichlet", "dirichlet_alpha=1.0", "client_fraction=1.0", "rounds=2",
         "local_epochs=1", "eval_every=0", "finetune.epochs=2"]
"""Three clients (one per SuperNode), every client in every round, two rounds, two fine-tuning epochs."""


def small_config(*overrides: str) -> Config:
    return load_config(None, [*SMALL, *overrides])


def simulator_run(config: Config):
    return run_experiment(config.model_copy(update={"workers": 1})).result


def read_clients(folder: Path) -> list[dict[str, str]]:
    with (folder / "clients.csv").open() as handle:
        return list(csv.DictReader(handle))


def initial_head(config: Config) -> dict[str, torch.Tensor]:
    digits = load_digits()
    model = build_model(config.resolved_model(), digits.channels, digits.image_size, digits.num_classes,
                        config.head_init, config.seed)
    return {f"head.{k}": v for k, v in model.head.state_dict().items()}


# --- in-process: the strategy and the ClientApp wired by a loopback grid -----------------------


class LoopbackGrid(Grid):
    """Delivers each message to the ClientApp in this process; one persistent Context per node.

    It exercises the real strategy and ClientApp code (records, message types, ``context.state``)
    without processes, so exact equality with the simulator is cheap to check.
    """

    def __init__(self, num_clients: int) -> None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.contexts = {
            7000 + i: Context(run_id=1, node_id=7000 + i, state=RecordDict(), run_config={},
                              node_config={"partition-id": i, "num-partitions": num_clients})
            for i in range(num_clients)
        }
        self.sent: list[Message] = []

    def set_run(self, run: object) -> None:
        self._run = run

    @property
    def run(self) -> object:
        return self._run

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise AssertionError("the strategy builds its messages itself")

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: object) -> list[str]:
        raise AssertionError("the strategy only uses send_and_receive")

    def pull_messages(self, message_ids: object) -> list[Message]:
        raise AssertionError("the strategy only uses send_and_receive")

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            self.sent.append(message)
            replies.append(client_app(message, self.contexts[message.metadata.dst_node_id]))
        return replies


def test_loopback_run_equals_the_simulator_bit_for_bit(tmp_path: Path) -> None:
    config = small_config("eval_every=1")
    summary = run_on_grid(LoopbackGrid(3), config, tmp_path, min_nodes=3, timeout=60)
    reference = simulator_run(config)
    state = load_tensors(tmp_path / "model.pt")
    assert set(state) == set(reference.final_state)
    for name, tensor in reference.final_state.items():
        assert torch.equal(state[name], tensor), name
    for name, tensor in initial_head(config).items():
        assert torch.equal(state[name], tensor), f"{name} moved"
    curves = [[float(v) for v in list(row.values())[4:]] for row in read_clients(tmp_path)]
    assert curves == [pytest.approx(c["accuracies"], abs=1e-6) for c in reference.clients]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in records] == [[0, 1, 2], [0, 1, 2]]
    assert [r["test_accuracy"] for r in records] == pytest.approx([m["test_accuracy"] for m in reference.metrics])
    assert summary["flower"]["failures"] == []


def _head_bytes(config: Config) -> int:
    from flwr.app import ArrayRecord

    return ArrayRecord(initial_head(config)).count_bytes()


def test_fedbabu_sends_only_the_body_and_fewer_bytes_than_fedavg(tmp_path: Path) -> None:
    figures = {}
    for algorithm in ("fedavg", "fedbabu"):
        config = small_config(f"algorithm={algorithm}", "rounds=1", "finetune.epochs=0")
        grid = LoopbackGrid(3)
        summary = run_on_grid(grid, config, tmp_path / algorithm, min_nodes=3, timeout=60)
        train = [m for m in grid.sent if m.metadata.message_type == "train"]
        names = {name for m in train for name in m.content["arrays"]}
        figures[algorithm] = (summary, names)
    (avg, avg_names), (babu, babu_names) = figures["fedavg"], figures["fedbabu"]
    assert babu_names == {n for n in avg_names if n.startswith("body.")}
    assert avg_names - babu_names == {"head.weight", "head.bias"}
    config = small_config()
    head_floats = sum(t.numel() for t in initial_head(config).values())
    assert avg["bytes_per_round_per_client"] - babu["bytes_per_round_per_client"] == 2 * 4 * head_floats
    head_wire = _head_bytes(config)
    for direction in ("bytes_down", "bytes_up"):
        assert avg["flower"][direction] - babu["flower"][direction] == 3 * head_wire


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_equals_the_simulator_with_personal_state_on_the_node(algorithm: str,
                                                                            tmp_path: Path) -> None:
    """Any registry algorithm: same final model, same personalization curves, same personal state.

    Personal parts (FedPer/FedRep heads, LG-FedAvg bodies, Ditto models) live only in each node's
    ``context.state`` and never travel."""
    config = small_config(f"algorithm={algorithm}", "rounds=2", "finetune.epochs=1")
    grid = LoopbackGrid(3)
    run_on_grid(grid, config, tmp_path, min_nodes=3, timeout=60)
    reference = simulator_run(config)
    state = load_tensors(tmp_path / "model.pt")
    for name, tensor in reference.final_state.items():
        assert torch.equal(state[name], tensor), name
    curves = [[float(v) for v in list(row.values())[4:]] for row in read_clients(tmp_path)]
    assert curves == [pytest.approx(c["accuracies"], abs=1e-6, nan_ok=True) for c in reference.clients]
    personal_parts = ALGORITHMS[algorithm].personal_parts
    for i, context in enumerate(grid.contexts.values()):
        record = context.state.array_records.get("personal")
        if not personal_parts:
            assert record is None
            continue
        personal = record.to_torch_state_dict()
        assert set(personal) == set(reference.personal[i])
        for name, tensor in personal.items():
            assert torch.equal(tensor, torch.from_numpy(reference.personal[i][name])), (i, name)
    shared = set(ALGORITHMS[algorithm].shared_parts)
    sent = {name for m in grid.sent for name in m.content.array_records.get("arrays", {})}
    assert {name.split(".", 1)[0] for name in sent} <= shared


def test_node_with_wrong_partition_count_is_refused(tmp_path: Path) -> None:
    config = small_config()
    grid = LoopbackGrid(3)
    grid.contexts[9999] = Context(run_id=1, node_id=9999, node_config={"partition-id": 0, "num-partitions": 5},
                                  state=RecordDict(), run_config={})
    with pytest.raises(UserError, match="num-partitions=5"):
        run_on_grid(grid, config, tmp_path, min_nodes=3, timeout=60)


def test_certificates_and_keys(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    made = make_credentials(tmp_path, nodes=2, hosts=["10.1.2.3", "server.example"])
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.1.2.3"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "server.example"]
    for i, key_path in enumerate(made.node_keys):
        key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        public = serialization.load_ssh_public_key(made.public_key(i).read_bytes())
        assert public.public_numbers() == key.public_key().public_numbers()
        assert key_path.stat().st_mode & 0o077 == 0
    with pytest.raises(UserError, match="already exists"):
        make_credentials(tmp_path, nodes=1)


def test_flower_sim_refuses_bad_cpus_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "fedbabu", "flower", "sim", "--cpus-per-client", "0", "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, env=flower_env(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --cpus-per-client: expected an integer >= 1 (Flower reserves whole cores), got 0"]


# --- Flower's simulation engine (Ray) -----------------------------------------------------------


@pytest.mark.slow
def test_ray_simulation_fedbabu_four_virtual_clients(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = ["num_clients=4", "partition=shards", "shards_per_client=5", "rounds=2", "client_fraction=1.0",
                 "finetune.epochs=2", "eval_every=1"]
    command = [sys.executable, "-m", "fedbabu", "flower", "sim", "--quiet", "--out", str(out)]
    for override in overrides:
        command += ["--set", override]
    done = subprocess.run(command, capture_output=True, text=True, env=flower_env(tmp_path / "home"), timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr + (out / "flower.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    config = load_config(None, overrides)
    state = load_tensors(out / "model.pt")
    for name, tensor in initial_head(config).items():
        assert torch.equal(state[name], tensor), f"{name} moved"
    assert summary["initial_accuracy"]["mean"] > 0.5  # 5 of 10 classes per client: chance is 0.2
    assert summary["personalized_accuracy"]["mean"] > 0.5
    assert len(read_clients(out)) == 4
    reference = simulator_run(config)
    for name, tensor in reference.final_state.items():
        assert torch.equal(state[name], tensor), name


# --- real processes: SuperLink + SuperNodes with TLS and node authentication ---------------------


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
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            stop(process)


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
    assert [r["clients"] for r in records] == [[0, 1, 2], [0, 1]]
    assert 2 in records[1]["failed"]
    summary = json.loads((out / "summary.json").read_text())
    failed_clients = {f["client"] for f in summary["flower"]["failures"]}
    assert failed_clients == {2}
    assert summary["flower"]["clients_personalized"] == 2
    rows = read_clients(out)
    assert math.isnan(float(rows[2]["initial_accuracy"]))
    assert not math.isnan(float(rows[0]["initial_accuracy"]))
    assert 0.0 < summary["personalized_accuracy"]["mean"] <= 1.0
