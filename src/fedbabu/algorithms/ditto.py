"""Ditto (Li et al., 2021): FedAvg for a global model, plus a personal model per client.

In a round a client first trains its personal model ``v`` on ``loss + lambda/2 ||v - w||^2``, where
``w`` is the global model it just received, then trains ``w`` as FedAvg does. The personal model
(the whole network) is the client's personal state and is what evaluation and fine-tuning use.
A client's personal model starts from the global model of its first round. ``ditto.lambda = 0``
is local training with a new optimizer every round; a large lambda pulls the personal models onto the global one.
"""

from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from fedbabu.algorithms.base import Algorithm, ClientUpdate, PersonalState, check_proximal_step, proximal
from fedbabu.config import AlgorithmSettings, Config
from fedbabu.training import ClientData, load_state, sgd_epochs, state_of


class Ditto(Algorithm):
    name = "ditto"

    class Settings(AlgorithmSettings):
        lambda_: float = Field(0.75, ge=0, alias="lambda")
        """The pull of the personal model toward the global one (the authors' main_ditto.py: 0.75)."""
        legacy_keys: ClassVar[dict[str, str]] = {"ditto_lambda": "lambda_"}

    settings: Settings
    shared_parts = ("body", "head")
    trained_parts = ("body", "head")
    personal_parts = ("body", "head")

    def check_config(self, config: Config) -> None:
        check_proximal_step("ditto.lambda", self.settings.lambda_, config)

    def client_update(self, model: nn.Module, data: ClientData, personal: PersonalState, lr: float,
                      generator: torch.Generator) -> ClientUpdate:
        settings = self.local_training(lr)
        received = state_of(model, self.trained_parts)
        load_state(model, personal)
        sgd_epochs(model, data, self.trained_parts, settings, generator,
                   proximal(received, self.settings.lambda_))
        personal_model = state_of(model, self.personal_parts)
        load_state(model, received)
        loss = sgd_epochs(model, data, self.trained_parts, settings, generator)
        return ClientUpdate(loss, personal_model)
