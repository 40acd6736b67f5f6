"""Federated algorithms, each a short class saying only how it differs from FedAvg.

Importing this package registers every algorithm, with its settings model, in :mod:`fedbabu.config`.
"""

from fedbabu.algorithms.base import Algorithm, ClientUpdate
from fedbabu.algorithms.ditto import Ditto
from fedbabu.algorithms.fedavg import FedAvg
from fedbabu.algorithms.fedbabu import FedBABU
from fedbabu.algorithms.fedetf import FedETF
from fedbabu.algorithms.fednh import FedNH
from fedbabu.algorithms.fedper import FedPer
from fedbabu.algorithms.fedprox import FedProx
from fedbabu.algorithms.fedrep import FedRep
from fedbabu.algorithms.fedrod import FedRoD
from fedbabu.algorithms.feduh import FedUH
from fedbabu.algorithms.lg_fedavg import LGFedAvg
from fedbabu.algorithms.local import Local
from fedbabu.algorithms.perfedavg import PerFedAvg
from fedbabu.config import register_algorithm

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (
    FedAvg, FedBABU, FedPer, LGFedAvg, FedRep, PerFedAvg, Ditto, FedProx, Local,
    FedUH, FedNH,
    FedRoD,
    FedETF,
)}
for _algorithm in ALGORITHMS.values():
    register_algorithm(_algorithm.name, _algorithm.Settings)

__all__ = ["ALGORITHMS", "Algorithm", "ClientUpdate", "Ditto", "FedAvg", "FedBABU", "FedETF", "FedNH", "FedPer",
           "FedProx", "FedRep", "FedRoD", "FedUH", "LGFedAvg", "Local", "PerFedAvg"]
