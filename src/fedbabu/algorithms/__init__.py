"""Federated algorithms, each a short class saying only how it differs from FedAvg."""

from fedbabu.algorithms.base import Algorithm, ClientUpdate
from fedbabu.algorithms.fedavg import FedAvg
from fedbabu.algorithms.fedbabu import FedBABU

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (FedAvg, FedBABU)}

__all__ = ["ALGORITHMS", "Algorithm", "ClientUpdate", "FedAvg", "FedBABU"]
