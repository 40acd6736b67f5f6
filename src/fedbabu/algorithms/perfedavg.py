"""Per-FedAvg (Fallah et al., 2020): FedAvg on the MAML objective ``f(w - alpha * grad f(w))``.

Each outer step takes one batch for the inner step ``w' = w - alpha * g(w)`` and one for the outer
gradient ``g(w')``. The first-order variant (``fo``) applies ``g(w')`` directly; the Hessian-free
variant (``hf``) applies ``(I - alpha * H(w)) g(w')``, the Hessian-vector product taken by central
finite differences of the gradient on a third batch (step ``perfedavg.delta``). As in the FedBABU
authors' ``main_per_fedavg.py``, alpha is the round's lr (it follows the schedule) unless
``perfedavg.alpha`` fixes it, and outer steps use ``perfedavg.beta`` (default 0.1) with the run's
momentum and weight decay. A round consumes ``local_epochs`` passes over the client's data, two (fo)
or three (hf) batches per step.

Personalization is Per-FedAvg's own: ``perfedavg.adapt_steps`` plain gradient steps of size alpha
(the final round's lr, as the authors adapt after training), one *training* batch each (the
authors adapt on test data; we do not), so its accuracy curve is indexed by adaptation steps.
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

    class Settings(AlgorithmSettings):
        variant: Literal["fo", "hf"] = "fo"
        """``fo`` (first order) or ``hf`` (Hessian-free)."""
        alpha: float | None = Field(None, gt=0)
        """Inner step size; unset = the round's lr (follows the schedule)."""
        beta: float | None = Field(0.1, gt=0)
        """Outer step size (the authors' main_per_fedavg.py: 0.1); unset = the round's lr."""
        delta: float = Field(0.001, gt=0)
        """Finite-difference step of the ``hf`` Hessian-vector product."""
        adapt_steps: int = Field(1, ge=0)
        """Gradient steps of evaluation-time adaptation."""
        legacy_keys: ClassVar[dict[str, str]] = {f"perfedavg_{key}": key for key in
                                                 ("variant", "alpha", "beta", "delta", "adapt_steps")}

    settings: Settings

    def check_config(self, config: Config) -> None:
        if config.precision == "bf16" and self.settings.variant == "hf":
            raise refuse("perfedavg.variant", "hf cannot run with precision bf16: the finite-difference Hessian "
                                              "product divides bf16 rounding noise by a tiny step; use fo or fp32")

    def adaptation_alpha(self) -> float:
        """The step size of evaluation-time adaptation: ``perfedavg.alpha``, else the final round's lr."""
        c, own = self.config, self.settings
        return own.alpha if own.alpha is not None else c.lr_at(max(c.rounds - 1, 0))

    def client_update(self, model: nn.Module, data: ClientData, personal: PersonalState, lr: float,
                      generator: torch.Generator) -> ClientUpdate:
        c, own = self.config, self.settings
        if data.num_train == 0:
            return ClientUpdate(float("nan"))
        hessian_free = own.variant == "hf"
        per_step = 3 if hessian_free else 2
        steps = max(1, c.local_epochs * math.ceil(data.num_train / c.batch_size) // per_step)
        alpha = lr if own.alpha is None else own.alpha
        beta = lr if own.beta is None else own.beta
        delta = own.delta
        params = set_trainable(model, self.trained_parts)
        optimizer = torch.optim.SGD(params, lr=beta, momentum=c.momentum, weight_decay=c.weight_decay)
        batches = endless_batches(data, c.batch_size, generator)
        model.train()
        total = 0.0
        for _ in range(steps):
            start = [p.detach().clone() for p in params]
            _, inner = gradients(model, params, next(batches), data)
            shift(params, inner, -alpha)
            loss, outer = gradients(model, params, next(batches), data)
            restore(params, start)
            if hessian_free:
                hv = hessian_vector_product(model, params, next(batches), data, outer, delta)
                outer = tuple(o - alpha * h for o, h in zip(outer, hv, strict=True))
            for p, g in zip(params, outer, strict=True):
                p.grad = g
            optimizer.step()
            total += loss
        set_trainable(model, ())
        return ClientUpdate(total / steps)

    def personalize(self, model: nn.Module, data: ClientData, personal: PersonalState,
                    generator: torch.Generator) -> list[float]:
        c = self.config
        load_state(model, personal)
        accuracies = [evaluate(model, data)]
        if data.num_train == 0:
            return accuracies * (self.settings.adapt_steps + 1)
        params = set_trainable(model, self.trained_parts)
        batches = endless_batches(data, c.batch_size, generator)
        alpha = self.adaptation_alpha()
        for _ in range(self.settings.adapt_steps):
            model.train()
            _, grads = gradients(model, params, next(batches), data)
            shift(params, grads, -alpha)
            accuracies.append(evaluate(model, data))
        set_trainable(model, ())
        return accuracies

    def personalization_unit(self) -> str:
        return "step"

    def personalization_note(self) -> str:
        own = self.settings
        return (f"Per-FedAvg adaptation ({own.variant}), {own.adapt_steps} step(s) of lr "
                f"{self.adaptation_alpha():g}")
