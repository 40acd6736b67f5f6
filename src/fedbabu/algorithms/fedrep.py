"""FedRep (Collins et al., 2021): per round, fit the personal head with the body frozen, then the body.

Only the body is averaged; each client's head persists across rounds. Each phase has its own
fresh optimizer, and a frozen part is outside it, so the body is bit-identical through the head
phase and the head through the body phase.
"""

from dataclasses import replace

import torch
from torch import nn

from fedbabu.algorithms.base import Algorithm, ClientUpdate, PersonalState
from fedbabu.engine.local import ClientData, load_state, sgd_epochs, state_of


class FedRep(Algorithm):
    name = "fedrep"
    shared_parts = ("body",)
    trained_parts = ("body", "head")
    personal_parts = ("head",)

    def client_update(self, model: nn.Module, data: ClientData, personal: PersonalState, lr: float,
                      generator: torch.Generator) -> ClientUpdate:
        c = self.config
        load_state(model, personal)
        settings = self.local_training(lr)
        sgd_epochs(model, data, ("head",), replace(settings, epochs=c.fedrep_head_epochs), generator)
        body_epochs = c.fedrep_body_epochs or c.local_epochs
        loss = sgd_epochs(model, data, ("body",), replace(settings, epochs=body_epochs), generator)
        return ClientUpdate(loss, state_of(model, self.personal_parts))
