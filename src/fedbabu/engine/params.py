"""Models as flat parameter vectors: the form in which state travels between server and clients."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from fedbabu.models import part_of


class Layout:
    """The fixed order and shapes of a model's parameters, and which positions belong to which parts."""

    def __init__(self, model: nn.Module) -> None:
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in model.named_parameters()]
        self.sizes = [p.numel() for _, p in model.named_parameters()]
        self.total = sum(self.sizes)

    def mask(self, parts: Sequence[str]) -> torch.Tensor:
        """Boolean mask over the flat vector selecting the parameters of the named parts."""
        pieces = [torch.full((size,), part_of(name) in parts)
                  for name, size in zip(self.names, self.sizes, strict=True)]
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.bool)

    def count(self, parts: Sequence[str]) -> int:
        return sum(s for n, s in zip(self.names, self.sizes, strict=True) if part_of(n) in parts)

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


def weighted_mean(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Sample-weighted mean, accumulated in the given (fixed) order so the result never depends on timing."""
    total = float(sum(weights))
    result = torch.zeros_like(vectors[0], dtype=torch.float64)
    for vector, weight in zip(vectors, weights, strict=True):
        result.add_(vector.to(torch.float64), alpha=weight / total)
    return result.to(vectors[0].dtype)
