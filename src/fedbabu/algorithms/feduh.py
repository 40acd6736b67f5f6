"""FedUH (Dai et al., AAAI 2023): a fixed head of uniformly spread unit class prototypes.

The head scores normalized features against fixed, mutually orthogonal unit prototypes, times a
scale: ``logits = s * cos(f(x), W_c)``. Clients train the body (and the scale) with plain
cross-entropy and never the prototypes, so every class keeps its own direction whatever the
client's labels. It is FedBABU's fixed-head idea with the classifier made uniform by construction.
FedUH is the ablation of FedNH (``fednh.py``) with the prototypes never updated, and the authors'
repository (Yutong-Dai/FedNH, ``src/flbase/strategies/FedUH.py``) is where the details come from:

* the prototypes are ``orthogonal`` rows (``FedNH_head_init: orthogonal``), unit norm for C <= d,
  used as they are; no bias;
* the scale starts at 1.0 and is learned and averaged like the body (their CIFAR ``Conv2Cifar``
  setting, ``FedNH_fix_scaling: False``); ``feduh.learn_scale: false`` with ``feduh.scale: 30``
  is the fixed-scale alternative their comment calls common;
* their server averages clients uniformly; ours weights by client size, the same with equal sizes.

Training: ``feduh.training: common`` (the default) trains with the run's shared settings, which in
the presets are FedBABU's (lr 0.1 stepped down twice, batch 50, no weight decay, no clipping): for
these methods that is untuned. ``training: authors`` sets the shared settings to those of the
authors' CIFAR-10 script for FedNH (``experiments/gen_script.py`` and ``Cifar10_Conv2Cifar.yaml``):
lr 0.01 times 0.99 every round (their ``diminishing`` schedule), batch 64, momentum 0.9, weight
decay 1e-5, gradients clipped to L2 norm 10. Their scripts have no FedUH run; FedUH shares FedNH's
client code, so it gets the same values. The number of rounds and local epochs stays the run's.

Their evaluation has no fine-tuning: a client's personalized model is the one it holds after a
round of local training. ``feduh.evaluation: own`` does that (one more local round from the final
global model, at the final round's lr, on the client's own data) and reports it on the client's
test split; ``common`` fine-tunes ``finetune.part`` as for FedBABU. The authors reweight a global
test set by each client's label distribution instead of testing on the client's own split.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from fedbabu.algorithms.base import Algorithm, refuse
from fedbabu.config import AlgorithmSettings, Config

FEDNH_AUTHORS_TRAINING: dict[str, Any] = {
    "lr": 0.01, "lr_schedule": "exponential", "lr_decay": 0.99, "batch_size": 64, "momentum": 0.9,
    "weight_decay": 1e-5, "clip_grad_norm": 10.0,
}
"""The shared training values of the FedNH authors' CIFAR-10 script (for FedNH and their FedROD)."""


class PrototypeHead(nn.Module):
    """``scale * normalize(features) @ prototypes.T``: cosine scores against unit class prototypes."""

    def __init__(self, in_features: int, num_classes: int, scale: float, generator: torch.Generator) -> None:
        super().__init__()
        self.in_features = in_features
        prototypes = torch.empty(num_classes, in_features)
        nn.init.orthogonal_(prototypes, generator=generator)
        self.prototypes = nn.Parameter(prototypes)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    @property
    def weight(self) -> torch.Tensor:
        """The class vectors (classes x features), what head-geometry analyses read."""
        return self.prototypes

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        unit = nn.functional.normalize(features, dim=1, eps=1e-12)
        return self.scale * (unit @ self.prototypes.t())


class FedUH(Algorithm):
    name = "feduh"
    shared_parts = ("body", "head.scale")
    trained_parts = ("body", "head.scale")

    class Settings(AlgorithmSettings):
        scale: float = Field(1.0, gt=0)
        """The scale's initial value (FedNH's Conv2Cifar: 1.0; their ResNet: 20.0)."""
        learn_scale: bool = True
        """Train and average the scale (their default); false keeps it fixed at ``scale``."""
        evaluation: Literal["own", "common"] = "own"
        """``own``: a final local round, no fine-tuning (the authors'); ``common``: ``finetune.*``."""
        training: Literal["common", "authors"] = "common"
        """``common``: the run's shared training settings; ``authors``: the FedNH authors' (lr, its decay,
        batch, weight decay, clipping), written over the config's."""
        evaluation_keys: ClassVar[tuple[str, ...]] = ("evaluation",)
        training_options: ClassVar[dict[str, dict[str, Any]]] = {"authors": FEDNH_AUTHORS_TRAINING}

    settings: Settings

    def __init__(self, config: Config) -> None:
        if not config.settings_for(self.name).learn_scale:
            self.shared_parts = tuple(p for p in self.shared_parts if p != "head.scale")
            self.trained_parts = tuple(p for p in self.trained_parts if p != "head.scale")
        super().__init__(config)

    def make_head(self, head: nn.Linear, generator: torch.Generator) -> nn.Module:
        if head.out_features > head.in_features:
            raise refuse("model", f"{self.name} needs at least as many features as classes for orthogonal "
                                  f"prototypes; this body gives {head.in_features} for {head.out_features} classes")
        return PrototypeHead(head.in_features, head.out_features, self.settings.scale, generator)
