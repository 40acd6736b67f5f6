"""FedProx (Li et al., 2020): FedAvg plus ``mu/2 ||w - w_global||^2`` in every client's objective.

The proximal term keeps heterogeneous clients from drifting far from the model they received;
``fedprox_mu = 0`` is FedAvg exactly.
"""

import torch
from torch import nn

from fedbabu.algorithms.base import Algorithm, ClientUpdate, PersonalState, check_proximal_step, proximal
from fedbabu.config import Config
from fedbabu.engine.local import ClientData, sgd_epochs, state_of


class FedProx(Algorithm):
    name = "fedprox"
    config_keys = ("fedprox_mu",)

    def check_config(self, config: Config) -> None:
        check_proximal_step("fedprox_mu", config.fedprox_mu, config)

    def client_update(self, model: nn.Module, data: ClientData, personal: PersonalState, lr: float,
                      generator: torch.Generator) -> ClientUpdate:
        term = proximal(state_of(model, self.trained_parts), self.config.fedprox_mu)
        return ClientUpdate(sgd_epochs(model, data, self.trained_parts, self.local_training(lr), generator, term))
