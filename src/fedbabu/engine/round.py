"""One round of federated training, written once for every engine.

A round is two steps of policy around the clients' work, and both engines (the simulator's worker
pool and the Flower strategy) call these functions rather than repeating them:

1. :func:`plan_round`: which clients train (the seeded sample, as the algorithm takes it), which of
   them fail (``client_failure_rate``, seeded), and the round's lr. A pure function of (config,
   round), so every engine trains the same clients in the same round. The held-out clients
   (``holdout_clients``, :func:`held_out_clients`) are never among them, in any engine.
2. :func:`finish_round`: screen the replies, average the accepted ones in client order (so the
   result never depends on which reply arrived first), let the algorithm's server step act on the
   average, stop a diverged run, let the algorithm compute clients' personal values from their
   reports (``collaborate``), and return the round's :class:`RoundRecord`. With ``dp`` on, the
   average is :mod:`fedbabu.engine.privacy`'s noisy mean of clipped updates instead, and the record
   carries the epsilon spent so far.

Where the clients run, how their replies travel and how long it took are the engines' business;
what a round *is* lives here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedbabu.algorithms.base import Algorithm, PersonalState
from fedbabu.config import Config
from fedbabu.engine import faults, privacy
from fedbabu.engine.params import Layout, apply_server_update, flatten, weighted_mean

SAMPLER_STREAM, DROPOUT_STREAM, HOLDOUT_STREAM = 0x5A3, 0xD20, 0x4D0

MEASURED_KEYS = ("seconds", "utilization", "bytes_down", "bytes_up")
"""Record fields that measure one execution (time, the wire) rather than the federation: the only
fields in which two engines' records of the same run may differ."""


def stream_seed(*words: int) -> int:
    """A 63-bit seed that depends on every word (seed, round, client, purpose) and nothing else."""
    state = np.random.SeedSequence([w & 0xFFFFFFFF for w in words]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def held_out_clients(seed: int, num_clients: int, count: int) -> list[int]:
    """The clients the federation never trains (``holdout_clients``), sorted: a pure function of (seed, N, count).

    They are the first ``count`` of one seeded order of the federation, so a smaller holdout lies inside a
    larger one (a study of the holdout size compares nested groups), and the order is its own stream,
    independent of the evaluated and personalized samples.
    """
    if count == 0:
        return []
    order = np.random.default_rng(stream_seed(seed, 0, 0, HOLDOUT_STREAM)).permutation(num_clients)
    return sorted(int(c) for c in order[:count])


def held_out_of(config: Config, num_clients: int) -> list[int]:
    """A run's held-out clients: :func:`held_out_clients` for its seed and ``holdout_clients``."""
    return held_out_clients(config.seed, num_clients, config.resolved_holdout())


def participating_clients(num_clients: int, held_out: Sequence[int] = ()) -> list[int]:
    """Every client that may train, in client order: the federation less its held-out clients."""
    excluded = set(held_out)
    return [c for c in range(num_clients) if c not in excluded]


def sample_clients(seed: int, round_index: int, num_clients: int, fraction: float,
                   held_out: Sequence[int] = ()) -> list[int]:
    """The clients of a round: ``max(1, floor(f * M))`` of the M participating clients (the N clients less
    ``held_out``), a pure function of (seed, round, held-out set).

    The fraction is of the participating clients, so that a round trains as many of them as a federation
    of M clients without a holdout would. The draw picks positions among them, which without a holdout
    are the clients themselves: the samples of a run without held-out clients are those of earlier builds.
    """
    eligible = participating_clients(num_clients, held_out)
    count = max(1, int(fraction * len(eligible)))
    rng = np.random.default_rng(stream_seed(seed, round_index, 0, SAMPLER_STREAM))
    return sorted(eligible[int(i)] for i in rng.choice(len(eligible), size=count, replace=False))


@dataclass(frozen=True)
class RoundPlan:
    """What a round asks of the federation before any client runs."""

    index: int
    """0-based; records and logs say ``index + 1``."""
    lr: float
    sampled: tuple[int, ...]
    """The clients chosen to train: the seeded sample as the algorithm takes it (``training_clients``), never a
    held-out one."""
    dropped: tuple[int, ...]
    """Those of ``sampled`` that fail this round by the seeded ``client_failure_rate`` draw."""

    @property
    def number(self) -> int:
        return self.index + 1

    @property
    def training(self) -> list[int]:
        """The clients asked to train: the sample less its dropouts, in client order."""
        return [c for c in self.sampled if c not in self.dropped]


def plan_round(config: Config, algorithm: Algorithm, round_index: int, num_clients: int) -> RoundPlan:
    """The round's sample, dropouts and lr; the same in every engine and after any resume."""
    held_out = held_out_of(config, num_clients)
    participating = participating_clients(num_clients, held_out)
    if privacy.enabled(config) and config.dp.sampling == "poisson":
        sample = privacy.poisson_clients(config, round_index, participating)
    else:
        sample = sample_clients(config.seed, round_index, num_clients, config.client_fraction, held_out)
    sampled = algorithm.training_clients(sample, participating)
    dropped = faults.dropped_clients(sampled, config.client_failure_rate,
                                     stream_seed(config.seed, round_index, 0, DROPOUT_STREAM))
    return RoundPlan(round_index, config.lr_at(round_index), tuple(sampled), tuple(dropped))


@dataclass
class ServerState:
    """The server's explicit state: the flat global parameters and which of them are shared.

    ``global_vector`` holds every parameter of the network (the parts no algorithm shares stay at
    their initial values there, which is what a client without a personal part of its own starts
    from); only ``shared_mask`` of it travels and is averaged.
    """

    layout: Layout
    global_vector: torch.Tensor
    shared_mask: torch.Tensor
    clipping_norm: float | None = None
    """With ``dp`` on: the norm the next round's updates are clipped to (adaptive clipping moves it)."""

    @classmethod
    def of(cls, algorithm: Algorithm, model: nn.Module) -> ServerState:
        """The state of a network at its current weights (the template, after any warm start)."""
        layout = Layout(model)
        return cls(layout, flatten(model), layout.mask(algorithm.shared_parts),
                   privacy.clipping_norm_after(algorithm.config, []))

    def restore(self, config: Config, records: Sequence[Mapping[str, Any]]) -> None:
        """Continue after the recorded rounds of a checkpoint: the weights are restored elsewhere; the clipping
        norm is replayed from the records' released shares."""
        self.clipping_norm = privacy.clipping_norm_after(config, records)

    def shared(self) -> torch.Tensor:
        """The shared parameters, flat, in layout order."""
        return self.global_vector[self.shared_mask]

    def shared_floats(self) -> int:
        return int(self.shared_mask.sum())


@dataclass
class ClientReply:
    """What one client sent back from a round."""

    client: int
    shared: np.ndarray
    """Its shared parameters after the update, flat, in layout order."""
    loss: float
    num_examples: int
    """Its training examples: the weight of its update in the average."""
    personal: Mapping[str, np.ndarray] = field(default_factory=dict)
    """What it keeps for its next round, where the server holds it (the simulator); a Flower node keeps its own."""
    statistics: Mapping[str, torch.Tensor] = field(default_factory=dict)
    """Its contribution to the sums the algorithm's server step reads (``ClientUpdate.statistics``)."""
    report: Mapping[str, torch.Tensor | np.ndarray] = field(default_factory=dict)
    """What it reported for the algorithm's ``collaborate``, read for this client alone (``ClientUpdate.report``)."""


@dataclass
class RoundRecord:
    """One line of ``metrics.jsonl``: every engine writes the same fields with the same meaning."""

    round: int
    lr: float
    train_loss: float
    """Mean training loss of the accepted updates, weighted by their examples; NaN when none was accepted."""
    clients: list[int]
    """The sampled clients (:attr:`RoundPlan.sampled`), whatever became of them."""
    dropped: int
    """How many of them the simulated failure rate dropped."""
    failed: list[int]
    """Clients asked to train that did not reply (a Flower node absent, failed or too slow; never in the simulator)."""
    rejected: int
    """Replies that screening refused (non-finite, wrong shape, over ``max_update_norm``, malformed)."""
    test_accuracy: float | None = None
    """Mean accuracy of the global model over the evaluated clients, on evaluation rounds."""
    epsilon: float | None = None
    """With ``dp`` on: the epsilon spent after this round, at the run's delta (``engine.privacy``)."""
    clipping_norm: float | None = None
    """With ``dp.adaptive_clipping``: the norm this round's updates were clipped to."""
    within_share: float | None = None
    """With ``dp.adaptive_clipping``: the noisy share of updates within that norm, from which the next norm follows."""
    seconds: float | None = None
    utilization: float | None = None
    """Simulator: the share of the workers' time spent in client tasks during the round."""
    bytes_down: int | None = None
    """Flower: bytes of model sent to the round's clients, as the wire counted them."""
    bytes_up: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as written, without the fields this engine or round does not measure."""
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass
class RoundOutcome:
    """The round's record, the replies that went into the average (in client order) and why others did not."""

    record: RoundRecord
    accepted: list[ClientReply]
    rejected: dict[int, str]
    """client -> why its reply was left out (already logged)."""
    server_personal: dict[int, PersonalState] = field(default_factory=dict)
    """client -> personal values the server computed for it (``collaborate``): an engine writes them over the
    personal state the client kept from this round, as if the client received them right after it."""


def finish_round(plan: RoundPlan, replies: Sequence[ClientReply], server: ServerState, algorithm: Algorithm,
                 config: Config, personal_shapes: Mapping[str, tuple[int, ...]],
                 failed: Sequence[int] = (), malformed: Mapping[int, str] | None = None) -> RoundOutcome:
    """Screen, average the accepted replies into ``server`` (in place), apply the server step, let the
    algorithm collaborate on the accepted replies' reports, record.

    ``malformed`` are replies an engine could not even decode (client -> reason, already reported);
    ``failed`` the clients that never replied. Raises
    :class:`~fedbabu.engine.faults.TrainingDiverged` when the round diverged.
    """
    replies = sorted(replies, key=lambda reply: reply.client)
    reference = server.shared().numpy()
    private = privacy.enabled(config)
    # with dp, clipping bounds every update instead of the norm screen (config refuses a screen below the clip)
    screened = faults.screen_round(plan.number, [r.client for r in replies], [r.shared for r in replies],
                                   [r.personal for r in replies], reference, personal_shapes,
                                   None if private else config.max_update_norm)
    screening = faults.Screening(screened.accepted, {**(malformed or {}), **screened.rejected})
    accepted = [replies[i] for i in screening.accepted]
    weights = [r.num_examples for r in accepted]
    within = 0  # adaptive clipping's count of updates within the norm
    if bool(server.shared_mask.any()) and (accepted or private):
        previous = server.shared().clone()
        if private:
            step, within = privacy.private_mean_update(config, plan.index, [r.shared for r in accepted], reference,
                                                       server.clipping_norm)
            server.global_vector[server.shared_mask] = torch.from_numpy(
                reference.astype(np.float64) + step).to(server.global_vector.dtype)
        else:
            server.global_vector[server.shared_mask] = weighted_mean(
                [torch.from_numpy(r.shared) for r in accepted], weights)
        apply_server_update(algorithm, server.layout, server.global_vector, previous,
                            [dict(r.statistics) for r in accepted])
    losses = [r.loss for r in accepted]
    record = RoundRecord(
        round=plan.number, lr=plan.lr,
        train_loss=float(np.average(losses, weights=weights)) if losses else math.nan,
        clients=list(plan.sampled), dropped=len(plan.dropped), failed=sorted(failed),
        rejected=len(screening.rejected),
        epsilon=privacy.epsilon(config, plan.number) if private else None)
    if private and config.dp.adaptive_clipping:
        record.clipping_norm = server.clipping_norm
        record.within_share = privacy.noisy_within_share(config, plan.index, within)
        server.clipping_norm = privacy.adapted_norm(config, server.clipping_norm, record.within_share)
    faults.check_divergence(plan.number, screening, bool(torch.isfinite(server.global_vector).all()),
                            record.train_loss)
    if not accepted:
        (privacy.report_empty_round if private else faults.report_empty_round)(plan.number)
    reports = {r.client: {k: torch.as_tensor(v) for k, v in r.report.items()} for r in accepted if r.report}
    return RoundOutcome(record, accepted, screening.rejected, algorithm.collaborate(reports) if reports else {})
