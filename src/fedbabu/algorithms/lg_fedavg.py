"""LG-FedAvg (Liang et al., 2020): the head is averaged, each client keeps its own body.

The mirror image of FedPer: local representations, a global classifier. A client that was
never sampled still holds the initial body.
"""

from fedbabu.algorithms.base import Algorithm


class LGFedAvg(Algorithm):
    name = "lg_fedavg"
    shared_parts = ("head",)
    trained_parts = ("body", "head")
    personal_parts = ("body",)
