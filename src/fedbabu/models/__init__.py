"""Networks split into a ``body`` (feature extractor) and a ``head`` (final linear classifier).

Every model is a :class:`BodyHead`, so parameter names start with ``body.`` or ``head.`` and an
algorithm can say "train the body, keep the head" by name alone, whatever the architecture.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import nn

from fedbabu.errors import UserError
from fedbabu.models.convnets import DigitCNN, FourConvNet, MobileNet
from fedbabu.models.resnet import ResNet

PARTS = ("body", "head")


class BodyHead(nn.Module):
    """A network as exactly two children: ``body`` ending in a flat feature vector, and a ``head``.

    The head is the ``nn.Linear`` classifier the model is built with; an algorithm may replace it
    by a head of its own (:meth:`fedbabu.algorithms.base.Algorithm.make_head`), still one child.
    """

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def init_head(head: nn.Linear, how: str, generator: torch.Generator | None = None) -> None:
    """Re-initialize the classifier. ``default`` keeps ``nn.Linear``'s own initialization."""
    with torch.no_grad():
        if how == "default":
            return
        if how == "orthogonal":
            nn.init.orthogonal_(head.weight, generator=generator)
            if head.bias is not None:
                head.bias.zero_()
        elif how == "zeros":
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()
        else:
            raise UserError(f"head_init: unknown head initialization {how!r}; expected default, orthogonal or zeros")


BUILDERS = {
    "digitcnn": lambda c, s: DigitCNN(c, s),
    "4convnet": lambda c, s: FourConvNet(c, s),
    "mobilenet": lambda c, s: MobileNet(c),
    "resnet18": lambda c, s: ResNet("resnet18", c),
    "resnet50": lambda c, s: ResNet("resnet50", c),
}


def build_model(name: str, channels: int, image_size: int, num_classes: int, head_init: str = "default",
                seed: int = 0) -> BodyHead:
    """Build a model with weights drawn from ``seed`` alone, so every client and the server agree on them."""
    if name == "custom":
        raise UserError("model: 'custom' means a network given in Python; pass it as fedbabu.run(config, model=...)")
    if name not in BUILDERS:
        raise UserError(f"model: unknown model {name!r}; expected one of {', '.join(BUILDERS)}")
    devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        body = BUILDERS[name](channels, image_size)
        head = nn.Linear(body.out_features, num_classes)
        init_head(head, head_init, torch.Generator().manual_seed(seed + 1))
    return BodyHead(body, head)


def part_of(name: str) -> str:
    """``body`` or ``head`` for a parameter name of a :class:`BodyHead`."""
    return name.split(".", 1)[0]


NORM = "norm"
"""The part made of every normalization layer's parameters, wherever they lie in the body or the head
(FedBN keeps them per client). Module names do not say which layers normalize, so the part is resolved
against a model: :func:`norm_parameters` names its parameters."""

EXCLUDED = "-"
"""Prefix of a part taken out of the others: FedBN shares ``("body", "head", "-norm")``."""

NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
               nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm)


def norm_parameters(model: nn.Module) -> frozenset[str]:
    """The names of the parameters of the model's normalization layers: what the part :data:`NORM` selects.

    Walked once per call, after the algorithm's head is in place, so a head of its own is covered too.
    """
    return frozenset(f"{module_name}.{name}" if module_name else name
                     for module_name, module in model.named_modules() if isinstance(module, NORM_LAYERS)
                     for name, _ in module.named_parameters(recurse=False))


def in_parts(name: str, parts: Sequence[str], norms: Collection[str] | None = None) -> bool:
    """Whether a parameter belongs to ``parts``: ``body``, ``head``, a module inside them, or :data:`NORM`,
    less any part written with the :data:`EXCLUDED` prefix.

    A head that is more than one linear layer names its pieces (``head.scale``, ``head.personal``),
    so an algorithm can train, share or keep per client a piece of the head by name alone. ``norms``
    is the model's :func:`norm_parameters`, which the part ``norm`` needs (it refuses to guess without).
    """
    def matches(part: str) -> bool:
        if part == NORM:
            if norms is None:
                raise ValueError("the part 'norm' needs the model's norm_parameters")
            return name in norms
        return name == part or name.startswith(part + ".")

    excluded = [part.removeprefix(EXCLUDED) for part in parts if part.startswith(EXCLUDED)]
    return (any(matches(part) for part in parts if not part.startswith(EXCLUDED))
            and not any(matches(part) for part in excluded))


def count_parameters(model: nn.Module, part: str | None = None) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if part is None or part_of(n) == part)
