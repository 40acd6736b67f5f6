"""FedRep (Collins et al., 2021): per round, fit the personal head with the body frozen, then the body.

Only the body is averaged; each client's head persists across rounds. As in the FedBABU authors'
``LocalUpdateFedRep`` (and FedRep's own code), the head trains for ``local_epochs`` epochs and then
the body for one (``fedrep_head_epochs`` and ``fedrep_body_epochs`` change either), both phases
through one SGD optimizer with a parameter group per part: the frozen part's lr is 0, so it stays
bit-identical, while its momentum buffer fills during the other phase and carries into its own, as
in their code.
"""

from dataclasses import replace

import torch
from torch import nn

from fedbabu.algorithms.base import Algorithm, ClientUpdate, PersonalState
from fedbabu.engine.local import ClientData, load_state, sgd_epochs, state_of
from fedbabu.models import part_of


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
        body, head = ([p for n, p in model.named_parameters() if part_of(n) == part] for part in ("body", "head"))
        optimizer = torch.optim.SGD([{"params": body, "lr": 0.0}, {"params": head, "lr": lr}],
                                    momentum=settings.momentum, weight_decay=settings.weight_decay)
        sgd_epochs(model, data, self.trained_parts, replace(settings, epochs=head_epochs), generator,
                   optimizer=optimizer)
        optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"] = lr, 0.0
        loss = sgd_epochs(model, data, self.trained_parts, replace(settings, epochs=body_epochs), generator,
                          optimizer=optimizer)
        return ClientUpdate(loss, state_of(model, self.personal_parts))
