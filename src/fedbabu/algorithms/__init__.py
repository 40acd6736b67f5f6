"""Federated algorithms, each a short class saying only how it differs from FedAvg."""

from fedbabu.algorithms.base import Algorithm, ClientUpdate
from fedbabu.algorithms.ditto import Ditto
from fedbabu.algorithms.fedavg import FedAvg
from fedbabu.algorithms.fedbabu import FedBABU
from fedbabu.algorithms.fedper import FedPer
from fedbabu.algorithms.fedprox import FedProx
from fedbabu.algorithms.fedrep import FedRep
from fedbabu.algorithms.lg_fedavg import LGFedAvg
from fedbabu.algorithms.local import Local
from fedbabu.algorithms.perfedavg import PerFedAvg

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (FedAvg, FedBABU, FedPer, LGFedAvg, FedRep, PerFedAvg, Ditto, FedProx, Local)
}

__all__ = ["ALGORITHMS", "Algorithm", "ClientUpdate", "Ditto", "FedAvg", "FedBABU", "FedPer", "FedProx", "FedRep",
           "LGFedAvg", "Local", "PerFedAvg"]
