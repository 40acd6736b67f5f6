"""Faults during simulated training: client dropouts, rejected updates, and divergence.

Real federations lose clients mid-round and receive garbage from some of the rest (a bad
device, a bug, an attacker). The server must aggregate what is sound and keep going, and it
must stop, rather than spin, when training itself has blown up. Everything here is generic:
it looks at flat parameter vectors and personal-state arrays, never at an algorithm.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("fedbabu")


class TrainingDiverged(RuntimeError):
    """Training produced non-finite values everywhere; continuing would only repeat it."""


def dropped_clients(sampled: Sequence[int], rate: float, seed: int) -> list[int]:
    """The sampled clients that fail to return this round: each one independently with ``rate``.

    ``seed`` comes from (run seed, round), so dropouts are reproducible and independent of the
    number of workers and of where a run was resumed.
    """
    if rate <= 0 or not sampled:
        return []
    draws = np.random.default_rng(seed).random(len(sampled))
    return [int(c) for c, u in zip(sampled, draws, strict=True) if u < rate]


def rejection_reason(vector: np.ndarray, personal: Mapping[str, np.ndarray], reference: np.ndarray,
                     personal_shapes: Mapping[str, tuple[int, ...]], max_norm: float | None) -> str | None:
    """Why a client's update must not be aggregated, or ``None`` if it is sound.

    ``vector`` is the client's shared parameters, ``reference`` the global ones it started from;
    the norm bound applies to their difference (the update itself), computed in float64.
    ``personal_shapes`` names every tensor the algorithm keeps per client, with its shape: a
    personal state must hold exactly those (an empty one when the algorithm keeps nothing),
    since the client's next round loads it into the network.
    """
    if not isinstance(vector, np.ndarray) or vector.shape != reference.shape:
        got = getattr(vector, "shape", type(vector).__name__)
        return f"wrong shape: expected {reference.shape} shared values, got {got}"
    if vector.dtype != reference.dtype:
        return f"wrong dtype: expected {reference.dtype}, got {vector.dtype}"
    if not np.isfinite(vector).all():
        return "non-finite values (NaN or inf) in the shared parameters"
    if personal:
        unexpected = sorted(set(personal) - set(personal_shapes))
        if unexpected:
            return f"personal {unexpected[0]!r} is not a tensor this algorithm keeps per client"
        missing = sorted(set(personal_shapes) - set(personal))
        if missing:
            return f"personal state lacks {missing[0]!r}"
    for name, value in personal.items():
        if tuple(value.shape) != personal_shapes[name]:
            return f"personal {name!r} has shape {tuple(value.shape)}, expected {personal_shapes[name]}"
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return f"non-finite values (NaN or inf) in personal {name!r}"
    if max_norm is not None:
        step = np.subtract(vector, reference, dtype=np.float64)
        norm = math.sqrt(float(np.dot(step, step)))
        if norm > max_norm:
            return f"update norm {norm:.4g} exceeds max_update_norm {max_norm:g}"
    return None


@dataclass
class Screening:
    """The outcome of screening one round's updates: which to aggregate and what was refused."""

    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)

    @property
    def all_non_finite(self) -> bool:
        """Every update came back and every one held NaN/inf: the training step itself diverged."""
        return (not self.accepted and bool(self.rejected)
                and all("non-finite" in reason for reason in self.rejected.values()))


def screen_round(round_number: int, clients: Sequence[int], vectors: Sequence[np.ndarray],
                 personals: Sequence[Mapping[str, np.ndarray]], reference: np.ndarray,
                 personal_shapes: Mapping[str, tuple[int, ...]], max_norm: float | None) -> Screening:
    """Screen every returned update of a round; log each rejection with its reason."""
    result = Screening()
    for position, (client, vector, personal) in enumerate(zip(clients, vectors, personals, strict=True)):
        reason = rejection_reason(vector, personal, reference, personal_shapes, max_norm)
        if reason is None:
            result.accepted.append(position)
        else:
            result.rejected[int(client)] = reason
            report_rejection(round_number, int(client), reason)
    return result


def report_rejection(round_number: int, client: int, reason: str) -> None:
    """Say which client's update was left out and why, in the one format every engine logs."""
    log.warning("round %d: rejected the update of client %d: %s", round_number, client, reason)


def check_divergence(round_number: int, screening: Screening, global_finite: bool, train_loss: float) -> None:
    """Stop the run when the global model can no longer train (raise :class:`TrainingDiverged`).

    A lone broken client is screened out; divergence is when *every* returned update is NaN/inf,
    when the aggregate is non-finite, or when the accepted clients report an infinite loss.
    """
    if screening.all_non_finite:
        why = "every client update of the round held NaN or inf"
    elif not global_finite:
        why = "the aggregated global model holds NaN or inf"
    elif np.isinf(train_loss):
        why = f"the training loss is {train_loss}"
    else:
        return
    raise TrainingDiverged(f"round {round_number}: training diverged ({why}); lower lr or check the data")


def report_empty_round(round_number: int) -> None:
    """Say that a round changed nothing: every engine keeps the previous global model then."""
    log.warning("round %d: no client update arrived or was accepted; the global model of round %d is kept",
                round_number, round_number - 1)
