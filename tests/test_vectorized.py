"""The vectorized client executor computes what the sequential one computes (float64, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import small_config

from fedbabu.algorithms import ALGORITHMS
from fedbabu.data.datasets import Dataset
from fedbabu.engine.simulation import simulate
from fedbabu.engine.vectorized import choose_executor, vectorized_sgd
from fedbabu.errors import UserError
from fedbabu.models import build_model
from fedbabu.runner import partition_for
from fedbabu.training import ClientData, LocalTraining, Runtime, sgd_epochs


class Float64Data(ClientData):
    """A client whose batches come in float64, so both executors can be compared to ~1e-12."""

    def train_batches(self, batch_size, generator):
        for x, y in super().train_batches(batch_size, generator):
            yield x.double(), y


def clients_of(dataset, sizes, augment=False):
    runtime = Runtime(augment=augment, channels_last=False)
    start, clients = 0, []
    for size in sizes:
        clients.append(Float64Data(dataset, np.arange(start, start + size), np.arange(0), runtime))
        start += size
    return clients


def model_for(dataset):
    return build_model("digitcnn", dataset.channels, dataset.image_size, dataset.num_classes, "default", 0).double()


def starts_for(model, count):
    """Different starting points per client, as personal heads give."""
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    return [{n: (v + 0.01 * i * torch.randn_like(v) if n.startswith("head") else v.clone()) for n, v in base.items()}
            for i in range(count)]


@pytest.mark.parametrize(("parts", "settings", "sizes"), [
    (("body",), LocalTraining(2, 20, 0.05, 0.9, 1e-3), [60, 60, 60]),
    (("body", "head"), LocalTraining(1, 20, 0.1, 0.0, 0.0), [45, 60, 20]),
    (("head",), LocalTraining(2, 16, 0.05, 0.5, 0.0), [33, 16, 50]),
])
def test_vectorized_sgd_equals_the_sequential_loop_in_float64(digits, parts, settings, sizes):
    model = model_for(digits)
    clients = clients_of(digits, sizes)
    starts = starts_for(model, len(sizes))
    finals, losses = vectorized_sgd(model, clients, starts, parts, settings,
                                    [torch.Generator().manual_seed(10 + i) for i in range(len(sizes))])
    for i, (data, start) in enumerate(zip(clients, starts, strict=True)):
        reference = model_for(digits)
        reference.load_state_dict(start)
        loss = sgd_epochs(reference, data, parts, settings, torch.Generator().manual_seed(10 + i))
        assert losses[i] == pytest.approx(loss, rel=1e-12)
        for name, value in reference.named_parameters():
            trained = name.split(".")[0] in parts
            if trained:
                assert not torch.equal(value, start[name]), name
                torch.testing.assert_close(finals[i][name], value.detach(), rtol=1e-10, atol=1e-12)
            else:
                assert torch.equal(finals[i][name], start[name]), name


def cifar_shaped(count):
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (count,), generator=gen)
    return Dataset("cifar-shaped", images, labels, images[:0], labels[:0], 10, (0.5,) * 3, (0.25,) * 3, "random")


def test_vectorized_sgd_draws_each_clients_augmentation_like_the_sequential_loop():
    cifar_like = cifar_shaped(60)
    model = build_model("4convnet", 3, 32, 10, "default", 0).double()
    clients = clients_of(cifar_like, [30, 30], augment=True)
    starts = starts_for(model, 2)
    settings = LocalTraining(1, 10, 0.05, 0.9, 0.0)
    finals, _ = vectorized_sgd(model, clients, starts, ("body",), settings,
                               [torch.Generator().manual_seed(i) for i in range(2)])
    for i in range(2):
        reference = build_model("4convnet", 3, 32, 10, "default", 0).double()
        reference.load_state_dict(starts[i])
        sgd_epochs(reference, clients[i], ("body",), settings, torch.Generator().manual_seed(i))
        torch.testing.assert_close(finals[i]["body.0.0.weight"], reference.body[0][0].weight.detach(),
                                   rtol=1e-10, atol=1e-12)


def test_a_vectorized_run_trains_like_the_sequential_one_and_keeps_fedbabus_head(digits):
    runs = {}
    for executor in ("sequential", "vectorized"):
        config = small_config(algorithm="fedbabu", executor=executor, rounds=3)
        runs[executor] = simulate(config, digits, partition_for(config, digits))
    sequential, vectorized = runs["sequential"], runs["vectorized"]
    initial = build_model("digitcnn", digits.channels, digits.image_size, digits.num_classes, "default", 0)
    assert torch.equal(vectorized.final_state["head.weight"], initial.head.weight.detach())
    assert not torch.equal(vectorized.final_state["body.0.0.weight"], initial.body[0][0].weight.detach())
    for name, value in sequential.final_state.items():
        torch.testing.assert_close(vectorized.final_state[name], value, rtol=1e-3, atol=1e-4)
    losses = [[m["train_loss"] for m in run.metrics] for run in (sequential, vectorized)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert np.nanmean(vectorized.accuracy_curve()[:, -1]) > 0.3


def test_vectorized_personal_heads_stay_per_client(digits):
    config = small_config(algorithm="fedper", executor="vectorized", rounds=2)
    sequential = simulate(config.model_copy(update={"executor": "sequential"}), digits, partition_for(config, digits))
    vectorized = simulate(config, digits, partition_for(config, digits))
    assert sequential.personal.keys() == vectorized.personal.keys() and len(vectorized.personal) > 1
    heads = [state["head.weight"] for state in vectorized.personal.values()]
    assert not np.array_equal(heads[0], heads[1])
    for client, state in sequential.personal.items():
        np.testing.assert_allclose(vectorized.personal[client]["head.weight"], state["head.weight"], rtol=1e-3,
                                   atol=1e-4)


@pytest.mark.parametrize(("requested", "device", "algorithm", "chosen"), [
    ("auto", "cpu", "fedbabu", "sequential"),
    ("auto", "cuda", "fedbabu", "vectorized"),
    ("auto", "cuda", "fedprox", "sequential"),
    ("sequential", "cuda", "fedbabu", "sequential"),
    ("vectorized", "cpu", "fedavg", "vectorized"),
])
def test_the_executor_choice(digits, requested, device, algorithm, chosen):
    config = small_config(algorithm=algorithm)
    model = model_for(digits)
    assert choose_executor(requested, device, ALGORITHMS[algorithm](config), model) == chosen


def test_the_algorithms_the_engine_page_lists_as_vectorizable(digits):
    model = model_for(digits)
    plain = {name for name, algorithm in ALGORITHMS.items()
             if choose_executor("auto", "cuda", algorithm(small_config(algorithm=name)), model) == "vectorized"}
    assert plain == {"fedavg", "fedbabu", "fedper", "lg_fedavg", "feduh", "fedbn", "knnper"}


def test_an_impossible_vectorized_request_is_refused_with_the_reason(digits):
    with pytest.raises(UserError, match=r"executor: vectorized runs plain SGD client updates only \(cross-entropy, "
                                        r"a new optimizer every round, no clip_grad_norm\), and ditto"):
        choose_executor("vectorized", "cpu", ALGORITHMS["ditto"](small_config(algorithm="ditto")), model_for(digits))
    with_stats = model_for(digits)
    with_stats.body.append(torch.nn.BatchNorm1d(4))
    with pytest.raises(UserError, match=r"needs a model without buffers, and this one has body\.3\.running_mean"):
        choose_executor("vectorized", "cpu", ALGORITHMS["fedbabu"](small_config()), with_stats)
