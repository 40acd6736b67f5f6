"""Federated algorithms, each a short class saying only how it differs from FedAvg.

Importing this package registers every algorithm, with its settings model, in :mod:`fedbabu.config`.
"""

from fedbabu.algorithms.apfl import APFL
from fedbabu.algorithms.base import Algorithm, ClientUpdate
from fedbabu.algorithms.ditto import Ditto
from fedbabu.algorithms.fedala import FedALA
from fedbabu.algorithms.fedavg import FedAvg
from fedbabu.algorithms.fedbabu import FedBABU
from fedbabu.algorithms.fedbn import FedBN
from fedbabu.algorithms.fedetf import FedETF
from fedbabu.algorithms.fednh import FedNH
from fedbabu.algorithms.fedpac import FedPAC
from fedbabu.algorithms.fedper import FedPer
from fedbabu.algorithms.fedprox import FedProx
from fedbabu.algorithms.fedrep import FedRep
from fedbabu.algorithms.fedrod import FedRoD
from fedbabu.algorithms.feduh import FedUH
from fedbabu.algorithms.knnper import KNNPer
from fedbabu.algorithms.lg_fedavg import LGFedAvg
from fedbabu.algorithms.local import Local
from fedbabu.algorithms.perfedavg import PerFedAvg
from fedbabu.algorithms.pfedme import PFedMe
from fedbabu.config import register_algorithm

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (
    FedAvg, FedBABU, FedPer, LGFedAvg, FedRep, PerFedAvg, Ditto, FedProx, Local,
    FedUH, FedNH,
    FedRoD,
    FedETF,
    FedALA, FedPAC, KNNPer,
    FedBN, APFL, PFedMe,
)}
for _algorithm in ALGORITHMS.values():
    register_algorithm(_algorithm.name, _algorithm.Settings)

__all__ = ["ALGORITHMS", "APFL", "Algorithm", "ClientUpdate", "Ditto", "FedALA", "FedAvg", "FedBABU", "FedBN", "FedETF",
           "FedNH", "FedPAC", "FedPer", "FedProx", "FedRep", "FedRoD", "FedUH", "KNNPer", "LGFedAvg", "Local", "PFedMe",
           "PerFedAvg"]
