"""FedRep (Collins et al., 2021): per round, fit the personal head with the body frozen, then the body.

Only the body is averaged; each client's head persists across rounds. As in the FedBABU authors'
``LocalUpdateFedRep`` (and FedRep's own code), the head trains for ``local_epochs`` epochs and then
the body for one (``fedrep_head_epochs`` and ``fedrep_body_epochs`` change either). Each phase
has its own fresh optimizer, and a frozen part is outside it, so the body is bit-identical through
the head phase and the head through the body phase.
"""

from dataclasses import replace

import torch
from torch import nn

from fedbabu.algorithms.base import Algorithm, ClientUpdate, PersonalState
from fedbabu.engine.local import ClientData, load_state, sgd_epochs, state_of


class FedRep(Algorithm):
    name = "fedrep"
    config_keys = ("fedrep_head_epochs", "fedrep_body_epochs")
    shared_parts = ("body",)
    trained_parts = ("body", "head")
    personal_parts = ("head",)

    def client_update(self, model: nn.Module, data: ClientData, personal: PersonalState, lr: float,
                      generator: torch.Generator) -> ClientUpdate:
        c = self.config
        load_state(model, personal)
        settings = self.local_training(lr)
        head_epochs = c.local_epochs if c.fedrep_head_epochs is None else c.fedrep_head_epochs
        body_epochs = c.local_epochs if c.fedrep_body_epochs is None else c.fedrep_body_epochs
        sgd_epochs(model, data, ("head",), replace(settings, epochs=head_epochs), generator)
        loss = sgd_epochs(model, data, ("body",), replace(settings, epochs=body_epochs), generator)
        return ClientUpdate(loss, state_of(model, self.personal_parts))
