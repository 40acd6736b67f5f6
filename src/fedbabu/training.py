"""What one client does with a model and its own data: batches, SGD epochs, evaluation.

These are plain functions of (model, data, settings, generator) with no knowledge of processes
or rounds, so algorithms compose them freely and the engine can run them anywhere: in-process,
in a worker, or inside a Flower ClientApp.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedbabu.data.datasets import Dataset
from fedbabu.data.transforms import Normalizer, random_crop_flip
from fedbabu.models import in_parts, norm_parameters


@dataclass(frozen=True)
class LocalTraining:
    """The optimizer settings of one stretch of local SGD (the optimizer is new every time, unless an
    algorithm restores its buffers with :func:`restore_momentum`)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None
    """Each step's gradient over the trained parameters is scaled down to this L2 norm when larger."""


def clip_gradients(params: Sequence[nn.Parameter], settings: LocalTraining) -> None:
    """Bound the step's gradient norm where the settings ask for it (FedNH's authors clip at 10)."""
    if settings.clip_grad_norm is not None:
        nn.utils.clip_grad_norm_(params, settings.clip_grad_norm)


@dataclass(frozen=True)
class Runtime:
    """How tensors are produced and computed: shared by every client of a run."""

    device: str = "cpu"
    augment: bool = False
    precision: str = "fp32"
    channels_last: bool = True
    eval_batch_size: int = 2000


class ClientData:
    """One client's view of the shared dataset: index arrays into the in-memory uint8 tensors.

    Nothing is copied per client: a batch is gathered from the dataset by index, augmented and
    normalized as a whole.
    """

    def __init__(self, dataset: Dataset, train_idx: np.ndarray, test_idx: np.ndarray, runtime: Runtime,
                 normalizer: Normalizer | None = None) -> None:
        self.dataset = dataset
        self.train_idx = torch.as_tensor(np.asarray(train_idx, dtype=np.int64))
        self.test_idx = torch.as_tensor(np.asarray(test_idx, dtype=np.int64))
        self.runtime = runtime
        self.normalize = normalizer or Normalizer(dataset.mean, dataset.std, runtime.channels_last)

    @property
    def num_train(self) -> int:
        return len(self.train_idx)

    @property
    def num_test(self) -> int:
        return len(self.test_idx)

    def class_counts(self) -> torch.Tensor:
        """How many training images of each of the dataset's classes the client holds."""
        return torch.bincount(self.dataset.train_y[self.train_idx], minlength=self.dataset.num_classes)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One shuffled epoch of (normalized, augmented) batches; the last batch may be smaller."""
        order = self.train_idx[torch.randperm(self.num_train, generator=generator)]
        for start in range(0, self.num_train, batch_size):
            idx = order[start:start + batch_size]
            images = self.dataset.train_x[idx]
            if self.runtime.augment:
                images = random_crop_flip(images, generator)
            yield self.normalize(images, self.runtime.device), self.dataset.train_y[idx].to(self.runtime.device)

    def test_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The test set in one batch, as the authors evaluate a client's 100 test images.

        Batch norm uses batch statistics at test time, so the batching is part of the result: a set
        larger than ``eval_batch_size`` (a bound that only protects memory) is cut into the fewest
        batches of nearly equal size, never into full batches and a small remainder.
        """
        return self.inference_batches("test")

    def inference_batches(self, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A split in order and without augmentation, batched as :meth:`test_batches` batches the test set.

        The training split batched this way is what feature analyses read: every image passes once,
        in the same batch-statistics regime as evaluation.
        """
        indices, images, labels = ((self.test_idx, self.dataset.test_x, self.dataset.test_y) if split == "test"
                                   else (self.train_idx, self.dataset.train_x, self.dataset.train_y))
        batches = max(1, -(-len(indices) // self.runtime.eval_batch_size))
        for idx in torch.tensor_split(indices, batches):
            yield self.normalize(images[idx], self.runtime.device), labels[idx].to(self.runtime.device)


def set_trainable(model: nn.Module, parts: Sequence[str]) -> list[nn.Parameter]:
    """Let gradients flow only into the named parts; the rest are not even differentiated."""
    trainable, norms = [], norm_parameters(model)
    for name, param in model.named_parameters():
        param.requires_grad_(in_parts(name, parts, norms))
        if param.requires_grad:
            trainable.append(param)
    return trainable


def autocast_for(runtime: Runtime) -> contextlib.AbstractContextManager:
    """bf16 autocast when the run asks for it; public so algorithms with their own loop honour it too."""
    if runtime.precision == "bf16":
        return torch.autocast(device_type=torch.device(runtime.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


Regularizer = Callable[[nn.Module], torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits, labels) -> mean loss over the batch; cross-entropy unless an algorithm says otherwise."""


def balanced_softmax(counts: torch.Tensor, absent: float) -> Loss:
    """Cross-entropy of the logits plus the log of the client's class counts (balanced softmax).

    Equals plain cross-entropy when every class has the same count, and does not depend on the
    counts' scale. ``absent`` is the count a class missing on the client is given: FedRoD's and
    FedETF's authors differ there (1e-12, i.e. almost never predicted, against 1).
    """
    prior = torch.log(torch.where(counts > 0, counts.double(), torch.full_like(counts, absent, dtype=torch.float64)))

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits + prior.to(logits.device, logits.dtype), labels)

    return loss


def sgd_epochs(
    model: nn.Module,
    data: ClientData,
    parts: Sequence[str],
    settings: LocalTraining,
    generator: torch.Generator,
    regularizer: Regularizer | None = None,
    after_epoch: Callable[[], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    loss: Loss | None = None,
) -> float:
    """Train the named parts for some epochs with a fresh SGD optimizer; return the mean batch loss.

    Parts outside ``parts`` get no gradient and are outside the optimizer, so neither momentum nor
    weight decay can move them: a frozen head stays bit-identical. One optimizer serves every epoch,
    so its momentum carries from one epoch to the next; ``after_epoch`` (an evaluation, say) runs at
    the end of each epoch without touching the optimizer, and training resumes in train mode. An
    algorithm whose phases share one optimizer (FedRep) passes it as ``optimizer``, and one whose
    objective is not plain cross-entropy (balanced softmax) passes it as ``loss``.
    """
    params = set_trainable(model, parts)
    if not params or settings.epochs == 0:
        set_trainable(model, ())
        return float("nan")
    if optimizer is None:
        optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                    weight_decay=settings.weight_decay)
    total, batches = 0.0, 0
    loss_fn = loss or nn.functional.cross_entropy
    for _ in range(settings.epochs):
        model.train()
        for x, y in data.train_batches(settings.batch_size, generator):
            with autocast_for(data.runtime):
                value = loss_fn(model(x), y)
            objective = value + regularizer(model) if regularizer is not None else value
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            clip_gradients(params, settings)
            optimizer.step()
            total += value.item()
            batches += 1
        if after_epoch is not None:
            after_epoch()
    set_trainable(model, ())
    return total / max(batches, 1)


@torch.no_grad()
def evaluate(model: nn.Module, data: ClientData) -> float:
    """Accuracy on the client's test set (batch-norm uses batch statistics, as in training)."""
    if data.num_test == 0:
        return float("nan")
    model.eval()
    correct = 0
    for x, y in data.test_batches():
        with autocast_for(data.runtime):
            correct += int((model(x).argmax(1) == y).sum())
    return correct / data.num_test


@torch.no_grad()
def body_features(model: nn.Module, data: ClientData, split: str) -> torch.Tensor:
    """The body's feature vectors of a split (rows in the split's order), in fp32 on the CPU."""
    model.eval()
    chunks = []
    for x, _ in data.inference_batches(split):
        with autocast_for(data.runtime):
            chunks.append(model.body(x).float().cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, model.head.in_features)


def class_feature_sums(features: torch.Tensor, labels: torch.Tensor,
                       num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of feature rows (C x d) and the class counts (C), in float64: what a client reports of
    its features so that a server, summing over clients, can form count-weighted class means (FedNH's
    prototypes, FedPAC's centroids)."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64).index_add_(0, labels, features.double())
    return sums, counts


def state_of(model: nn.Module, parts: Sequence[str]) -> dict[str, torch.Tensor]:
    """A detached copy of the parameters of the named parts."""
    norms = norm_parameters(model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if in_parts(n, parts, norms)}


OPTIMIZER_STATE = "optimizer."
"""Prefix of the entries of a personal state that are an optimizer's momentum buffers, not weights
(``optimizer.<parameter name>``). A client that keeps one optimizer from round to round (local
training, as its authors run it) stores them beside its model; :func:`load_state` leaves them out, so
everything that loads a client's model (evaluation, ``personalize``, ``analyze``) reads only weights."""


AUXILIARY_STATE = "state."
"""Prefix of the entries of a personal state that an algorithm keeps beside weights and momentum
(``state.<name>``, declared by :meth:`~fedbabu.algorithms.base.Algorithm.auxiliary_shapes`: FedALA's
aggregation weights); :func:`load_state` leaves them out too."""


def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the model in place (keeps the memory format and the optimizer-free model); a
    personal state's momentum and auxiliary entries are not weights and stay out."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if not name.startswith((OPTIMIZER_STATE, AUXILIARY_STATE)):
                params[name].copy_(value)


def momentum_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's momentum buffers, named after their parameters with the ``optimizer.`` prefix."""
    buffers = {id(p): state["momentum_buffer"] for p, state in optimizer.state.items()
               if state.get("momentum_buffer") is not None}
    return {OPTIMIZER_STATE + n: buffers[id(p)].detach().clone()
            for n, p in model.named_parameters() if id(p) in buffers}


def restore_momentum(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, torch.Tensor]) -> None:
    """Give a new optimizer the momentum buffers a personal state kept, so that it continues where the
    previous round's optimizer stopped: SGD's buffer does not depend on the lr, so restoring it and
    setting the round's lr is one optimizer under a step schedule."""
    params = dict(model.named_parameters())
    for key, value in state.items():
        if key.startswith(OPTIMIZER_STATE):
            param = params[key.removeprefix(OPTIMIZER_STATE)]
            optimizer.state[param]["momentum_buffer"] = torch.empty_like(param).copy_(value)
