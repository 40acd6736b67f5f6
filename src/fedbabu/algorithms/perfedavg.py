"""Per-FedAvg (Fallah et al., 2020): FedAvg on the MAML objective ``f(w - alpha * grad f(w))``.

Each outer step takes one batch for the inner step ``w' = w - alpha * g(w)`` and one for the outer
gradient ``g(w')``. The first-order variant (``fo``) applies ``g(w')`` directly; the Hessian-free
variant (``hf``) applies ``(I - alpha * H(w)) g(w')``, the Hessian-vector product taken by central
finite differences of the gradient on a third batch (step ``perfedavg_delta``). Outer steps use
``perfedavg_beta`` (default: the round's lr) with the run's momentum and weight decay. A round
consumes ``local_epochs`` passes over the client's data, two (fo) or three (hf) batches per step.

Personalization is Per-FedAvg's own: ``perfedavg_adapt_steps`` plain gradient steps of size alpha,
one training batch each, so its accuracy curve is indexed by adaptation steps, not epochs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from fedbabu.algorithms.base import Algorithm, ClientUpdate, PersonalState
from fedbabu.engine.local import ClientData, autocast_for, evaluate, load_state, set_trainable

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
    personalization_unit = "step"

    def client_update(self, model: nn.Module, data: ClientData, personal: PersonalState, lr: float,
                      generator: torch.Generator) -> ClientUpdate:
        c = self.config
        if data.num_train == 0:
            return ClientUpdate(float("nan"))
        hessian_free = c.perfedavg_variant == "hf"
        per_step = 3 if hessian_free else 2
        steps = max(1, c.local_epochs * math.ceil(data.num_train / c.batch_size) // per_step)
        alpha, delta = c.perfedavg_alpha, c.perfedavg_delta
        params = set_trainable(model, self.trained_parts)
        optimizer = torch.optim.SGD(params, lr=c.perfedavg_beta or lr, momentum=c.momentum,
                                    weight_decay=c.weight_decay)
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
            return accuracies * (c.perfedavg_adapt_steps + 1)
        params = set_trainable(model, self.trained_parts)
        batches = endless_batches(data, c.batch_size, generator)
        for _ in range(c.perfedavg_adapt_steps):
            model.train()
            _, grads = gradients(model, params, next(batches), data)
            shift(params, grads, -c.perfedavg_alpha)
            accuracies.append(evaluate(model, data))
        set_trainable(model, ())
        return accuracies

    def personalization_note(self) -> str:
        c = self.config
        return (f"Per-FedAvg adaptation ({c.perfedavg_variant}), {c.perfedavg_adapt_steps} step(s) of lr "
                f"{c.perfedavg_alpha}")
