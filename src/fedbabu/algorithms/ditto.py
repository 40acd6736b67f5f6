"""Ditto (Li et al., 2021): FedAvg for a global model, plus a personal model per client.

In a round a client first trains its personal model ``v`` on ``loss + lambda/2 ||v - w||^2``, where
``w`` is the global model it just received, then trains ``w`` as FedAvg does. The personal model
(the whole network) is the client's personal state and is what evaluation and fine-tuning use.
A client's personal model starts from the global model of its first round. ``ditto_lambda = 0``
is local training; a large lambda pulls the personal models onto the global one.
"""

import torch
from torch import nn

from fedbabu.algorithms.base import Algorithm, ClientUpdate, PersonalState, check_proximal_step, proximal
from fedbabu.config import Config
from fedbabu.engine.local import ClientData, load_state, sgd_epochs, state_of


class Ditto(Algorithm):
    name = "ditto"
    config_keys = ("ditto_lambda",)
    shared_parts = ("body", "head")
    trained_parts = ("body", "head")
    personal_parts = ("body", "head")

    def check_config(self, config: Config) -> None:
        check_proximal_step("ditto_lambda", config.ditto_lambda, config)

    def client_update(self, model: nn.Module, data: ClientData, personal: PersonalState, lr: float,
                      generator: torch.Generator) -> ClientUpdate:
        settings = self.local_training(lr)
        received = state_of(model, self.trained_parts)
        load_state(model, personal)
        sgd_epochs(model, data, self.trained_parts, settings, generator,
                   proximal(received, self.config.ditto_lambda))
        personal_model = state_of(model, self.personal_parts)
        load_state(model, received)
        loss = sgd_epochs(model, data, self.trained_parts, settings, generator)
        return ClientUpdate(loss, personal_model)
