"""pFedMe (Dinh, Tran & Nguyen, NeurIPS 2020): personal models as Moreau envelopes of the global one.

Each client solves, per batch, ``min_theta f(theta) + lambda/2 ||theta - w||^2`` approximately with
``pfedme.k`` gradient steps at ``pfedme.personal_lr`` (all on that one batch), then moves its local copy
of the global model toward the solution, ``w <- w - lr * lambda * (w - theta)``. The server averages the
clients' ``w`` and mixes the average into the previous global model, ``w <- (1 - beta) w + beta * mean``.
The personal model ``theta`` is the client's personal state and what it predicts with.

Sources: the paper's Algorithm 1 and the authors' code (CharlieDinh/pFedMe): ``userpFedMe.py``
(``train``), ``fedoptimizer.py`` (``pFedMeOptimizer``: the inner step adds ``mu * theta``, mu 0.001),
``serverbase.py`` (``persionalized_aggregate_parameters``: the beta mixture of the sample-weighted mean).
Defaults are their README's CIFAR-10 command (K 5, lambda 15, personal lr 0.01, beta 1). As in their
code, ``theta`` starts every round from the received global model and carries from batch to batch,
and both updates are plain gradient steps (no momentum, no weight decay beyond ``mu``).

Evaluation (``pfedme.evaluation``):

* ``own`` (the default) is their "personalized" accuracy (``evaluate_personalized_model``): the
  client's ``theta`` after local training from the latest global model. Like FedRoD's own evaluation,
  one more round from the final model gives every client that ``theta``, whenever it was last sampled;
* ``common`` fine-tunes the client's ``theta`` (the global model for a client never sampled) with the
  ``finetune.*`` settings, like every algorithm here.

Departures: a round is ``local_epochs`` epochs of the client's shuffled batches (their ``local_epochs``,
20, counts single batches from a loader that is never shuffled); the outer lr follows the run's
schedule (their 0.01 is constant); only the sampled clients train (their server trains every client
every round and aggregates a sample); no round is picked on test accuracy.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from fedbabu.algorithms.base import Algorithm, ClientUpdate, PersonalState, refuse
from fedbabu.config import AlgorithmSettings, Config
from fedbabu.training import ClientData, autocast_for, load_state, set_trainable, state_of


class PFedMe(Algorithm):
    name = "pfedme"

    class Settings(AlgorithmSettings):
        k: int = Field(5, ge=1)
        """Gradient steps on the personal model per batch (their ``--K``: 5)."""
        lambda_: float = Field(15.0, gt=0, alias="lambda")
        """The pull between personal and global model (their ``--lamda``: 15)."""
        personal_lr: float = Field(0.01, gt=0)
        """Step size of the personal model's inner steps (their ``--personal_learning_rate``, CIFAR-10: 0.01)."""
        mu: float = Field(0.001, ge=0)
        """L2 coefficient on the personal model in its inner steps (their ``pFedMeOptimizer``: 0.001)."""
        beta: float = Field(1.0, gt=0)
        """The server's step toward the clients' mean: 1 takes the mean (their ``--beta``: 1; 2 in some runs)."""
        evaluation: Literal["own", "common"] = "own"
        """``own``: the personal model after one more local round, no fine-tuning; ``common``: the
        ``finetune.*`` fine-tuning of the personal model."""
        evaluation_keys: ClassVar[tuple[str, ...]] = ("evaluation",)

    settings: Settings
    shared_parts = ("body", "head")
    trained_parts = ("body", "head")
    personal_parts = ("body", "head")

    def check_config(self, config: Config) -> None:
        own = self.settings
        if config.lr * own.lambda_ >= 2:
            raise refuse("pfedme.lambda", f"{own.lambda_} with lr {config.lr} overshoots: the local model's step "
                                          f"w -= lr * lambda * (w - theta) diverges unless lr * lambda < 2")
        if own.personal_lr * (own.lambda_ + own.mu) >= 2:
            raise refuse("pfedme.personal_lr", f"{own.personal_lr} with lambda {own.lambda_} makes the inner "
                                               "steps diverge; expected personal_lr * (lambda + mu) < 2")

    def server_update(self, previous: dict[str, torch.Tensor], aggregated: dict[str, torch.Tensor],
                      statistics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``(1 - beta) * previous + beta * mean``: exactly the mean at beta 1."""
        beta = self.settings.beta
        return {name: (1 - beta) * previous[name] + beta * aggregated[name] for name in aggregated}

    def client_update(self, model: nn.Module, data: ClientData, personal: PersonalState, lr: float,
                      generator: torch.Generator) -> ClientUpdate:
        """Per batch, K steps of the personal model (the network itself), then the local model's step
        toward it; the network ends holding the local model, which the server averages."""
        own = self.settings
        local = state_of(model, self.trained_parts)
        if data.num_train == 0:
            return ClientUpdate(float("nan"), dict(personal))
        set_trainable(model, self.trained_parts)
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        total, steps = 0.0, 0
        model.train()
        for _ in range(self.config.local_epochs):
            for x, y in data.train_batches(self.config.batch_size, generator):
                for _ in range(own.k):
                    with autocast_for(data.runtime):
                        loss = nn.functional.cross_entropy(model(x), y)
                    grads = torch.autograd.grad(loss, list(params.values()))
                    with torch.no_grad():
                        for (name, theta), grad in zip(params.items(), grads, strict=True):
                            step = grad + own.lambda_ * (theta - local[name]) + own.mu * theta
                            theta.sub_(step, alpha=own.personal_lr)
                    total += loss.item()
                    steps += 1
                with torch.no_grad():
                    for name, theta in params.items():
                        local[name].sub_(local[name] - theta, alpha=lr * own.lambda_)
        set_trainable(model, ())
        theta = state_of(model, self.personal_parts)
        load_state(model, local)
        return ClientUpdate(total / steps, theta)

    def own_note(self) -> str:
        return (f"pFedMe's own: the personal model after one local round ({self.config.local_epochs} epochs at "
                f"the final lr {self.final_lr():g}), no fine-tuning")
