"""FedUH and FedNH: fixed uniform prototypes, and prototypes smoothed toward the clients' class means.

The properties are those their authors' code defines (Yutong-Dai/FedNH): orthonormal bias-free
prototypes scored by cosine times a scale; FedUH never changes them; FedNH moves only the classes
the round's clients hold, with rho weighting the old prototype, and is FedUH at rho = 1.
"""

from __future__ import annotations

import pytest
import torch
from conftest import StopAtRound, same
from torch import nn

from fedbabu.algorithms import ALGORITHMS
from fedbabu.algorithms.feduh import PrototypeHead
from fedbabu.config import DIGITS_DEFAULT, build_config
from fedbabu.engine.params import Layout
from fedbabu.engine.simulation import network, runtime_for, simulate
from fedbabu.errors import UserError
from fedbabu.runner import partition_for, resume_experiment, run_experiment
from fedbabu.training import ClientData

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides):
    values = {**DIGITS_DEFAULT, "num_clients": 5, "rounds": 3, "client_fraction": 0.6, "eval_every": 0,
              "workers": 1, "finetune": {**DIGITS_DEFAULT["finetune"], "epochs": 1}}
    values.update(overrides)
    return build_config(values)


def head(classes: int = 10, features: int = 32, scale: float = 2.0) -> PrototypeHead:
    return PrototypeHead(features, classes, scale, torch.Generator().manual_seed(0))


def test_prototypes_are_orthonormal_rows_without_bias_and_logits_are_bounded_by_the_scale():
    prototypes = head()
    assert [n for n, _ in prototypes.named_parameters()] == ["prototypes", "scale"]
    torch.testing.assert_close(prototypes.prototypes @ prototypes.prototypes.t(), torch.eye(10), atol=1e-5, rtol=0)
    logits = prototypes(torch.randn(64, 32, generator=torch.Generator().manual_seed(1)) * 50)
    assert logits.abs().max() <= 2.0 + 1e-5


def test_logits_do_not_change_when_the_features_are_scaled():
    prototypes, features = head(), torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(prototypes(features), prototypes(7.5 * features))


def test_more_classes_than_features_is_refused_in_one_line(digits):
    config = tiny(algorithm="feduh")
    with pytest.raises(UserError, match="needs at least as many features as classes") as refused:
        ALGORITHMS["feduh"](config).make_head(nn.Linear(4, 10), torch.Generator())
    assert "\n" not in str(refused.value)


def test_feduh_prototypes_are_bit_identical_through_training_and_aggregation_and_only_the_scale_moves(digits):
    config = tiny(algorithm="feduh")
    initial = dict(network(config, digits).named_parameters())
    result = simulate(config, digits, partition_for(config, digits))
    assert torch.equal(result.final_state["head.prototypes"], initial["head.prototypes"])
    assert not torch.equal(result.final_state["head.scale"], initial["head.scale"]), "the scale is learned"
    assert ALGORITHMS["feduh"](config).shared_parts == ("body", "head.scale")
    fixed = tiny(algorithm="feduh", feduh={"learn_scale": False, "scale": 30.0})
    kept = simulate(fixed, digits, partition_for(fixed, digits))
    assert float(kept.final_state["head.scale"]) == 30.0
    assert kept.bytes_per_round_per_client == result.bytes_per_round_per_client - 2 * 4, "the scale no longer travels"


def _client(config, digits, client):
    partition = partition_for(config, digits)
    return ClientData(digits, partition.train[client], partition.test[client], runtime_for(config))


def test_a_fednh_client_round_leaves_the_prototypes_and_reports_count_scaled_unit_class_means(digits):
    config = tiny(algorithm="fednh")
    algorithm = ALGORITHMS["fednh"](config)
    model = network(config, digits).to(memory_format=torch.channels_last)
    before = model.head.prototypes.detach().clone()
    data = _client(config, digits, 0)
    update = algorithm.client_update(model, data, {}, config.lr, torch.Generator().manual_seed(0))
    assert torch.equal(model.head.prototypes, before)
    counts, sums = update.statistics["class_counts"], update.statistics["class_sums"]
    assert torch.equal(counts, data.class_counts().double())
    norms = sums.norm(dim=1)
    torch.testing.assert_close(norms[counts > 0], counts[counts > 0], rtol=1e-9, atol=0)
    assert (sums[counts == 0] == 0).all(), "an absent class reports nothing"


def _prototype_step(rho: float, sums: torch.Tensor, counts: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    algorithm = ALGORITHMS["fednh"](tiny(algorithm="fednh", fednh={"rho": rho}))
    state = {"head.prototypes": old, "head.scale": torch.tensor(1.0)}
    return algorithm.server_update(state, dict(state), {"class_sums": sums, "class_counts": counts})["head.prototypes"]


def _unit_rows(rows: int, dim: int, seed: int) -> torch.Tensor:
    return nn.functional.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_the_server_step_smooths_held_classes_keeps_the_others_and_rho_one_changes_nothing():
    old = _unit_rows(4, 6, 0)
    mean = _unit_rows(4, 6, 1).double()
    counts = torch.tensor([3.0, 0.0, 5.0, 1.0], dtype=torch.float64)
    sums = mean * counts[:, None]
    new = _prototype_step(0.9, sums, counts, old)
    torch.testing.assert_close(new.norm(dim=1), torch.ones(4), atol=1e-6, rtol=0)
    assert torch.equal(new[1], old[1]), "a class no client held keeps its prototype exactly"
    expected = nn.functional.normalize(0.9 * old.double() + 0.1 * mean, dim=1).float()
    torch.testing.assert_close(new[[0, 2, 3]], expected[[0, 2, 3]])
    assert torch.equal(_prototype_step(1.0, sums, counts, old), old)
    torch.testing.assert_close(_prototype_step(0.0, sums, counts, old)[[0, 2, 3]], mean.float()[[0, 2, 3]])


def test_counts_weight_the_clients_means():
    old = _unit_rows(1, 6, 2)
    client_a, client_b = _unit_rows(1, 6, 3).double(), _unit_rows(1, 6, 4).double()

    def pooled(count_a: float) -> torch.Tensor:
        sums = client_a * count_a + client_b * 2.0
        return _prototype_step(0.0, sums, torch.tensor([count_a + 2.0], dtype=torch.float64), old)

    closer = (pooled(4.0).double() @ client_a.t()).item()
    assert closer > (pooled(2.0).double() @ client_a.t()).item(), "more samples pull the prototype toward that client"
    assert torch.equal(pooled(0.0), _prototype_step(0.0, client_b * 2.0, torch.tensor([2.0], dtype=torch.float64),
                                                    old)), "a client without the class contributes nothing"


def test_fednh_moves_its_prototypes_and_at_rho_one_is_feduh_bit_for_bit(digits):
    runs = {}
    for name, config in {"feduh": tiny(algorithm="feduh"), "fednh": tiny(algorithm="fednh"),
                         "fednh-rho1": tiny(algorithm="fednh", fednh={"rho": 1.0})}.items():
        runs[name] = simulate(config, digits, partition_for(config, digits))
    initial = dict(network(tiny(algorithm="fednh"), digits).named_parameters())["head.prototypes"]
    moved = runs["fednh"].final_state["head.prototypes"]
    assert not torch.equal(moved, initial)
    torch.testing.assert_close(moved.norm(dim=1), torch.ones(10), atol=1e-5, rtol=0)
    assert same(runs["fednh-rho1"].final_state, runs["feduh"].final_state)
    assert [c["accuracies"] for c in runs["fednh-rho1"].clients] == [c["accuracies"] for c in runs["feduh"].clients]


def test_fednh_is_bit_identical_on_one_and_two_workers(digits):
    one = simulate(tiny(algorithm="fednh"), digits, partition_for(tiny(), digits))
    two = simulate(tiny(algorithm="fednh", workers=2), digits, partition_for(tiny(), digits))
    assert same(one.final_state, two.final_state)
    assert [c["accuracies"] for c in one.clients] == [c["accuracies"] for c in two.clients]


def test_an_interrupted_fednh_run_resumes_to_the_same_model_and_prototypes(digits, tmp_path):
    config = tiny(algorithm="fednh", rounds=4, checkpoint_every=2)
    reference = run_experiment(config, tmp_path / "ref", dataset=digits).result
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "run", StopAtRound(3), dataset=digits)
    resumed = resume_experiment(tmp_path / "run").result
    assert same(resumed.final_state, reference.final_state)
    assert [c["accuracies"] for c in resumed.clients] == [c["accuracies"] for c in reference.clients]


def test_own_and_common_evaluation_change_only_the_personalization(digits):
    own = simulate(tiny(algorithm="feduh"), digits, partition_for(tiny(), digits))
    common = simulate(tiny(algorithm="feduh", feduh={"evaluation": "common"}), digits, partition_for(tiny(), digits))
    assert same(own.final_state, common.final_state)
    assert [len(c["accuracies"]) for c in own.clients] == [2] * 5, "before and after the final local round"
    assert [len(c["accuracies"]) for c in common.clients] == [2] * 5, "before and after one fine-tuning epoch"
    assert [c["accuracies"][0] for c in own.clients] == [c["accuracies"][0] for c in common.clients]
    assert [c["accuracies"] for c in own.clients] != [c["accuracies"] for c in common.clients]
    assert ALGORITHMS["feduh"](tiny(algorithm="feduh")).personalization_note().startswith("feduh's own")


def test_the_shared_vector_holds_the_prototypes_only_for_fednh(digits):
    for name, shared in (("feduh", {"head.scale"}), ("fednh", {"head.prototypes", "head.scale"})):
        config = tiny(algorithm=name)
        layout = Layout(network(config, digits))
        algorithm = ALGORITHMS[name](config)
        heads = {n for n in layout.names if n.startswith("head.")}
        mask = layout.mask(algorithm.shared_parts)
        offsets = dict(zip(layout.names, torch.tensor([0, *layout.sizes]).cumsum(0).tolist(), strict=False))
        assert {n for n in heads if bool(mask[offsets[n]])} == shared
