"""FedProx (Li et al., 2020): FedAvg plus ``mu/2 ||w - w_global||^2`` in every client's objective.

The proximal term keeps heterogeneous clients from drifting far from the model they received;
``fedprox.mu = 0`` is FedAvg exactly.
"""

from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from fedbabu.algorithms.base import Algorithm, ClientUpdate, PersonalState, check_proximal_step, proximal
from fedbabu.config import AlgorithmSettings, Config
from fedbabu.training import ClientData, sgd_epochs, state_of


class FedProx(Algorithm):
    name = "fedprox"

    class Settings(AlgorithmSettings):
        mu: float = Field(1.0, ge=0)
        """The proximal coefficient (the authors' utils/options.py: 1.0)."""
        legacy_keys: ClassVar[dict[str, str]] = {"fedprox_mu": "mu"}

    settings: Settings

    def check_config(self, config: Config) -> None:
        check_proximal_step("fedprox.mu", self.settings.mu, config)

    def client_update(self, model: nn.Module, data: ClientData, personal: PersonalState, lr: float,
                      generator: torch.Generator) -> ClientUpdate:
        term = proximal(state_of(model, self.trained_parts), self.settings.mu)
        return ClientUpdate(sgd_epochs(model, data, self.trained_parts, self.local_training(lr), generator, term))
