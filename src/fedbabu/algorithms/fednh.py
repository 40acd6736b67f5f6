"""FedNH (Dai et al., AAAI 2023): FedUH's uniform prototypes, smoothly moved toward the class means.

Clients train exactly as in FedUH (``feduh.py``: the prototypes frozen, the body and scale
trained). After its round a client also reports, for every class it holds, the unit-normalized
mean of its normalized training features times the class count, and the counts (the authors'
``_estimate_prototype``, with the post-training model in eval mode). The server sums these over
the round's clients and moves each held class's prototype:
``W_c <- normalize(rho * W_c + (1 - rho) * normalize(sum_k n_kc mu_kc / sum_k n_kc))`` with
``rho = fednh.rho = 0.9`` (``FedNH_smoothing``; rho weights the old prototype, as in their
``FedNH.py``). A class no client of the round holds keeps its prototype exactly; ``rho = 1``
never moves them, which is FedUH.

The prototypes travel with the body (they change on the server, so clients must receive them);
clients never train them, so their average is the prototypes the server sent. The optional
adversarial (``adv``) prototype aggregations of their code are left out.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from fedbabu.algorithms.base import ClientUpdate, PersonalState
from fedbabu.algorithms.feduh import FedUH
from fedbabu.training import ClientData, body_features, class_feature_sums


class FedNH(FedUH):
    name = "fednh"
    shared_parts = ("body", "head")
    trained_parts = ("body", "head.scale")

    class Settings(FedUH.Settings):
        rho: float = Field(0.9, ge=0, le=1)
        """Weight of the old prototype in the server's smoothing (``FedNH_smoothing``: 0.9)."""

    settings: Settings

    def client_update(self, model: nn.Module, data: ClientData, personal: PersonalState, lr: float,
                      generator: torch.Generator) -> ClientUpdate:
        update = super().client_update(model, data, personal, lr, generator)
        if data.num_train == 0:
            return update
        features = nn.functional.normalize(body_features(model, data, "train").double(), dim=1, eps=1e-12)
        sums, counts = class_feature_sums(features, data.dataset.train_y[data.train_idx], data.dataset.num_classes)
        means = nn.functional.normalize(sums / counts.clamp_min(1)[:, None], dim=1, eps=1e-12)
        update.statistics = {"class_sums": means * counts[:, None], "class_counts": counts}
        return update

    def server_update(self, previous: dict[str, torch.Tensor], aggregated: dict[str, torch.Tensor],
                      statistics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Smooth each held class's prototype toward the count-weighted mean of the clients' class means."""
        old = previous["head.prototypes"]
        counts = statistics.get("class_counts")
        if counts is None or self.settings.rho == 1:
            return {**aggregated, "head.prototypes": old}
        rho = self.settings.rho
        target = nn.functional.normalize(statistics["class_sums"] / counts.clamp_min(1e-12)[:, None], dim=1,
                                         eps=1e-12)
        moved = nn.functional.normalize(rho * old.double() + (1 - rho) * target, dim=1, eps=1e-12).to(old.dtype)
        held = (counts > 0)[:, None]
        return {**aggregated, "head.prototypes": torch.where(held, moved, old)}
