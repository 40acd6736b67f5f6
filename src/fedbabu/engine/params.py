"""Models as flat parameter vectors: the form in which state travels between server and clients."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from fedbabu.algorithms.base import Algorithm
from fedbabu.models import in_parts, norm_parameters


class Layout:
    """The fixed order and shapes of a model's parameters, and which positions belong to which parts."""

    def __init__(self, model: nn.Module) -> None:
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in model.named_parameters()]
        self.sizes = [p.numel() for _, p in model.named_parameters()]
        self.total = sum(self.sizes)
        self.norms = norm_parameters(model)
        """The parameters the part ``norm`` names (:func:`~fedbabu.models.norm_parameters`)."""

    def mask(self, parts: Sequence[str]) -> torch.Tensor:
        """Boolean mask over the flat vector selecting the parameters of the named parts."""
        pieces = [torch.full((size,), in_parts(name, parts, self.norms))
                  for name, size in zip(self.names, self.sizes, strict=True)]
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.bool)

    def names_of(self, parts: Sequence[str]) -> list[str]:
        """Parameter names of the given parts, in the layout's (flat vector) order."""
        return [name for name in self.names if in_parts(name, parts, self.norms)]

    def count(self, parts: Sequence[str]) -> int:
        return sum(s for n, s in zip(self.names, self.sizes, strict=True) if in_parts(n, parts, self.norms))

    def to_state(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        state, offset = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes, strict=True):
            state[name] = flat[offset:offset + size].view(shape).clone()
            offset += size
        return state


def flatten(model: nn.Module) -> torch.Tensor:
    """All parameters in registration order, as one float32 vector (logical order, any memory format)."""
    return flatten_tensors(model.parameters())


def flatten_tensors(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Tensors (a model's parameters, or the same taken from a stack of clients) as one float32 CPU vector."""
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors])


@torch.no_grad()
def load_flat(model: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for param in model.parameters():
        size = param.numel()
        param.copy_(flat[offset:offset + size].view(param.shape))
        offset += size


def summed(statistics: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Clients' statistics added up key by key, in the given (fixed) order and in float64."""
    total: dict[str, torch.Tensor] = {}
    for entry in statistics:
        for key, value in entry.items():
            value = torch.as_tensor(value, dtype=torch.float64)
            total[key] = total[key] + value if key in total else value.clone()
    return total


def apply_server_update(algorithm: Algorithm, layout: Layout, global_vector: torch.Tensor, previous: torch.Tensor,
                        statistics: Sequence[dict[str, torch.Tensor]]) -> None:
    """Let the algorithm change the freshly averaged shared parameters (in ``global_vector``, in place).

    ``previous`` is the shared slice before the round. Algorithms that keep the default hook are
    left untouched, so their global state stays exactly the weighted mean.
    """
    if type(algorithm).server_update is Algorithm.server_update:
        return
    names, mask = layout.names_of(algorithm.shared_parts), layout.mask(algorithm.shared_parts)
    shapes = dict(zip(layout.names, layout.shapes, strict=True))

    def state(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = [math.prod(shapes[n]) for n in names]
        return {n: piece.view(shapes[n]).clone() for n, piece in zip(names, flat.split(sizes), strict=True)}

    updated = algorithm.server_update(state(previous), state(global_vector[mask]), summed(statistics))
    global_vector[mask] = torch.cat([updated[n].reshape(-1).to(global_vector.dtype) for n in names])


def weighted_mean(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Sample-weighted mean, accumulated in the given (fixed) order so the result never depends on timing."""
    total = float(sum(weights))
    result = torch.zeros_like(vectors[0], dtype=torch.float64)
    for vector, weight in zip(vectors, weights, strict=True):
        result.add_(vector.to(torch.float64), alpha=weight / total)
    return result.to(vectors[0].dtype)
