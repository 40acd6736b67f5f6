"""The Flower ServerApp: the round of :mod:`fedbabu.engine.round`, driven by a Flower (Message API) strategy.

:class:`AlgorithmStrategy` is a :class:`flwr.serverapp.strategy.Strategy` whose hooks deliver the
round the simulator runs, by calling the same policy functions (never a copy of them):

* ``configure_train`` asks :func:`~fedbabu.engine.round.plan_round` which clients train, as partition
  ids (nodes tell the server their partition id once, in a ``query`` message), so a Flower run trains
  the same clients in the same rounds as ``fedbabu run``; the ``config`` Flower hands the hook (a
  strategy wrapper's or a client mod's settings) travels to the clients with the experiment;
* ``aggregate_train`` decodes the replies and hands them to
  :func:`~fedbabu.engine.round.finish_round`: the simulator's screening (NaN/inf, shape, dtype,
  ``max_update_norm``; personal state is not screened here, it never leaves the node), the weighted
  mean of the algorithm's ``shared_parts`` in partition order (whatever order replies arrived in),
  the algorithm's server step and the divergence check; what the algorithm's ``collaborate`` computes
  from the replies' reports (FedPAC's classifiers) goes with each client's next message;
* rounds are evaluated, and after the last round clients personalize (``evaluate.personalize``), on
  the simulator's clients (``eval_clients``, ``personalize_clients``: all by default), and the server
  writes the simulator's run folder (``summary.json``, ``clients.csv``, ...).

``metrics.jsonl`` holds the simulator's :class:`~fedbabu.engine.round.RoundRecord` fields with the
same meanings; ``failed`` lists the sampled clients whose node was absent, failed or silent (the run
goes on with the others, and ``summary.json`` says why under ``flower.failures``), and the wire's
byte counts are added. ``client_failure_rate`` drops the same seeded clients as the simulator.
"""

from __future__ import annotations

import math
import shlex
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedbabu.algorithms import ALGORITHMS
from fedbabu.config import Config, load_config
from fedbabu.engine import faults, privacy
from fedbabu.engine.contract import describe, start_global_model
from fedbabu.engine.round import ClientReply, RoundPlan, RoundRecord, ServerState, finish_round, plan_round
from fedbabu.engine.simulation import RunResult, client_records, network, personalized_clients, seeded_clients
from fedbabu.errors import UserError
from fedbabu.files import atomic_write_text, prepare_output_dir, write_json
from fedbabu.flower.wire import (
    ACCEPTED_ROUND,
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    PERSONALIZE,
    QUERY,
    REPORT,
    SERVER_PERSONAL,
    STATISTICS,
    experiment_record,
    to_arrays,
    to_state,
    to_vector,
)
from fedbabu.results.report import metrics_lines, write_run

app = ServerApp()

WAIT_POLL_S = 1.0


def split_replies(replies: Iterable[Message]) -> tuple[list[Message], list[Message]]:
    """Replies that carry content, and those that carry an error (a failed or vanished node)."""
    replies = list(replies)
    return [m for m in replies if not m.has_error()], [m for m in replies if m.has_error()]


class AlgorithmStrategy(Strategy):
    """Any registered algorithm as a Flower strategy: the round policy, node identities, failures, bytes."""

    def __init__(self, config: Config, template: nn.Module, min_nodes: int, timeout: float,
                 out: Path | None = None) -> None:
        self.config = config
        self.algorithm = ALGORITHMS[config.algorithm](config)
        privacy.check_algorithm(self.algorithm)
        self.rounds = privacy.rounds_to_run(config)
        """The rounds to train: ``config.rounds``, or fewer where ``dp.target_epsilon`` stops the run."""
        self.min_available_nodes = min_nodes
        self.timeout = timeout
        self.out = out
        start_global_model(self.algorithm, template)
        self.server = ServerState.of(self.algorithm, template)
        layout = self.server.layout
        self.shared = layout.names_of(self.algorithm.shared_parts)
        self.shared_shapes = [layout.shapes[layout.names.index(name)] for name in self.shared]
        self.evaluated = seeded_clients(config.seed, config.num_clients, config.eval_clients)
        self.personalized = personalized_clients(config, config.num_clients)
        self.final_test_from_personalization = set(self.evaluated) <= set(self.personalized)
        """The last round's global test is the personalization's initial accuracy when it covers the evaluated
        clients (it does by default); otherwise the last round is evaluated like the others."""
        self.nodes: dict[int, int] = {}
        """node id -> partition id of every node that answered the query."""
        self.refused: set[int] = set()
        self.failures: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        self.accepted_round: dict[int, int] = {}
        """client -> the last round index whose update was aggregated: the node keeps that round's personal parts."""
        self.server_personal: dict[int, ArrayRecord] = {}
        """client -> personal values the algorithm's ``collaborate`` computed for it, sent with each message to that
        client until it answers one."""
        self.metrics: list[dict[str, Any]] = []
        self.bytes_down = 0
        self.bytes_up = 0
        self._plan: RoundPlan | None = None
        self._record: RoundRecord | None = None
        self._failed: list[int] = []
        self._outbox: list[Message] = []
        self._targets: list[int] = []
        """Clients this round's train messages went to (the plan's, less absent nodes)."""
        self._bytes_down = 0
        self._tick = 0.0

    def summary(self) -> None:
        """Log what the strategy runs: the algorithm and its parts, the federation, the waiting rules."""
        log(INFO, "\t├── %s", describe(self.algorithm))
        log(INFO, "\t├── %d clients, f = %g, %d rounds, seed %d", self.config.num_clients,
            self.config.client_fraction, self.config.rounds, self.config.seed)
        log(INFO, "\t└── waits for %d nodes, %g s a round", self.min_available_nodes, self.timeout)

    # --- the model on the wire ----------------------------------------------------------------

    def initial_arrays(self) -> ArrayRecord:
        return self._arrays()

    def _arrays(self) -> ArrayRecord:
        state = self.server.layout.to_state(self.server.global_vector)
        return ArrayRecord({name: state[name] for name in self.shared})

    def payload_bytes(self) -> int:
        """Floats of the shared parts, both ways: the figure the simulator reports per client and round."""
        return 2 * 4 * self.server.shared_floats()

    def final_state(self) -> dict[str, torch.Tensor]:
        return self.server.layout.to_state(self.server.global_vector)

    # --- which node is which client -----------------------------------------------------------

    def _exchange(self, grid: Grid, messages: list[Message]) -> list[Message]:
        self._outbox = messages
        return list(grid.send_and_receive(messages, timeout=self.timeout))

    def _node_of(self, reply: Message) -> int:
        """The node a reply is about: an error made by the SuperLink for a dead node names the SuperLink as
        its source, so the reply is matched to the message it answers."""
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._outbox}
        return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _fail(self, stage: str, reply: Message) -> int | None:
        node = self._node_of(reply)
        client = self.nodes.get(node)
        self.failures.append({"stage": stage, "node": node, "client": client, "reason": reply.error.reason})
        log(WARNING, "fedbabu: %s failed on node %s (client %s): %s", stage, node, client, reply.error.reason)
        return client

    def connected_clients(self, grid: Grid) -> dict[int, int]:
        """partition id -> node id of the connected nodes that serve a client; asks new nodes who they are.

        Waits at most the round timeout for ``min_available_nodes`` of them, so that a node that never
        comes cannot hold the run forever. When the time is up the run goes on with the nodes it has
        (and later waits only for that many), or stops with one line if it has none.
        """
        deadline = time.monotonic() + self.timeout
        while len(online := self._identify(grid)) < self.min_available_nodes:
            left = deadline - time.monotonic()
            if left <= 0:
                return self._short_of_nodes(online)
            log(INFO, "fedbabu: waiting for nodes: %d serving a client, %d required", len(online),
                self.min_available_nodes)
            time.sleep(min(WAIT_POLL_S, left))
        return online

    def _short_of_nodes(self, online: dict[int, int]) -> dict[int, int]:
        if not online:
            message = (f"no SuperNode serving a client connected within {self.timeout:g} s (round-timeout); start "
                       "the SuperNodes with --node-config \"partition-id=I num-partitions=N\" or raise round-timeout")
            faults.log.error(message)
            raise UserError(message)
        reason = (f"only {len(online)} of the {self.min_available_nodes} nodes waited for (min-nodes) connected "
                  f"within {self.timeout:g} s; going on with them")
        log(WARNING, "fedbabu: %s", reason)
        self.failures.append({"stage": "connect", "node": None, "client": None, "reason": reason})
        self.min_available_nodes = len(online)
        return online

    def _identify(self, grid: Grid) -> dict[int, int]:
        """Query the nodes not seen before; a node that fails the query (wrong experiment) is refused for good."""
        connected = set(grid.get_node_ids())
        unknown = sorted(connected - set(self.nodes) - self.refused)
        if unknown:
            record = RecordDict({CONFIG: experiment_record(self.config)})
            messages = [Message(record, node, QUERY) for node in unknown]
            for reply in self._exchange(grid, messages):
                node = self._node_of(reply)
                if reply.has_error():
                    self.refused.add(node)
                    self._fail("query", reply)
                    continue
                client = int(reply.content[METRICS][PARTITION_ID])
                if client in {c for n, c in self.nodes.items() if n in connected}:
                    self.refused.add(node)
                    self.failures.append({"stage": "query", "node": node, "client": client,
                                          "reason": "another connected node already serves this partition"})
                    continue
                self.nodes[node] = client
        return {client: node for node, client in self.nodes.items() if node in connected}

    def _messages(self, online: dict[int, int], clients: Iterable[int], message_type: str,
                  arrays: ArrayRecord | None, forwarded: ConfigRecord | None = None,
                  **entries: int | float | str) -> list[Message]:
        """One message per client; each tells its node which of its rounds was last aggregated, and carries the
        personal values the server computed for that client, if it holds any it has not delivered.

        ``forwarded`` is the ``config`` Flower handed the hook (a wrapper's clipping norm, say): its
        entries travel too, under their own names, so client mods can read them; ours take precedence.
        """
        messages = []
        for client in clients:
            config = ConfigRecord(dict(forwarded or {}))
            for key, value in experiment_record(self.config, **entries,
                                                **{ACCEPTED_ROUND: self.accepted_round.get(client, -1)}).items():
                config[key] = value
            content = RecordDict({CONFIG: config} if arrays is None else {ARRAYS: arrays, CONFIG: config})
            if client in self.server_personal:
                content[SERVER_PERSONAL] = self.server_personal[client]
            messages.append(Message(content, online[client], message_type))
        return messages

    # --- training -----------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The round's plan (sample less seeded dropouts), restricted to the connected clients."""
        self._tick = time.perf_counter()
        online = self.connected_clients(grid)
        self._plan = plan = plan_round(self.config, self.algorithm, server_round - 1, self.config.num_clients)
        self._failed = [c for c in plan.training if c not in online]
        for client in self._failed:
            self.failures.append({"stage": f"round {server_round}", "node": None, "client": client,
                                  "reason": "no connected node serves this client"})
        self._targets = [c for c in plan.training if c in online]
        self._bytes_down = arrays.count_bytes() * len(self._targets)
        self._outbox = self._messages(online, self._targets, MessageType.TRAIN, arrays, config,
                                      **{"round-index": plan.index, "lr": plan.lr})
        return self._outbox

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode the replies, then the round policy: screen, average in client order, server step, record.

        Stops the run (:class:`~fedbabu.engine.faults.TrainingDiverged`) when it diverged.
        """
        valid, errors = split_replies(replies)
        self._delivered(valid)
        for reply in errors:
            client = self._fail(f"round {server_round}", reply)
            if client is not None:
                self._failed.append(client)
        decoded, malformed = self._decode(server_round, valid)
        answered = {reply.client for reply in decoded} | set(malformed)
        for client in self._targets:
            if client not in answered and client not in self._failed:
                self._failed.append(client)
                self.failures.append({"stage": f"round {server_round}", "node": None, "client": client,
                                      "reason": f"no reply within the round timeout ({self.timeout:g} s)"})
        outcome = finish_round(self._plan, decoded, self.server, self.algorithm, self.config, {},
                               failed=self._failed, malformed=malformed)
        for reply in outcome.accepted:
            self.accepted_round[reply.client] = server_round - 1
        pushed = {client: to_arrays(values) for client, values in outcome.server_personal.items()}
        self.server_personal.update(pushed)
        record = self._record = outcome.record
        for client, reason in sorted(outcome.rejected.items()):
            self.rejected.append({"round": server_round, "client": client, "reason": reason})
        # besides the model: the reports for collaborate, and what it computed (sent with each client's next message)
        record.bytes_down = self._bytes_down + sum(values.count_bytes() for values in pushed.values())
        record.bytes_up = sum(m.content.array_records[key].count_bytes() for m in valid for key in (ARRAYS, REPORT)
                              if key in m.content.array_records)
        self.bytes_down += record.bytes_down
        self.bytes_up += record.bytes_up
        if not outcome.accepted and not privacy.enabled(self.config):  # a dp round adds its noise all the same
            return None, None
        return self._arrays(), MetricRecord({"train-loss": record.train_loss, "clients": len(outcome.accepted)})

    def _decode(self, server_round: int, replies: list[Message]) -> tuple[list[ClientReply], dict[int, str]]:
        """The replies as the round policy reads them; one that does not decode is malformed, with its reason."""
        decoded: list[ClientReply] = []
        malformed: dict[int, str] = {}
        for reply in replies:
            client = int(reply.content[METRICS][PARTITION_ID])
            try:
                vector = to_vector(reply.content.array_records[ARRAYS], self.shared, self.shared_shapes)
                metrics = reply.content[METRICS]
                records = reply.content.array_records
                statistics = to_state(records[STATISTICS]) if STATISTICS in records else {}
                report = to_state(records[REPORT]) if REPORT in records else {}
                decoded.append(ClientReply(client, vector.numpy(), float(metrics["train-loss"]),
                                           int(metrics[NUM_EXAMPLES]), {}, statistics, report))
            except (KeyError, ValueError) as err:
                malformed[client] = f"malformed reply: {err}"
                faults.report_rejection(server_round, client, malformed[client])
        return decoded, malformed

    def _delivered(self, replies: Iterable[Message]) -> None:
        """Forget the personal values sent to the clients that answered: each node has written them (first thing
        it does with a message), while one that did not answer gets them again with its next message."""
        for reply in replies:
            self.server_personal.pop(int(reply.content[METRICS][PARTITION_ID]), None)

    # --- evaluation ---------------------------------------------------------------------------

    def _evaluates(self, server_round: int) -> bool:
        every = self.config.eval_every
        if server_round == self.rounds:
            return bool(every) and not self.final_test_from_personalization
        return bool(every) and server_round % every == 0

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The simulator's evaluated clients (``eval_clients``) that are connected, on its ``eval_every`` rounds.

        The last round's test is the personalization's where that covers the evaluated clients.
        """
        if not self._evaluates(server_round):
            return []
        online = self.connected_clients(grid)
        self._outbox = self._messages(online, [c for c in self.evaluated if c in online], MessageType.EVALUATE,
                                      arrays, config)
        return self._outbox

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Mean accuracy over clients (as the simulator), then the round's record is final."""
        result = None
        if self._evaluates(server_round):
            valid, errors = split_replies(replies)
            self._delivered(valid)
            for reply in errors:
                self._fail(f"evaluate {server_round}", reply)
            accuracies = [float(m.content[METRICS]["accuracy"]) for m in valid]
            accuracy = float(np.nanmean(accuracies)) if accuracies else math.nan
            self._record.test_accuracy = accuracy
            result = MetricRecord({"accuracy": accuracy})
        self._finish_round()
        return result

    def _finish_round(self) -> None:
        record = self._record
        record.seconds = round(time.perf_counter() - self._tick, 4)
        self.metrics.append(record.to_json())
        log(INFO, "fedbabu: round %d: %d clients, loss %.4f, %d bytes down, %d bytes up", record.round,
            len(record.clients) - record.dropped - len(record.failed), record.train_loss, record.bytes_down,
            record.bytes_up)
        if self.out is not None:
            atomic_write_text(self.out / "metrics.jsonl", metrics_lines(self.metrics))

    # --- personalization ----------------------------------------------------------------------

    def personalize(self, grid: Grid) -> list[list[float]]:
        """The personalized clients (``personalize_clients``) fine-tune the final model; absent ones get NaN curves.

        The curves come in the order of :attr:`personalized`.
        """
        online = self.connected_clients(grid)
        messages = self._messages(online, [c for c in self.personalized if c in online], PERSONALIZE,
                                  self._arrays())
        curves: dict[int, list[float]] = {}
        for reply in self._exchange(grid, messages):
            if reply.has_error():
                self._fail("personalize", reply)
                continue
            client = int(reply.content[METRICS][PARTITION_ID])
            curves[client] = [float(a) for a in reply.content[METRICS]["accuracies"]]
        answered = set(curves)
        steps = max((len(c) for c in curves.values()), default=self.config.finetune.epochs + 1)
        for client in self.personalized:
            if client not in answered:
                curves[client] = [math.nan] * steps
                self.failures.append({"stage": "personalize", "node": online.get(client), "client": client,
                                      "reason": "no reply (node absent or failed)"})
        if self.config.eval_every and self.metrics and self.final_test_from_personalization:
            initial = [curves[c][0] for c in self.evaluated if c in answered]
            self.metrics[-1]["test_accuracy"] = float(np.nanmean(initial)) if initial else math.nan
        return [curves[c] for c in self.personalized]



def run_on_grid(grid: Grid, config: Config, out: Path, min_nodes: int, timeout: float) -> dict[str, Any]:
    """A whole experiment on a Flower grid; writes the simulator's run folder to ``out``; returns the summary.

    As with ``fedbabu run``, rejected updates, empty rounds and a divergence also go to ``events.log``
    in the folder (that is where ``fedbabu flower sim`` finds why a run stopped).
    """
    from fedbabu.runner import run_folder

    folder = prepare_output_dir(out, overwrite=True)
    (folder / "events.log").unlink(missing_ok=True)
    with run_folder(folder):
        return _run_in(folder, grid, config, min_nodes, timeout)


def _run_in(folder: Path, grid: Grid, config: Config, min_nodes: int, timeout: float) -> dict[str, Any]:
    from fedbabu.runner import partition_for, prepare_data

    started = time.perf_counter()
    dataset = prepare_data(config)
    partition = partition_for(config, dataset)
    template = network(config, dataset)
    strategy = AlgorithmStrategy(config, template, min_nodes, timeout, folder)
    log(INFO, "fedbabu: %s; %s", describe(strategy.algorithm), partition.summary())
    strategy.start(grid, strategy.initial_arrays(), num_rounds=strategy.rounds, timeout=timeout)
    if strategy.rounds < config.rounds:
        privacy.announce_stop(config, strategy.rounds)
    curves = strategy.personalize(grid)
    clients = client_records(partition, curves, strategy.personalized)
    result = RunResult(config=config, partition=partition, metrics=strategy.metrics, clients=clients,
                       final_state=strategy.final_state(), personal={}, wall_time_s=time.perf_counter() - started,
                       bytes_per_round_per_client=strategy.payload_bytes())
    summary = write_run(result, folder)
    summary["flower"] = {
        "shared_parameters": strategy.shared,
        "bytes_down": strategy.bytes_down,
        "bytes_up": strategy.bytes_up,
        "clients_personalized": int(sum(not math.isnan(curve[-1]) for curve in curves)),
        "failures": strategy.failures,
        "rejected": strategy.rejected,
        "min_nodes": min_nodes,
    }
    write_json(folder / "summary.json", summary)
    log(INFO, "fedbabu: results in %s", folder)
    return summary


def settings_from(run_config: dict[str, Any]) -> tuple[Config, Path, int, float]:
    """Experiment, result folder, minimum nodes and round timeout from the Flower run config.

    ``config-file`` is a YAML experiment (empty: the embedded digits default) and ``set`` holds
    ``key=value`` overrides separated by spaces, exactly as ``fedbabu run --set``.
    """
    path = str(run_config.get("config-file", "")).strip()
    if path and not Path(path).expanduser().is_absolute():
        raise UserError(f"run config config-file={path!r}: expected an absolute path (the ServerApp runs in "
                        "another folder)")
    overrides = shlex.split(str(run_config.get("set", "")))
    config = load_config(Path(path).expanduser() if path else None, overrides)
    out = str(run_config.get("out", "")).strip()
    folder = Path(out).expanduser() if out else Path.home() / "fedbabu-runs" / (
        f"{time.strftime('%Y%m%d-%H%M%S')}-flower-{config.algorithm}")
    if not folder.is_absolute():
        raise UserError(f"run config out={out!r}: expected an absolute path (the ServerApp runs in another folder)")
    min_nodes = int(run_config.get("min-nodes", 0)) or config.num_clients
    if min_nodes > config.num_clients:
        raise UserError(f"run config min-nodes={min_nodes}: more than num_clients={config.num_clients}")
    timeout = float(run_config.get("round-timeout", 600.0))
    if timeout <= 0:
        raise UserError(f"run config round-timeout={timeout}: expected seconds > 0")
    return config, folder, min_nodes, timeout


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls: read the run config, run, write the result folder."""
    config, folder, min_nodes, timeout = settings_from(dict(context.run_config))
    run_on_grid(grid, config, folder, min_nodes, timeout)
