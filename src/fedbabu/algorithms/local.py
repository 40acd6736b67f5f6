"""Local training only: no communication at all, the lower anchor of personalization.

Nothing is shared, so the engine aggregates nothing and counts zero bytes; each client's whole
model is its personal state and starts from the common initial model. Every client trains in
every round, whatever the client sampling: a round is one more stretch of training alone, so
``rounds x local_epochs`` is each client's number of epochs.

The authors' ``main_local.py`` trains each client through one SGD optimizer for all its epochs, the
lr stepped down by a schedule. A client here keeps its optimizer's momentum in its personal state
and the next round's optimizer continues from it, which is that one optimizer: a new optimizer
every round would restart the momentum every ``local_epochs`` epochs. Because its update is not the
default one, the vectorized executor (whose optimizers start fresh each round) never runs it.
"""

import torch
from torch import nn

from fedbabu.algorithms.base import Algorithm, ClientUpdate, PersonalState
from fedbabu.training import ClientData, load_state, momentum_of, sgd_epochs, state_of


class Local(Algorithm):
    name = "local"
    shared_parts = ()
    trained_parts = ("body", "head")
    personal_parts = ("body", "head")
    keeps_momentum = True
    training_version = 2  # 1 restarted the momentum every round

    def training_clients(self, sampled: list[int], num_clients: int) -> list[int]:
        return list(range(num_clients))

    def client_update(self, model: nn.Module, data: ClientData, personal: PersonalState, lr: float,
                      generator: torch.Generator) -> ClientUpdate:
        load_state(model, personal)
        settings = self.local_training(lr)
        optimizer = self.continued_optimizer(model, personal, settings)
        loss = sgd_epochs(model, data, self.trained_parts, settings, generator, optimizer=optimizer)
        return ClientUpdate(loss, {**state_of(model, self.personal_parts), **momentum_of(model, optimizer)})
