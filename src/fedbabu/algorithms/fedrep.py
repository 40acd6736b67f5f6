"""FedRep (Collins et al., 2021): per round, fit the personal head with the body frozen, then the body.

Only the body is averaged; each client's head persists across rounds. As in the FedBABU authors'
``LocalUpdateFedRep`` (and FedRep's own code), the head trains for ``local_epochs`` epochs and then
the body for one (``fedrep.head_epochs`` and ``fedrep.body_epochs`` change either), both phases
through one SGD optimizer with a parameter group per part: the frozen part's lr is 0, so it stays
bit-identical, while its momentum buffer fills during the other phase and carries into its own, as
in their code. Their ``scripts/run_fedrep.sh`` passes no ``--momentum``, so FedRep trains with
``utils/options.py``'s 0.5 there (the other scripts pass 0.9): the ``baselines`` presets set it.

Two evaluations, as for the head family:

* ``fedrep.evaluation: common`` (the default) fine-tunes ``finetune.part`` like every algorithm here;
* ``own`` is how their ``main_fedrep.py`` tests a client: one FedRep local update (head epochs, then
  body epochs) from the current body and the client's kept head, at the round's lr (after its decay,
  so the final round's lr here), then the test. We run it once, on the final model; they run it
  every round and keep the round best on test data, which we do not.
"""

from dataclasses import replace
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from fedbabu.algorithms.base import Algorithm, ClientUpdate, PersonalState
from fedbabu.config import AlgorithmSettings
from fedbabu.models import part_of
from fedbabu.training import ClientData, load_state, sgd_epochs, state_of


class FedRep(Algorithm):
    name = "fedrep"

    class Settings(AlgorithmSettings):
        head_epochs: int | None = Field(None, ge=0)
        """Head epochs per round; unset = ``local_epochs``."""
        body_epochs: int | None = Field(1, ge=1)
        """Body epochs per round; unset = ``local_epochs``."""
        evaluation: Literal["common", "own"] = "common"
        """``common``: the ``finetune.*`` fine-tuning; ``own``: one FedRep update, then the test
        (``main_fedrep.py``)."""
        legacy_keys: ClassVar[dict[str, str]] = {"fedrep_head_epochs": "head_epochs",
                                                 "fedrep_body_epochs": "body_epochs"}
        evaluation_keys: ClassVar[tuple[str, ...]] = ("evaluation",)

    settings: Settings
    shared_parts = ("body",)
    trained_parts = ("body", "head")
    personal_parts = ("head",)

    def client_update(self, model: nn.Module, data: ClientData, personal: PersonalState, lr: float,
                      generator: torch.Generator) -> ClientUpdate:
        epochs, own = self.config.local_epochs, self.settings
        load_state(model, personal)
        settings = self.local_training(lr)
        head_epochs = epochs if own.head_epochs is None else own.head_epochs
        body_epochs = epochs if own.body_epochs is None else own.body_epochs
        body, head = ([p for n, p in model.named_parameters() if part_of(n) == part] for part in ("body", "head"))
        optimizer = torch.optim.SGD([{"params": body, "lr": 0.0}, {"params": head, "lr": lr}],
                                    momentum=settings.momentum, weight_decay=settings.weight_decay)
        sgd_epochs(model, data, self.trained_parts, replace(settings, epochs=head_epochs), generator,
                   optimizer=optimizer)
        optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"] = lr, 0.0
        loss = sgd_epochs(model, data, self.trained_parts, replace(settings, epochs=body_epochs), generator,
                          optimizer=optimizer)
        return ClientUpdate(loss, state_of(model, self.personal_parts))

    def own_note(self) -> str:
        return f"FedRep's own: one FedRep update at the final lr {self.final_lr():g}, no fine-tuning"
