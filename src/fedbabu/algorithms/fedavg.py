"""FedAvg (McMahan et al., 2017): every client trains the whole network; the server averages it all.

Evaluated with the same fine-tuning as FedBABU, so the comparison isolates the training phase.
"""

from fedbabu.algorithms.base import Algorithm


class FedAvg(Algorithm):
    name = "fedavg"
    shared_parts = ("body", "head")
    trained_parts = ("body", "head")
