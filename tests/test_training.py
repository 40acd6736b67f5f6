"""Behaviour of the engine and the two core algorithms on the real digits data."""

import numpy as np
import pytest
import torch
from conftest import small_config

from fedbabu.algorithms import ALGORITHMS
from fedbabu.engine.params import weighted_mean
from fedbabu.engine.round import sample_clients
from fedbabu.engine.simulation import TRAIN_STREAM, client_generator, runtime_for, simulate
from fedbabu.errors import UserError
from fedbabu.models import build_model
from fedbabu.runner import partition_for
from fedbabu.training import ClientData, load_state, state_of


def _run(config, digits):
    return simulate(config, digits, partition_for(config, digits))


def _initial_model(config, digits):
    return build_model(config.resolved_model(), digits.channels, digits.image_size, digits.num_classes,
                       config.head_init, config.seed)


def test_fedbabu_head_is_bit_identical_with_momentum_and_weight_decay(digits):
    config = small_config(algorithm="fedbabu", momentum=0.9, weight_decay=5e-3)
    result = _run(config, digits)
    initial = _initial_model(config, digits)
    assert torch.equal(result.final_state["head.weight"], initial.head.weight)
    assert torch.equal(result.final_state["head.bias"], initial.head.bias)
    assert not torch.equal(result.final_state["body.0.0.weight"], initial.body[0][0].weight)


def test_fedavg_moves_the_head(digits):
    config = small_config(algorithm="fedavg")
    result = _run(config, digits)
    assert not torch.equal(result.final_state["head.weight"], _initial_model(config, digits).head.weight)


def test_fedbabu_refuses_a_zero_head(digits):
    with pytest.raises(UserError, match="head_init"):
        _run(small_config(algorithm="fedbabu", head_init="zeros"), digits)


def test_weighted_mean():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([4.0, 8.0])
    assert torch.allclose(weighted_mean([a, b], [1, 2]), torch.tensor([3.0, 6.0]))


def test_aggregation_is_the_sample_weighted_mean_of_client_updates(digits):
    """One FedAvg round over clients of different sizes, recomputed by hand outside the engine."""
    config = small_config(algorithm="fedavg", partition="dirichlet", dirichlet_alpha=0.3, num_clients=4,
                          client_fraction=1.0, rounds=1, eval_every=0)
    partition = partition_for(config, digits)
    sizes = [len(t) for t in partition.train]
    assert len(set(sizes)) > 1
    result = simulate(config, digits, partition)
    algorithm = ALGORITHMS["fedavg"](config)
    runtime = runtime_for(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine computes with one thread per process; so must the reference
    updates = []
    for client in range(4):
        model = _initial_model(config, digits).to(memory_format=torch.channels_last)
        data = ClientData(digits, partition.train[client], partition.test[client], runtime)
        algorithm.client_update(model, data, {}, config.lr_at(0), client_generator(config.seed, 0, client,
                                                                                      TRAIN_STREAM))
        updates.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.set_num_threads(threads)
    expected = weighted_mean(updates, sizes)
    got = torch.cat([v.reshape(-1) for v in result.final_state.values()])
    assert torch.equal(got, expected)
    plain_mean = torch.stack(updates).mean(0)
    assert not torch.allclose(got, plain_mean, atol=1e-6), "weights must matter for unequal clients"


@pytest.mark.parametrize(("part", "frozen"), [("head", "body"), ("body", "head")])
def test_finetuning_one_part_leaves_the_other_untouched(digits, part, frozen):
    config = small_config(finetune={"part": part, "epochs": 2, "lr": 0.05})
    partition = partition_for(config, digits)
    model = _initial_model(config, digits)
    before = state_of(model, (frozen,))
    moved_before = state_of(model, (part,))
    data = ClientData(digits, partition.train[0], partition.test[0], runtime_for(config))
    accuracies = ALGORITHMS["fedavg"](config).personalize(model, data, {}, torch.Generator().manual_seed(0))
    assert len(accuracies) == 3
    after = state_of(model, (frozen,))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(moved_before[k], v) for k, v in state_of(model, (part,)).items())
    load_state(model, before)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedbabu"])
def test_finetuning_keeps_one_optimizer_across_epochs(digits, algorithm):
    """The authors build one SGD and run every fine-tuning epoch through it: the momentum buffer is
    never reset. The personalized weights must equal a plain loop's, bit for bit, on the same batches."""
    config = small_config(algorithm=algorithm, finetune={"part": "full", "epochs": 3, "lr": 0.05, "momentum": 0.9})
    partition = partition_for(config, digits)
    data = ClientData(digits, partition.train[0], partition.test[0], runtime_for(config))
    model = _initial_model(config, digits)
    accuracies = ALGORITHMS[algorithm](config).personalize(model, data, {}, torch.Generator().manual_seed(3))
    assert len(accuracies) == 4

    reference = _initial_model(config, digits)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        reference.train()
        for x, y in data.train_batches(config.finetune.batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(reference(x), y).backward()
            optimizer.step()
    got, expected = dict(model.named_parameters()), dict(reference.named_parameters())
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_a_client_test_set_is_one_batch_by_default(digits):
    """Batch norm uses batch statistics at test time: a large client test set is one batch (as the authors
    evaluate 100 images), not full batches plus a small remainder whose statistics change the result."""
    from fedbabu.training import evaluate

    config = small_config()
    model = _initial_model(config, digits).eval()
    test_idx = np.arange(1001) % len(digits.test_y)
    data = ClientData(digits, np.arange(10), test_idx, runtime_for(config))
    assert [len(y) for _, y in data.test_batches()] == [1001]
    with torch.no_grad():
        x, y = next(data.test_batches())
        one_batch = int((model(x).argmax(1) == y).sum()) / 1001
    assert evaluate(model, data) == one_batch
    bounded = ClientData(digits, np.arange(10), test_idx[:250], runtime_for(small_config(eval_batch_size=100)))
    assert [len(y) for _, y in bounded.test_batches()] == [84, 83, 83]


def test_sampling_is_seeded_and_fraction_sized():
    a = sample_clients(0, 5, 100, 0.1)
    assert a == sample_clients(0, 5, 100, 0.1) and len(a) == 10
    assert a != sample_clients(0, 6, 100, 0.1)
    assert sample_clients(0, 0, 3, 0.01) and len(sample_clients(0, 0, 3, 0.01)) == 1


def test_zero_rounds_evaluates_the_initial_model(digits):
    result = _run(small_config(rounds=0), digits)
    assert result.metrics == []
    curves = result.accuracy_curve()
    assert curves.shape == (10, 3)
    assert 0.0 <= np.nanmean(curves[:, 0]) < 0.5


@pytest.mark.slow
def test_digits_end_to_end_reaches_well_above_chance(digits):
    from fedbabu.config import load_config

    config = load_config(None, ["workers=1"])
    result = _run(config, digits)
    curves = result.accuracy_curve()
    assert np.mean(curves[:, 0]) > 0.6, "global model should be far above 10% chance"
    assert np.mean(curves[:, -1]) > 0.9, "personalized 2-class clients should be nearly perfect"
    assert result.metrics[-1]["test_accuracy"] > 0.6
    assert result.metrics[-1]["train_loss"] < result.metrics[0]["train_loss"]
