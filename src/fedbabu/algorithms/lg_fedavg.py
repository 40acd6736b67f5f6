"""LG-FedAvg (Liang et al., 2020): the head is averaged, each client keeps its own body.

The mirror image of FedPer: local representations, a global classifier. As the FedBABU authors
run it, it starts from a FedAvg-trained global model (``lg_fedavg.warm_start``), so every client's body
begins as FedAvg's; a client that is never sampled keeps that body. Without a warm start it starts
from the seeded initialization like the other algorithms.
"""

from pathlib import Path
from typing import ClassVar

from fedbabu.algorithms.base import Algorithm
from fedbabu.algorithms.warm_start import WarmStart
from fedbabu.config import AlgorithmSettings


class LGFedAvg(Algorithm):
    name = "lg_fedavg"

    class Settings(AlgorithmSettings):
        warm_start: Path | None = None
        """A finished fedavg run folder whose ``model.pt`` is the initial global model."""
        legacy_keys: ClassVar[dict[str, str]] = {"lg_warm_start": "warm_start"}

    shared_parts = ("head",)
    trained_parts = ("body", "head")
    personal_parts = ("body",)
    warm_start = WarmStart(name, "warm_start", "fedavg")
