"""Many clients' local SGD as one batched computation (``torch.func``), for accelerators.

A batch of 50 through a 4convNet leaves a GPU nearly idle, so running the sampled clients one
after another wastes it; stacking their parameters and mapping one training step over the
stack (``vmap`` of ``grad``) fills it. On a CPU the same stacking is slower than the plain loop
(benchmarks/README.md), which is why ``executor: auto`` picks this only on CUDA.

It computes exactly what :func:`fedbabu.training.sgd_epochs` computes, client by client: the
same batches from each client's own generator, SGD with momentum and weight decay written out as
``torch.optim.SGD`` applies them, the same mean batch loss. Only the floating-point evaluation
order inside the kernels differs, so results agree to rounding (tested in float64), not bit for bit.
Algorithms whose client update is more than plain SGD on some parts keep the sequential executor:
those that override :meth:`~fedbabu.algorithms.base.Algorithm.client_update`, and those that keep
the default round but change its objective (:meth:`~fedbabu.algorithms.base.Algorithm.training_loss`)
or continue one optimizer from round to round (``keeps_momentum``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedbabu.algorithms.base import Algorithm
from fedbabu.errors import UserError
from fedbabu.models import in_parts, norm_parameters
from fedbabu.training import ClientData, LocalTraining, autocast_for

Params = dict[str, torch.Tensor]


def vectorizable(algorithm: Algorithm) -> bool:
    """Whether the algorithm's round is plain SGD on its trained parts: the base class's update, on
    cross-entropy, through a new optimizer, without gradient clipping. The stacked step computes no
    other loss (the engine hands it none), no restored momentum and no per-client gradient norm."""
    kind = type(algorithm)
    return (kind.client_update is Algorithm.client_update and kind.training_loss is Algorithm.training_loss
            and not algorithm.keeps_momentum and algorithm.config.clip_grad_norm is None)


def choose_executor(requested: str, device: str, algorithm: Algorithm, model: nn.Module) -> str:
    """``sequential`` or ``vectorized`` for a run; an explicit request that cannot be honoured is an error."""
    if requested == "sequential":
        return "sequential"
    buffers = [name for name, _ in model.named_buffers()]
    if requested == "auto":
        return "vectorized" if device == "cuda" and vectorizable(algorithm) and not buffers else "sequential"
    if not vectorizable(algorithm):
        raise UserError(f"executor: vectorized runs plain SGD client updates only (cross-entropy, a new optimizer "
                        f"every round, no clip_grad_norm), and {algorithm.name} with this config trains its clients "
                        "otherwise; use executor=sequential (or auto)")
    if buffers:
        raise UserError(f"executor: vectorized needs a model without buffers, and this one has "
                        f"{', '.join(buffers)}; use executor=sequential (or auto)")
    return "vectorized"


def vectorized_sgd(
    model: nn.Module,
    clients: Sequence[ClientData],
    starts: Sequence[Params],
    parts: Sequence[str],
    settings: LocalTraining,
    generators: Sequence[torch.Generator],
) -> tuple[list[Params], list[float]]:
    """Train every client from its own starting parameters; return their final parameters and mean losses.

    ``model`` only supplies the architecture: its own weights are neither read nor changed. Each
    ``starts[i]`` names every parameter of the model. Clients whose batches differ in size at some
    step (unequal data, a short last batch) are stepped in groups of equal batch size.
    """
    if not starts:
        return [], []
    names = [name for name, _ in model.named_parameters()]
    norms = norm_parameters(model)
    trained = [name for name in names if in_parts(name, parts, norms)]
    frozen = [name for name in names if name not in trained]
    stacked = {name: torch.stack([start[name].detach() for start in starts]) for name in names}
    if not trained or settings.epochs == 0:
        return _unstack(stacked, len(starts)), [float("nan")] * len(starts)
    velocity = {name: torch.zeros_like(stacked[name]) for name in trained}
    step = vmap(grad_and_value(_loss_of(model)))
    # summed on the device in float64, as the sequential loop sums loss.item() in Python floats, without a
    # host synchronisation per step
    totals = torch.zeros(len(starts), dtype=torch.float64, device=stacked[trained[0]].device)
    counts = [0] * len(starts)
    streams = [_epochs(data, settings, generator) for data, generator in zip(clients, generators, strict=True)]
    model.train()
    for first, batches in _lockstep(streams):
        for members, x, y in _groups(batches):
            group = _Group(members, len(starts), x.device)
            with autocast_for(clients[0].runtime):
                grads, losses = step({n: group.take(stacked[n]) for n in trained},
                                     {n: group.take(stacked[n]) for n in frozen}, x, y)
            for name in trained:
                param = group.take(stacked[name])
                direction = grads[name]
                if settings.weight_decay:
                    direction = direction.add(param, alpha=settings.weight_decay)
                if settings.momentum:
                    # torch.optim.SGD: the buffer starts as the first gradient, then buf = m * buf + d
                    direction = direction.clone() if first else group.take(velocity[name]).mul(
                        settings.momentum).add(direction)
                    velocity[name] = group.put(velocity[name], direction)
                stacked[name] = group.put(stacked[name], param.add(direction, alpha=-settings.lr))
            totals.index_add_(0, group.index, losses.detach().to(torch.float64))
            for member in members:
                counts[member] += 1
    return _unstack(stacked, len(starts)), [t / max(c, 1) for t, c in zip(totals.tolist(), counts, strict=True)]


def _loss_of(model: nn.Module) -> Callable[[Params, Params, torch.Tensor, torch.Tensor], torch.Tensor]:
    """One client's batch loss as a function of (trained, frozen, x, y), for ``grad`` and ``vmap``."""
    loss_fn = nn.CrossEntropyLoss()

    def loss(trained: Params, frozen: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, {**trained, **frozen}, (x,)), y)

    return loss


class _Group:
    """The clients stepped together; when that is every client, no gathering or scattering is needed."""

    def __init__(self, members: list[int], count: int, device: torch.device) -> None:
        self.whole = len(members) == count
        self.index = torch.tensor(members, device=device)

    def take(self, stacked: torch.Tensor) -> torch.Tensor:
        return stacked if self.whole else stacked.index_select(0, self.index)

    def put(self, stacked: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.whole else stacked.index_copy(0, self.index, rows)


def _epochs(data: ClientData, settings: LocalTraining, generator: torch.Generator) -> Iterator:
    """A client's batches for all its epochs, drawn lazily so its generator is used in sequential order."""
    return itertools.chain.from_iterable(data.train_batches(settings.batch_size, generator)
                                         for _ in range(settings.epochs))


def _lockstep(streams: list[Iterator]) -> Iterator[tuple[bool, dict[int, tuple[torch.Tensor, torch.Tensor]]]]:
    """(is this the first step, batch ``t`` of every client that still has one), for t = 0, 1, ..."""
    active = dict(enumerate(streams))
    first = True
    while active:
        batches = {}
        for member, stream in list(active.items()):
            batch = next(stream, None)
            if batch is None:
                del active[member]
            else:
                batches[member] = batch
        if batches:
            yield first, batches
            first = False


def _groups(batches: dict[int, tuple[torch.Tensor, torch.Tensor]]):
    """The step's clients grouped by batch size, with their batches stacked."""
    sizes = sorted({len(y) for _, y in batches.values()})
    for size in sizes:
        members = [m for m, (_, y) in batches.items() if len(y) == size]
        yield members, torch.stack([batches[m][0] for m in members]), torch.stack([batches[m][1] for m in members])


def _unstack(stacked: Params, count: int) -> list[Params]:
    return [{name: value[i] for name, value in stacked.items()} for i in range(count)]
