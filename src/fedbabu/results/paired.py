"""The paired per-client difference between two runs of one federation.

Two algorithms trained on the same partition and seed are tested on the same clients' test sets, so
the comparison that counts is client by client: the mean difference, the standard error of that mean
(which tells a measured half-point lead from noise) and how many clients each side wins. Comparing
the two runs' means instead mixes the spread between clients (several points) into a difference that
needs none of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TIE = 1e-9
"""Accuracies are fractions of a client's test set, so two closer than this count the same images."""


@dataclass(frozen=True)
class PairedDifference:
    """``other − reference`` over the clients both runs tested (accuracies as fractions)."""

    mean: float
    standard_error: float
    """Sample std of the per-client differences over the square root of their number; NaN for one client."""
    higher: int
    lower: int
    tied: int

    def text(self, counts: bool = True) -> str:
        """``+0.50 ± 0.11 (40 higher, 6 lower, 54 tied)``, in points, as results tables print it; without
        ``counts`` only ``+0.50 ± 0.11``, for a terminal column that has no room for the counts."""
        error = "" if math.isnan(self.standard_error) else f" ± {100 * self.standard_error:.2f}"
        wins = f" ({self.higher} higher, {self.lower} lower, {self.tied} tied)" if counts else ""
        return f"{100 * self.mean:+.2f}{error}{wins}"


def paired_reference(algorithms: list[str]) -> str:
    """The entry every other is paired against: FedBABU, this library's subject, where it is compared,
    otherwise the first entry."""
    return "fedbabu" if "fedbabu" in algorithms else algorithms[0]


def paired_difference(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> PairedDifference | None:
    """``other − reference`` per client, pooled over runs given in the same seed order.

    Each array holds one run's per-client accuracies in client order. None when the two sides do not
    cover the same clients (another seed count or client count), since pairing them would compare
    different test sets; a client either run left untested (NaN) is left out of the pairs.
    """
    if len(reference) != len(other) or not reference:
        return None
    if any(np.shape(a) != np.shape(b) for a, b in zip(reference, other, strict=True)):
        return None
    first = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in reference])
    second = np.concatenate([np.asarray(b, dtype=np.float64).ravel() for b in other])
    tested = np.isfinite(first) & np.isfinite(second)
    differences = second[tested] - first[tested]
    if differences.size == 0:
        return None
    error = float(differences.std(ddof=1) / math.sqrt(differences.size)) if differences.size > 1 else math.nan
    return PairedDifference(mean=float(differences.mean()), standard_error=error,
                            higher=int((differences > TIE).sum()), lower=int((differences < -TIE).sum()),
                            tied=int((np.abs(differences) <= TIE).sum()))


def paired_cell(row: Mapping[str, Any], counts: bool = True) -> str:
    """The paired column of a comparison row (``paired_against``, ``paired_difference``, ...): the text
    of its difference, ``reference`` on the entry the others are paired against, ``–`` where the two
    could not be paired. One function, so the terminal and the written tables never read differently."""
    if row["algorithm"] == row.get("paired_against"):
        return "reference"
    if row.get("paired_difference") is None:
        return "–"
    return PairedDifference(mean=row["paired_difference"], standard_error=row["paired_standard_error"],
                            higher=row["clients_higher"], lower=row["clients_lower"],
                            tied=row["clients_tied"]).text(counts)
