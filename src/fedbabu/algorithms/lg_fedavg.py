"""LG-FedAvg (Liang et al., 2020): the head is averaged, each client keeps its own body.

The mirror image of FedPer: local representations, a global classifier. As the FedBABU authors
run it, it starts from a FedAvg-trained global model (``lg_warm_start``), so every client's body
begins as FedAvg's; a client that is never sampled keeps that body. Without a warm start it starts
from the seeded initialization like the other algorithms.
"""

from fedbabu.algorithms.base import Algorithm
from fedbabu.algorithms.warm_start import WarmStart


class LGFedAvg(Algorithm):
    name = "lg_fedavg"
    config_keys = ("lg_warm_start",)
    shared_parts = ("head",)
    trained_parts = ("body", "head")
    personal_parts = ("body",)
    warm_start = WarmStart("lg_warm_start", "fedavg")
