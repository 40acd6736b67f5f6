"""fedbabu on Flower 1.41, in-process: the strategy and the ClientApp wired by a loopback grid.

Deterministic configurations (fixed seed, one thread per client, replies averaged in client order)
make the Flower runs *bit-identical* to the in-process simulator, so the tests compare with
``torch.equal`` rather than a tolerance. The Ray simulation and the real processes are in
``test_flower_ray.py`` and ``test_flower_deployment.py``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import weakref
import zipfile
from pathlib import Path

import pytest
import torch
from flower_support import initial_head, initial_model, read_clients, read_records, simulator_run, small_config
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore.task_identity import TaskIdentity

import fedbabu
from fedbabu.algorithms import ALGORITHMS, Algorithm
from fedbabu.config import Config
from fedbabu.data.datasets import load_digits
from fedbabu.engine.faults import TrainingDiverged
from fedbabu.engine.round import MEASURED_KEYS
from fedbabu.engine.simulation import network
from fedbabu.errors import UserError
from fedbabu.files import load_tensors
from fedbabu.flower import client as node_app
from fedbabu.flower.certs import make_credentials
from fedbabu.flower.client import app as client_app
from fedbabu.flower.launch import flower_env, stop, stop_reason
from fedbabu.flower.server import AlgorithmStrategy, run_on_grid
from fedbabu.flower.wire import experiment_record
from fedbabu.models import in_parts, norm_parameters
from fedbabu.runner import partition_for, run_experiment

pytestmark = pytest.mark.flower


class LoopbackGrid(Grid):
    """Delivers each message to the ClientApp in this process; one persistent Context per node.

    It exercises the real strategy and ClientApp code (records, message types, ``context.state``)
    without processes, so exact equality with the simulator is cheap to check. As Flower does, an
    exception in the ClientApp becomes an error reply. The train replies of the nodes in
    ``poisoned`` have every shared value replaced by NaN (a broken device); those of the nodes in
    ``truncated`` lack one of the shared tensors (a client built for another model).
    """

    def __init__(self, num_clients: int) -> None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.contexts = {
            7000 + i: Context(run_id=1, node_id=7000 + i, state=RecordDict(), run_config={},
                              node_config={"partition-id": i, "num-partitions": num_clients})
            for i in range(num_clients)
        }
        self.sent: list[Message] = []
        self.poisoned: set[int] = set()
        self.truncated: set[int] = set()

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
            node = message.metadata.dst_node_id
            try:
                reply = client_app(message, self.contexts[node])
            except Exception as err:
                error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err)}:<'{err}'>")
                replies.append(Message(error, reply_to=message))
                continue
            if message.metadata.message_type == "train" and node in self.poisoned | self.truncated:
                arrays = reply.content["arrays"].to_torch_state_dict()
                if node in self.poisoned:
                    arrays = {k: torch.full_like(v, math.nan) for k, v in arrays.items()}
                if node in self.truncated:
                    arrays = dict(list(arrays.items())[1:])
                reply.content["arrays"] = ArrayRecord(arrays)
            replies.append(reply)
        return replies


def assert_same_records(flower: list[dict], simulator: list[dict]) -> None:
    """The two engines' round records: the same fields with the same values, but for what measures one
    execution (time, the wire); accuracies to float rounding, the rest exactly."""
    assert len(flower) == len(simulator)
    for ours, theirs in zip(flower, simulator, strict=True):
        ours = {k: v for k, v in ours.items() if k not in MEASURED_KEYS}
        theirs = {k: v for k, v in theirs.items() if k not in MEASURED_KEYS}
        assert ours.keys() == theirs.keys()
        for key, value in ours.items():
            if key in ("train_loss", "test_accuracy"):
                written = math.nan if value is None else value  # metrics.jsonl writes NaN as null
                assert written == pytest.approx(theirs[key], abs=1e-9, nan_ok=True), key
            else:
                assert value == theirs[key], key


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


def loopback_equals_simulator(config, tmp_path: Path):
    """Run ``config`` on three loopback nodes, check its model and records are the simulator's; (summary, records)."""
    summary = run_on_grid(LoopbackGrid(3), config, tmp_path, min_nodes=3, timeout=60)
    reference = simulator_run(config)
    state = load_tensors(tmp_path / "model.pt")
    for name, tensor in reference.final_state.items():
        assert torch.equal(state[name], tensor), name
    records = read_records(tmp_path)
    assert_same_records(records, reference.metrics)
    return summary, records


def test_loopback_run_with_dp_equals_the_simulator_bit_for_bit(tmp_path: Path) -> None:
    """DP is written once (engine.round): the same clipped, noised model, epsilon and early stop in both engines."""
    from fedbabu.engine import privacy

    dp = ["dp.noise_multiplier=0.5", "dp.clipping_norm=0.5", "rounds=3", "eval_every=1"]
    target = sum(privacy.epsilon(small_config(*dp), t) for t in (2, 3)) / 2
    config = small_config(*dp, f"dp.target_epsilon={target!r}")
    summary, records = loopback_equals_simulator(config, tmp_path)
    assert len(records) == 2 and records[-1]["epsilon"] == privacy.epsilon(config, 2) <= target
    assert summary["privacy"]["epsilon"] == records[-1]["epsilon"]
    assert "stopped after 2 of 3 rounds" in summary["privacy"]["stopped_early"]


def test_loopback_run_with_poisson_sampling_and_adaptive_clipping_equals_the_simulator(tmp_path: Path) -> None:
    """The Poisson sample and the adapted norm are the round policy's too, so both engines follow them."""
    config = small_config("dp.noise_multiplier=0.5", "dp.clipping_norm=0.05", "dp.sampling=poisson",
                          "dp.adaptive_clipping=true", "dp.clipped_count_stddev=1.0", "rounds=3", "eval_every=3")
    _, records = loopback_equals_simulator(config, tmp_path)
    assert len({r["clipping_norm"] for r in records}) == 3


@pytest.mark.parametrize("personalize_clients", ["2", "1"])
def test_sampled_evaluation_and_personalization_equal_the_simulators(personalize_clients: str,
                                                                     tmp_path: Path) -> None:
    """The simulator's seeded samples: evaluated in the rounds, personalized at the end. With 2 personalized
    the 2 evaluated clients are among them and the last test is the personalization's; with 1 it is not, and
    the last round is evaluated like the others."""
    config = small_config("algorithm=fedper", "rounds=3", "eval_every=2", "eval_clients=2",
                          f"personalize_clients={personalize_clients}", "finetune.epochs=1")
    grid = LoopbackGrid(3)
    summary = run_on_grid(grid, config, tmp_path, min_nodes=3, timeout=60)
    reference = simulator_run(config)
    rows = read_clients(tmp_path)
    assert [int(row["client"]) for row in rows] == [c["client"] for c in reference.clients]
    assert len(rows) == int(personalize_clients) and summary["personalized_clients"] == int(personalize_clients)
    curves = [[float(v) for v in list(row.values())[4:]] for row in rows]
    assert curves == [pytest.approx(c["accuracies"], abs=1e-6) for c in reference.clients]
    records = read_records(tmp_path)
    assert [r.get("test_accuracy") for r in records] == pytest.approx(
        [m.get("test_accuracy") for m in reference.metrics], abs=1e-6)
    evaluated = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert len(evaluated) == 2 * (1 if personalize_clients == "2" else 2)


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
    ``context.state`` and never travel, so only a run without them can be analyzed from its folder."""
    config = small_config(f"algorithm={algorithm}", "rounds=2", "finetune.epochs=1")
    grid = LoopbackGrid(3)
    run_on_grid(grid, config, tmp_path, min_nodes=3, timeout=60)
    reference = simulator_run(config)
    state = load_tensors(tmp_path / "model.pt")
    for name, tensor in reference.final_state.items():
        assert torch.equal(state[name], tensor), name
    assert_same_records(read_records(tmp_path), reference.metrics)
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
    if ALGORITHMS[algorithm].collaborate is not Algorithm.collaborate:  # the server's values reached the nodes
        assert any("server-personal" in m.content.array_records for m in grid.sent)
    shared = ALGORITHMS[algorithm].shared_parts
    sent = {name for m in grid.sent for name in m.content.array_records.get("arrays", {})}
    norms = norm_parameters(network(config, load_digits()))
    assert all(in_parts(name, shared, norms) for name in sent)
    if personal_parts:
        with pytest.raises(UserError, match="stay on the nodes"):
            fedbabu.analyze(tmp_path, workers=1, progress=False)
    else:
        analyzed = fedbabu.analyze(tmp_path, workers=1, progress=False).runs[0]
        assert analyzed["reproduces_run"] == {"checked": True, "identical_clients": 3, "clients": 3}


def test_the_strategy_is_a_plain_flower_strategy_and_forwards_the_config_it_is_given(tmp_path: Path) -> None:
    """What a Flower strategy wrapper or the deployment puts in the train/evaluate config reaches the
    clients beside the experiment (a client mod reads it there), and no reply depends on it."""
    config = small_config("rounds=2", "eval_every=1", "finetune.epochs=0")
    assert not issubclass(AlgorithmStrategy, FedAvg) and issubclass(AlgorithmStrategy, Strategy)
    dataset = load_digits()
    strategy = AlgorithmStrategy(config, network(config, dataset), min_nodes=3, timeout=60)
    grid = LoopbackGrid(3)
    strategy.start(grid, strategy.initial_arrays(), num_rounds=2, timeout=60,
                   train_config=ConfigRecord({"clipping_norm": 0.5, "lr": 123.0}),
                   evaluate_config=ConfigRecord({"note": "from the deployment"}))
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    evaluate = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert len(train) == 6 and len(evaluate) == 3, "the last round's test is the personalization's"
    assert all(m.content["config"]["clipping_norm"] == 0.5 for m in train)
    assert [m.content["config"]["lr"] for m in train] == [config.lr_at(0)] * 3 + [config.lr_at(1)] * 3, \
        "the round's own entries win"
    assert all(m.content["config"]["note"] == "from the deployment" for m in evaluate)
    reference = simulator_run(config)
    for name, tensor in reference.final_state.items():
        assert torch.equal(strategy.final_state()[name], tensor), name


@pytest.mark.parametrize("algorithm", ["local", "lg_fedavg"])
def test_who_trains_and_the_initial_model_follow_the_algorithm_as_in_the_simulator(algorithm: str,
                                                                                  tmp_path: Path) -> None:
    """Local training trains every node in every round whatever the sampling; LG-FedAvg starts from its
    warm start on the server and on every node (the bodies, which never travel, too)."""
    overrides = [f"algorithm={algorithm}", "client_fraction=0.34", "finetune.epochs=1"]
    if algorithm == "lg_fedavg":
        run_experiment(small_config("algorithm=fedavg", "rounds=1", "workers=1"), tmp_path / "fedavg")
        overrides.append(f"lg_fedavg.warm_start={tmp_path / 'fedavg'}")
    config = small_config(*overrides)
    grid = LoopbackGrid(3)
    run_on_grid(grid, config, tmp_path / "flower", min_nodes=3, timeout=60)
    reference = simulator_run(config)
    taking_part = [r["clients"] for r in read_records(tmp_path / "flower")]
    assert taking_part == [m["clients"] for m in reference.metrics]
    assert [len(clients) for clients in taking_part] == ([3, 3] if algorithm == "local" else [1, 1])
    state = load_tensors(tmp_path / "flower" / "model.pt")
    for name, tensor in reference.final_state.items():
        assert torch.equal(state[name], tensor), name
    curves = [[float(v) for v in list(row.values())[4:]] for row in read_clients(tmp_path / "flower")]
    assert curves == [pytest.approx(c["accuracies"], abs=1e-6) for c in reference.clients]


class EvaluationLost(LoopbackGrid):
    """Loses the evaluate messages to the nodes in ``lost``: they never reach the node, which is answered by an
    error instead (a node that vanished for a moment)."""

    def __init__(self, num_clients: int, lost: set[int]) -> None:
        super().__init__(num_clients)
        self.lost = lost

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        lost = [m for m in messages if m.metadata.message_type == "evaluate" and m.metadata.dst_node_id in self.lost]
        replies = super().send_and_receive([m for m in messages if m not in lost], timeout=timeout)
        for message in lost:
            message.metadata.__dict__["_message_id"] = message.object_id
            self.sent.append(message)
            replies.append(Message(Error(ErrorCode.NODE_UNAVAILABLE, "lost"), reply_to=message))
        return replies


def test_the_servers_collaboration_reaches_a_node_that_missed_a_message(tmp_path: Path) -> None:
    """FedPAC's mixed classifier goes with a client's next message and again until the client answers one: a node
    whose evaluation was lost gets it with its next round and trains from it, as in the simulator."""
    config = small_config("algorithm=fedpac", "eval_every=1", "finetune.epochs=1")
    grid = EvaluationLost(3, lost={7001})
    run_on_grid(grid, config, tmp_path, min_nodes=3, timeout=60)

    def carried(node: int) -> list[tuple[str, bool]]:
        return [(m.metadata.message_type, "server-personal" in m.content.array_records) for m in grid.sent
                if m.metadata.dst_node_id == node and m.metadata.message_type != "query"]

    assert carried(7000) == [("train", False), ("evaluate", True), ("train", False), ("evaluate.personalize", True)]
    assert carried(7001) == [("train", False), ("evaluate", True), ("train", True), ("evaluate.personalize", True)]
    reference = simulator_run(config)
    state = load_tensors(tmp_path / "model.pt")
    assert all(torch.equal(state[name], tensor) for name, tensor in reference.final_state.items())
    for i, context in enumerate(grid.contexts.values()):
        personal = context.state.array_records["personal"].to_torch_state_dict()
        assert all(torch.equal(t, torch.from_numpy(reference.personal[i][n])) for n, t in personal.items()), i


def test_node_with_wrong_partition_count_is_refused_and_the_run_goes_on(tmp_path: Path) -> None:
    """The node's ClientApp refuses the query (an error reply, as on Flower); the server records the refusal,
    never sends the node work, and the run equals the simulator's without it."""
    config = small_config()
    grid = LoopbackGrid(3)
    grid.contexts[9999] = Context(run_id=1, node_id=9999, node_config={"partition-id": 0, "num-partitions": 5},
                                  state=RecordDict(), run_config={})
    summary = run_on_grid(grid, config, tmp_path, min_nodes=3, timeout=60)
    refusals = summary["flower"]["failures"]
    assert [(f["stage"], f["node"]) for f in refusals] == [("query", 9999)]
    assert "num-partitions=5 but the experiment has num_clients=3" in refusals[0]["reason"]
    assert [m.metadata.message_type for m in grid.sent if m.metadata.dst_node_id == 9999] == ["query"]
    assert [r["clients"] for r in read_records(tmp_path)] == [[0, 1, 2], [0, 1, 2]]
    assert summary["flower"]["clients_personalized"] == 3
    state = load_tensors(tmp_path / "model.pt")
    for name, tensor in simulator_run(config).final_state.items():
        assert torch.equal(state[name], tensor), name


def test_nan_update_is_rejected_counted_and_the_model_stays_finite(tmp_path: Path) -> None:
    """Client 1 returns NaN every round: screened out by the simulator's rules, logged, counted; its
    personal head (FedPer) is never kept, since none of its updates was accepted."""
    config = small_config("algorithm=fedper", "eval_every=1")
    grid = LoopbackGrid(3)
    grid.poisoned = {7001}
    summary = run_on_grid(grid, config, tmp_path, min_nodes=3, timeout=60)
    records = read_records(tmp_path)
    assert [r["rejected"] for r in records] == [1, 1]
    assert [r["clients"] for r in records] == [[0, 1, 2], [0, 1, 2]]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["test_accuracy"]) for r in records)
    assert [(r["round"], r["client"]) for r in summary["flower"]["rejected"]] == [(1, 1), (2, 1)]
    assert all("non-finite" in r["reason"] for r in summary["flower"]["rejected"])
    assert "round 1: rejected the update of client 1: non-finite" in (tmp_path / "events.log").read_text()
    state = load_tensors(tmp_path / "model.pt")
    assert all(torch.isfinite(t).all() for t in state.values())
    body = [name for name in state if name.startswith("body.")]
    assert any(not torch.equal(state[n], initial_model(config)[n]) for n in body)
    kept = {i: "personal" in ctx.state.array_records for i, ctx in enumerate(grid.contexts.values())}
    assert kept == {0: True, 1: False, 2: True}


def test_malformed_reply_is_rejected_with_its_reason_and_the_others_aggregated(tmp_path: Path) -> None:
    """A reply that lacks a shared tensor cannot be decoded: it is refused like a NaN update, not a crash."""
    config = small_config("eval_every=1", "rounds=1", "finetune.epochs=0")
    grid = LoopbackGrid(3)
    grid.truncated = {7002}
    summary = run_on_grid(grid, config, tmp_path, min_nodes=3, timeout=60)
    (record,) = read_records(tmp_path)
    assert record["rejected"] == 1 and math.isfinite(record["train_loss"])
    (rejection,) = summary["flower"]["rejected"]
    assert (rejection["round"], rejection["client"]) == (1, 2)
    assert rejection["reason"].startswith("malformed reply")
    assert "round 1: rejected the update of client 2: malformed reply" in (tmp_path / "events.log").read_text()
    state = load_tensors(tmp_path / "model.pt")
    assert any(not torch.equal(state[n], t) for n, t in initial_model(config).items())


def test_every_update_nan_stops_the_run_with_the_simulator_message(tmp_path: Path) -> None:
    grid = LoopbackGrid(3)
    grid.poisoned = set(grid.contexts)
    message = r"round 1: training diverged \(every client update of the round held NaN or inf\)"
    with pytest.raises(TrainingDiverged, match=message):
        run_on_grid(grid, small_config(), tmp_path, min_nodes=3, timeout=60)
    assert "ERROR round 1: training diverged" in (tmp_path / "events.log").read_text()
    assert stop_reason(tmp_path) == ("round 1: training diverged (every client update of the round held NaN or "
                                     "inf); lower lr or check the data")


def test_max_update_norm_rejects_large_updates_and_keeps_the_model(tmp_path: Path) -> None:
    config = small_config("max_update_norm=1e-6", "rounds=1", "finetune.epochs=0")
    summary = run_on_grid(LoopbackGrid(3), config, tmp_path, min_nodes=3, timeout=60)
    (record,) = read_records(tmp_path)
    assert record["rejected"] == 3 and record["train_loss"] is None
    assert all("exceeds max_update_norm 1e-06" in r["reason"] for r in summary["flower"]["rejected"])
    state = load_tensors(tmp_path / "model.pt")
    for name, tensor in initial_model(config).items():
        assert torch.equal(state[name], tensor), name


def test_client_failure_rate_drops_the_simulators_clients(tmp_path: Path) -> None:
    """The same seeded dropouts as ``fedbabu run``: same counts per round, same final model, bit for bit."""
    config = small_config("algorithm=fedper", "client_failure_rate=0.5", "rounds=3", "eval_every=1")
    grid = LoopbackGrid(3)
    summary = run_on_grid(grid, config, tmp_path, min_nodes=3, timeout=60)
    reference = simulator_run(config)
    records = read_records(tmp_path)
    assert [r["dropped"] for r in records] == [m["dropped"] for m in reference.metrics]
    assert 0 < sum(r["dropped"] for r in records) < 9
    rounds = [m.content["config"]["round-index"] for m in grid.sent if m.metadata.message_type == "train"]
    trained = [rounds.count(i) for i in range(3)]
    assert trained == [3 - r["dropped"] for r in records]
    state = load_tensors(tmp_path / "model.pt")
    for name, tensor in reference.final_state.items():
        assert torch.equal(state[name], tensor), name
    assert [r["test_accuracy"] for r in records] == pytest.approx([m["test_accuracy"] for m in reference.metrics])
    assert summary["flower"]["failures"] == []


def test_server_waits_for_nodes_only_until_the_round_timeout(tmp_path: Path) -> None:
    """Node 2 never connects: after the deadline the run goes on with two nodes and records the shortfall."""
    grid = LoopbackGrid(3)
    del grid.contexts[7002]
    started = time.monotonic()
    summary = run_on_grid(grid, small_config(), tmp_path, min_nodes=3, timeout=0.5)
    assert time.monotonic() - started < 30
    connect = [f for f in summary["flower"]["failures"] if f["stage"] == "connect"]
    assert [f["reason"] for f in connect] == [
        "only 2 of the 3 nodes waited for (min-nodes) connected within 0.5 s; going on with them"]
    records = read_records(tmp_path)
    assert [r["clients"] for r in records] == [[0, 1, 2], [0, 1, 2]], "the sampled clients, as in the simulator"
    assert [r["failed"] for r in records] == [[2], [2]]
    assert summary["flower"]["clients_personalized"] == 2


def test_server_without_any_node_stops_with_one_line(tmp_path: Path) -> None:
    grid = LoopbackGrid(3)
    grid.contexts.clear()
    started = time.monotonic()
    with pytest.raises(UserError, match=r"^no SuperNode serving a client connected within 0.3 s \(round-timeout\)"):
        run_on_grid(grid, small_config(), tmp_path, min_nodes=3, timeout=0.3)
    assert time.monotonic() - started < 5


def test_node_keeps_only_its_own_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    """After cutting the seeded partition the node holds its client's samples and no reference to the rest."""
    import fedbabu.runner

    config = small_config()
    full: list[weakref.ref] = []
    read = fedbabu.runner.prepare_data

    def watched(cfg: Config):
        dataset = read(cfg)
        full.extend(weakref.ref(t) for t in (dataset.train_x, dataset.train_y, dataset.test_x, dataset.test_y))
        return dataset

    monkeypatch.setattr(fedbabu.runner, "prepare_data", watched)
    monkeypatch.setattr(node_app, "_SHARES", {})
    monkeypatch.setattr(node_app, "_WHOLE", {})
    grid = LoopbackGrid(3)
    message = Message(RecordDict({"config": experiment_record(config)}), 7001, "evaluate")
    data = node_app.client_for(message, grid.contexts[7001]).data
    gc.collect()
    assert len(full) == 4 and all(ref() is None for ref in full), "the full dataset is still referenced"
    digits = load_digits()
    partition = partition_for(config, digits)
    share = data.dataset
    assert list(node_app._SHARES.values()) == [share]
    train, test = partition.train[1], partition.test[1]
    assert (share.train_x.shape[0], share.test_x.shape[0]) == (len(train), len(test)) == (data.num_train, data.num_test)
    assert share.train_x.shape[0] < digits.train_x.shape[0]
    assert torch.equal(share.train_x, digits.train_x[torch.as_tensor(train)])
    assert torch.equal(share.train_y, digits.train_y[torch.as_tensor(train)])
    assert torch.equal(share.test_x, digits.test_x[torch.as_tensor(test)])
    assert torch.equal(share.test_y, digits.test_y[torch.as_tensor(test)])


def test_a_process_serving_several_clients_reads_the_dataset_twice_not_per_client(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As a simulation-engine worker does: six virtual clients in one process, each with its own share."""
    import fedbabu.runner

    config = small_config("num_clients=6")
    reads: list[int] = []
    read = fedbabu.runner.prepare_data

    def counted(cfg: Config):
        reads.append(1)
        return read(cfg)

    monkeypatch.setattr(fedbabu.runner, "prepare_data", counted)
    monkeypatch.setattr(node_app, "_SHARES", {})
    monkeypatch.setattr(node_app, "_WHOLE", {})
    grid = LoopbackGrid(6)
    message = Message(RecordDict({"config": experiment_record(config)}), 7001, "evaluate")
    shares = {node: node_app.client_for(message, context).data.dataset for node, context in grid.contexts.items()}
    for node, context in grid.contexts.items():
        assert node_app.client_for(message, context).data.dataset is shares[node]
    assert len(reads) == 2
    digits = load_digits()
    partition = partition_for(config, digits)
    for node, context in grid.contexts.items():
        client = int(context.node_config["partition-id"])
        assert torch.equal(shares[node].train_x, digits.train_x[torch.as_tensor(partition.train[client])])
        assert torch.equal(shares[node].test_y, digits.test_y[torch.as_tensor(partition.test[client])])


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


def test_stop_kills_a_descendant_in_its_own_session_that_ignores_sigterm(tmp_path: Path) -> None:
    """Like the SuperExec a SuperLink starts: a group signal misses it, so ``stop`` finds it by parent PID."""
    script = ("import signal, subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(120)'], "
              "start_new_session=True, stdout=subprocess.PIPE)\n"
              "child.stdout.readline()\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    child = int(parent.stdout.readline())
    try:
        assert os.getsid(child) == child != os.getsid(parent.pid)
        started = time.monotonic()
        stop(parent, grace=1, group=True)
        assert parent.returncode == -signal.SIGTERM
        stat = Path(f"/proc/{child}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        assert time.monotonic() - started < 5
    finally:
        parent.stdout.close()
        for pid in (parent.pid, child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.wait()


def test_the_flower_app_bundle_ships_the_package_without_the_results_page():
    """`flwr run` bundles the project folder for every SuperNode; the trained runs kept for the
    results page (megabytes of summaries and metrics) have no business there."""
    from flwr.cli.build import build_fab_from_disk

    project = Path(__file__).resolve().parents[1]
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(project))).namelist()
    assert "src/fedbabu/flower/server.py" in names and "src/fedbabu/flower/client.py" in names
    assert any(name.startswith("configs/") for name in names)
    assert not [name for name in names if name.split("/")[0] in {"docs", "tests", "benchmarks", "examples"}]
