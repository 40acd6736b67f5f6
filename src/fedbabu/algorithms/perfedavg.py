"""Per-FedAvg (Fallah et al., 2020): FedAvg on the MAML objective ``f(w - alpha * grad f(w))``.

Each iteration takes one batch for the inner step ``w' = w - alpha * g(w)`` and one for the outer
gradient ``g(w')``, then steps from ``w`` with it. The first-order variant (``fo``) applies ``g(w')``
directly; the Hessian-free variant (``hf``, ours: the authors' code has none) applies
``(I - alpha * H(w)) g(w')``, the Hessian-vector product taken by central finite differences of the
gradient on a third batch (step ``perfedavg.delta``).

The round runs as the FedBABU authors' ``LocalUpdatePerFedAvg.train`` runs it. Both steps go
through one momentum SGD per round: the inner one at alpha (the round's lr unless
``perfedavg.alpha`` fixes it), the outer one at ``perfedavg.beta`` (0.1), so the momentum buffer
mixes inner and outer gradients. An epoch is ``floor(batches / local_epochs) + 1`` iterations on a
new shuffle of the client's data: 20 iterations a round for 10 batches at tau = 10, 11 at tau = 1.

Personalization is their ``one_sgd_step``: ``perfedavg.adapt_steps`` steps (2) through one new
momentum SGD, alternately at alpha (the final round's lr) and beta, without going back to the
starting weights, one *training* batch each (the authors adapt on test data; we do not), so its
accuracy curve is indexed by adaptation steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from fedbabu.algorithms.base import Algorithm, ClientUpdate, PersonalState, refuse
from fedbabu.config import AlgorithmSettings, Config
from fedbabu.training import ClientData, autocast_for, evaluate, load_state, set_trainable

Batch = tuple[torch.Tensor, torch.Tensor]


def endless_batches(data: ClientData, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
    """Shuffled batches, epoch after epoch (a step may need batches from two epochs)."""
    while True:
        yield from data.train_batches(batch_size, generator)


def gradients(model: nn.Module, params: Sequence[nn.Parameter], batch: Batch,
              data: ClientData) -> tuple[float, tuple[torch.Tensor, ...]]:
    x, y = batch
    with autocast_for(data.runtime):
        loss = nn.functional.cross_entropy(model(x), y)
    return loss.item(), torch.autograd.grad(loss, params)


@torch.no_grad()
def shift(params: Sequence[nn.Parameter], direction: Sequence[torch.Tensor], scale: float) -> None:
    for p, d in zip(params, direction, strict=True):
        p.add_(d, alpha=scale)


def step(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], direction: Sequence[torch.Tensor],
         lr: float) -> None:
    """One step of the optimizer along ``direction`` at ``lr``: the authors run the inner and the outer
    step through one momentum SGD, changing its lr between them."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    for p, d in zip(params, direction, strict=True):
        p.grad = d
    optimizer.step()


@torch.no_grad()
def restore(params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> None:
    for p, v in zip(params, values, strict=True):
        p.copy_(v)


def hessian_vector_product(model: nn.Module, params: Sequence[nn.Parameter], batch: Batch, data: ClientData,
                           vector: Sequence[torch.Tensor], delta: float) -> tuple[torch.Tensor, ...]:
    """``H(w) v`` on a batch by central differences of the gradient, as Per-FedAvg's HF variant does.

    Two gradient evaluations instead of a second-order graph; the parameters are restored exactly.
    """
    start = [p.detach().clone() for p in params]
    shift(params, vector, delta)
    _, plus = gradients(model, params, batch, data)
    restore(params, start)
    shift(params, vector, -delta)
    _, minus = gradients(model, params, batch, data)
    restore(params, start)
    return tuple((gp - gm) / (2 * delta) for gp, gm in zip(plus, minus, strict=True))


class PerFedAvg(Algorithm):
    name = "perfedavg"
    training_version = 2  # 1 ran the inner and outer steps through separate plain optimizers

    class Settings(AlgorithmSettings):
        variant: Literal["fo", "hf"] = "fo"
        """``fo`` (first order) or ``hf`` (Hessian-free)."""
        alpha: float | None = Field(None, gt=0)
        """Inner step size; unset = the round's lr (follows the schedule)."""
        beta: float | None = Field(0.1, gt=0)
        """Outer step size (the authors' main_per_fedavg.py: 0.1); unset = the round's lr."""
        delta: float = Field(0.001, gt=0)
        """Finite-difference step of the ``hf`` Hessian-vector product."""
        adapt_steps: int = Field(2, ge=0)
        """Steps of evaluation-time adaptation, alternately at alpha and beta (the authors' one_sgd_step: 2)."""
        legacy_keys: ClassVar[dict[str, str]] = {f"perfedavg_{key}": key for key in
                                                 ("variant", "alpha", "beta", "delta", "adapt_steps")}

    settings: Settings

    def check_config(self, config: Config) -> None:
        if config.precision == "bf16" and self.settings.variant == "hf":
            raise refuse("perfedavg.variant", "hf cannot run with precision bf16: the finite-difference Hessian "
                                              "product divides bf16 rounding noise by a tiny step; use fo or fp32")

    def adaptation_lrs(self) -> tuple[float, float]:
        """Alpha and beta of evaluation-time adaptation: the settings, where unset the final round's lr."""
        c, own = self.config, self.settings
        final = c.lr_at(max(c.rounds - 1, 0))
        return (own.alpha if own.alpha is not None else final, own.beta if own.beta is not None else final)

    def iterations_per_epoch(self, data: ClientData) -> int:
        """The authors' count: ``floor(batches / local_epochs) + 1`` iterations of two (fo) or three (hf) batches."""
        return math.ceil(data.num_train / self.config.batch_size) // self.config.local_epochs + 1

    def client_update(self, model: nn.Module, data: ClientData, personal: PersonalState, lr: float,
                      generator: torch.Generator) -> ClientUpdate:
        c, own = self.config, self.settings
        if data.num_train == 0:
            return ClientUpdate(float("nan"))
        alpha = lr if own.alpha is None else own.alpha
        beta = lr if own.beta is None else own.beta
        params = set_trainable(model, self.trained_parts)
        optimizer = torch.optim.SGD(params, lr=alpha, momentum=c.momentum, weight_decay=c.weight_decay)
        model.train()
        losses = []
        for _ in range(c.local_epochs):
            batches = endless_batches(data, c.batch_size, generator)
            for _ in range(self.iterations_per_epoch(data)):
                start = [p.detach().clone() for p in params]
                _, inner = gradients(model, params, next(batches), data)
                step(optimizer, params, inner, alpha)
                loss, outer = gradients(model, params, next(batches), data)
                restore(params, start)
                if own.variant == "hf":
                    hv = hessian_vector_product(model, params, next(batches), data, outer, own.delta)
                    outer = tuple(o - alpha * h for o, h in zip(outer, hv, strict=True))
                step(optimizer, params, outer, beta)
                losses.append(loss)
        set_trainable(model, ())
        return ClientUpdate(sum(losses) / len(losses))

    def personalize(self, model: nn.Module, data: ClientData, personal: PersonalState,
                    generator: torch.Generator) -> list[float]:
        c = self.config
        load_state(model, personal)
        accuracies = [evaluate(model, data)]
        if data.num_train == 0:
            return accuracies * (self.settings.adapt_steps + 1)
        params = set_trainable(model, self.trained_parts)
        batches = endless_batches(data, c.batch_size, generator)
        lrs = self.adaptation_lrs()
        optimizer = torch.optim.SGD(params, lr=lrs[0], momentum=c.momentum, weight_decay=c.weight_decay)
        for index in range(self.settings.adapt_steps):
            model.train()
            _, grads = gradients(model, params, next(batches), data)
            step(optimizer, params, grads, lrs[index % 2])
            accuracies.append(evaluate(model, data))
        set_trainable(model, ())
        return accuracies

    def personalization_unit(self) -> str:
        return "step"

    def personalization_note(self) -> str:
        alpha, beta = self.adaptation_lrs()
        return (f"Per-FedAvg adaptation ({self.settings.variant}), {self.settings.adapt_steps} momentum "
                f"SGD step(s) at lr {alpha:g} then {beta:g}, alternately")
