"""Users' own networks: any ``nn.Module`` becomes a :class:`~fedbabu.models.BodyHead` once its head is named.

FedBABU needs to know which parameters form the head (the final linear classifier) so it can keep
them frozen. Rather than asking users to rewrite their network, :func:`split_body_head` takes the
network as it is, lifts the named layer out as the head and leaves a placeholder in its place, so the
rest of the network (whatever its ``forward`` does) becomes the body. Because a name alone cannot
prove that the layer is the *last* operation of ``forward``, :func:`check_body_head` runs one batch
through the split network and refuses it if anything happens after the head.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from fedbabu.config import Config
from fedbabu.data.datasets import Dataset
from fedbabu.data.transforms import Normalizer
from fedbabu.errors import UserError
from fedbabu.models import BodyHead, init_head

ModelSpec = nn.Module | Callable[[], nn.Module]


class HeadSlot(nn.Identity):
    """The placeholder left in a user's network where its head was; remembers the head's name."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _drop_running_stats(body: nn.Module) -> None:
    """Batch norm with batch statistics at test time too, as in the paper's models.

    Running statistics are buffers that every client would update differently and that the server
    does not average, so they would make results depend on which worker ran which client.
    """
    for module in body.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            module.num_batches_tracked = None


def split_body_head(model: nn.Module | None = None, head: str | nn.Module = "fc", *, body: nn.Module | None = None,
                    drop_running_stats: bool = True) -> BodyHead:
    """Turn a network into a :class:`~fedbabu.models.BodyHead` by naming its final linear layer.

    Either ``split_body_head(model, head="fc")``, where ``head`` is the dotted name of the network's
    final ``nn.Linear`` (``"fc"``, ``"classifier.2"``), or ``split_body_head(body=features, head=linear)``
    with two modules whose composition ``head(body(x))`` is the network. ``model`` is copied, never
    changed. With ``drop_running_stats`` (the default) batch-norm layers use batch statistics at test
    time as well, like the built-in models, because running statistics are not federated.

    Raises ``ValueError`` naming ``model``, ``head`` or ``body`` when they do not describe a network
    ending in a linear head. Whether the head really is the last operation of ``forward`` can only be
    seen on data: :func:`fedbabu.run` checks it on a batch (see :func:`check_body_head`).
    """
    if body is not None:
        if model is not None:
            raise UserError("model: give either model= with head='<layer name>', or body= and head= modules, "
                            "not both")
        if not isinstance(body, nn.Module):
            raise UserError(f"body: expected an nn.Module, got {type(body).__name__}")
        if not isinstance(head, nn.Linear):
            raise UserError(f"head: with body= the head must be the final nn.Linear module, got {type(head).__name__}")
        net = BodyHead(copy.deepcopy(body), copy.deepcopy(head))
    else:
        net = _split_named(model, head)
    if drop_running_stats:
        _drop_running_stats(net.body)
    return net


def _split_named(model: nn.Module | None, head: str | nn.Module) -> BodyHead:
    if model is None:
        raise UserError("model: expected the network to split (or body= and head= modules)")
    if not isinstance(model, nn.Module):
        raise UserError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, BodyHead):
        return copy.deepcopy(model)
    if not isinstance(head, str) or not head:
        raise UserError(f"head: expected the name of the model's final nn.Linear layer (e.g. 'fc'), got {head!r}")
    candidates = _linear_names(model)
    hint = f"; its linear layers are {', '.join(repr(n) for n in candidates)}" if candidates else \
        "; it has no nn.Linear layer"
    try:
        layer = model.get_submodule(head)
    except AttributeError:
        raise UserError(f"head: {type(model).__name__} has no layer named {head!r}{hint}") from None
    if not isinstance(layer, nn.Linear):
        raise UserError(f"head: {head!r} is a {type(layer).__name__}, not the final nn.Linear classifier{hint}")
    net = copy.deepcopy(model)
    parent_name, _, leaf = head.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    lifted = getattr(parent, leaf)
    setattr(parent, leaf, HeadSlot(head))
    return BodyHead(net, lifted)


def join_body_head(model: BodyHead) -> nn.Module:
    """The user's original architecture again, with the weights of ``model`` (e.g. the trained global model).

    The inverse of :func:`split_body_head` with a head name: the head goes back where it came from.
    A network given as ``body=``/``head=`` modules is returned as the :class:`BodyHead` itself.
    """
    body = copy.deepcopy(model.body)
    slots = [name for name, m in body.named_modules() if isinstance(m, HeadSlot)]
    if not slots:
        return copy.deepcopy(model)
    path = slots[0]
    parent_name, _, leaf = path.rpartition(".")
    parent = body.get_submodule(parent_name) if parent_name else body
    setattr(parent, leaf, copy.deepcopy(model.head))
    return body


def as_body_head(model: nn.Module, head: str | None) -> BodyHead:
    """A :class:`BodyHead` as given, or a network split at the layer named ``head``."""
    if isinstance(model, BodyHead):
        return model
    if head is None:
        raise UserError(f"head: the model is a {type(model).__name__}, not a BodyHead; name its final linear "
                        "layer, e.g. head='fc' (or split it yourself with fedbabu.split_body_head)")
    return split_body_head(model, head)


def model_factory(model: ModelSpec, head: str | None) -> Callable[[Config, Dataset], BodyHead]:
    """The simulator's model factory for a user's network (see :data:`fedbabu.engine.simulation.ModelFactory`).

    A zero-argument callable is called with torch's global generator seeded from ``config.seed``
    (and restored afterwards), so the initial weights are a function of the seed, identical on every
    client, and differ between seeds of a comparison. A module instance is copied with its weights as
    they are (e.g. pretrained). Either way ``config.head_init`` is applied to the head like for the
    built-in models.
    """
    if isinstance(model, nn.Module):
        template = copy.deepcopy(model)

        def build() -> nn.Module:
            return copy.deepcopy(template)
    elif callable(model):
        build = model
    else:
        raise UserError(f"model: expected a torch.nn.Module or a function returning one, got {type(model).__name__}")

    def factory(config: Config, dataset: Dataset) -> BodyHead:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            built = build()
            if not isinstance(built, nn.Module):
                raise UserError(f"model: the model function returned a {type(built).__name__}, not an nn.Module")
            net = as_body_head(built, head)
        init_head(net.head, config.head_init, torch.Generator().manual_seed(config.seed + 1))
        return net

    return factory


def example_batch(dataset: Dataset, size: int = 8) -> torch.Tensor:
    """A few training inputs exactly as the clients feed them to the model (normalized, NCHW)."""
    normalize = Normalizer(dataset.mean, dataset.std, channels_last=False)
    return normalize(dataset.train_x[:size])


def check_body_head(model: BodyHead, example: torch.Tensor, num_classes: int) -> None:
    """Refuse a split network that would train wrongly, on one batch of real inputs.

    Checks that the forward pass works, that nothing happens after the head (the body's output is
    exactly what flowed into the head's old place), that the head has one output per class, and
    that no buffer changes in training mode (the federation averages parameters only).
    """
    if model.head.out_features != num_classes:
        raise UserError(f"head: the head has {model.head.out_features} outputs but the data has {num_classes} "
                        "classes")
    slots = [m for m in model.body.modules() if isinstance(m, HeadSlot)]
    seen: list[torch.Tensor] = []
    hooks = [slot.register_forward_hook(lambda _m, _i, out: seen.append(out)) for slot in slots]
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.train()
    try:
        with torch.no_grad():
            features = model.body(example)
    except Exception as exc:
        raise UserError(f"model: a forward pass on a batch of the data (shape {tuple(example.shape)}) failed: "
                        f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        for hook in hooks:
            hook.remove()
    if not isinstance(features, torch.Tensor):
        raise UserError(f"model: forward must return one tensor of class scores, got a {type(features).__name__}")
    if slots:
        name = slots[0].name
        if len(seen) != 1:
            raise UserError(f"head: layer {name!r} was called {len(seen)} times in forward; the head must be "
                            "called exactly once, as the last operation")
        if seen[0] is not features and not (seen[0].shape == features.shape and torch.equal(seen[0], features)):
            raise UserError(f"head: layer {name!r} is not the final operation of forward (its output is changed "
                            "afterwards); name the last linear layer, or give body= and head= modules")
    if features.dim() != 2 or features.shape[1] != model.head.in_features:
        raise UserError(f"head: the head takes {model.head.in_features} features but the body gives a tensor of "
                        f"shape {tuple(features.shape)}")
    for name, before in buffers.items():
        if not torch.equal(before, dict(model.named_buffers())[name]):
            raise UserError(f"model: buffer {name!r} changes during training; federated averaging covers "
                            "parameters only, so use batch statistics (split_body_head(drop_running_stats=True)) "
                            "or remove the buffer")
