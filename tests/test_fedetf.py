"""FedETF: the simplex ETF's geometry, the head's bounds, what federation trains and shares, the own personalization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import StopAtRound, client_data, run, same
from torch import nn

from fedbabu.algorithms import ALGORITHMS
from fedbabu.algorithms.base import Algorithm
from fedbabu.algorithms.fedetf import FedETF, orthonormal_columns, simplex_etf
from fedbabu.config import DIGITS_DEFAULT, build_config
from fedbabu.engine.params import Layout, weighted_mean
from fedbabu.engine.round import sample_clients
from fedbabu.engine.simulation import TRAIN_STREAM, client_generator, client_model, runtime_for
from fedbabu.engine.vectorized import choose_executor, vectorizable
from fedbabu.errors import UserError
from fedbabu.files import load_tensors
from fedbabu.personalization import personalization_config
from fedbabu.results.rebuild import read_curves
from fedbabu.runner import partition_for, resume_experiment, run_experiment
from fedbabu.training import ClientData, evaluate, state_of

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_PROTOCOL = {"adapt_epochs": 1, "alternations": 2, "etf_epochs": 1, "projection_epochs": 1}
"""The own personalization, cut to 5 epochs per client so that a federation here takes seconds."""


def tiny(**overrides):
    """Five digits clients, all sampled every round, three rounds of one epoch."""
    values = {**DIGITS_DEFAULT, "algorithm": "fedetf", "num_clients": 5, "rounds": 3, "client_fraction": 1.0,
              "local_epochs": 1, "eval_every": 0, "workers": 1, "checkpoint_every": 1, "fedetf": SMALL_PROTOCOL}
    values.update(overrides)
    return build_config(values)


def model_for(config, digits):
    """The network every party of the run builds, at its seeded initial weights."""
    return client_model(config, digits, runtime_for(config))


@pytest.fixture(scope="module")
def federation(digits):
    """One finished tiny federation, the reference of the bit-identity tests."""
    config = tiny()
    return config, run(config, digits)


@pytest.mark.parametrize(("dim", "classes"), [(2, 2), (10, 10), (64, 10), (256, 100)])
def test_simplex_etf_has_unit_columns_equal_angles_zero_sum_and_rank_c_minus_1(dim, classes):
    basis = orthonormal_columns(dim, classes, torch.Generator().manual_seed(3))
    assert basis.shape == (dim, classes)
    assert torch.allclose(basis.T @ basis, torch.eye(classes, dtype=torch.float64), atol=1e-10)
    etf = simplex_etf(basis)
    gram = classes / (classes - 1) * torch.eye(classes, dtype=torch.float64) - 1 / (classes - 1)
    assert torch.allclose(etf.T @ etf, gram, atol=1e-10)
    assert torch.allclose(etf.sum(dim=1), torch.zeros(dim, dtype=torch.float64), atol=1e-10)
    assert int(torch.linalg.matrix_rank(etf)) == classes - 1


def test_the_head_is_drawn_from_the_generator_and_m_is_its_etf():
    algorithm = FedETF(tiny(fedetf={"etf_dim": 12, "temperature": 2.5}))
    head = algorithm.make_head(nn.Linear(30, 10), torch.Generator().manual_seed(7))
    expected = simplex_etf(orthonormal_columns(12, 10, torch.Generator().manual_seed(7))).float()
    assert torch.equal(head.etf, expected) and head.etf.shape == (12, 10)
    assert torch.equal(head.weight, head.etf.T) and head.in_features == 30
    assert head.projection.weight.shape == (12, 30) and head.temperature.item() == 2.5
    again = algorithm.make_head(nn.Linear(30, 10), torch.Generator().manual_seed(7))
    other = algorithm.make_head(nn.Linear(30, 10), torch.Generator().manual_seed(8))
    assert same(dict(again.named_parameters()), dict(head.named_parameters()))
    assert not torch.equal(other.etf, head.etf) and not torch.equal(other.projection.weight, head.projection.weight)
    assert FedETF(tiny()).make_head(nn.Linear(30, 10), torch.Generator()).etf.shape == (30, 10), "unset = d"


@pytest.mark.parametrize(("features", "etf_dim", "shown"), [(30, 9, "9 is fewer"), (6, None, "body's 6 features")])
def test_an_etf_narrower_than_the_classes_is_refused_in_one_line(features, etf_dim, shown):
    algorithm = FedETF(tiny(fedetf={"etf_dim": etf_dim}))
    with pytest.raises(UserError, match=r"fedetf\.etf_dim") as caught:
        algorithm.make_head(nn.Linear(features, 10), torch.Generator())
    assert shown in str(caught.value) and "\n" not in str(caught.value)


def test_an_etf_narrower_than_the_classes_is_refused_before_any_training(digits):
    assert ALGORITHMS["fedetf"] is FedETF
    with pytest.raises(UserError, match=r"fedetf\.etf_dim: 9 is fewer than the 10 classes"):
        model_for(tiny(fedetf={"etf_dim": 9}), digits)
    with pytest.raises(UserError, match=r"fedetf\.temperature"):
        tiny(fedetf={"temperature": 0.0})


def test_logits_are_beta_times_cosines_to_the_class_vectors_bounded_by_beta():
    algorithm = FedETF(tiny(fedetf={"etf_dim": 10}))
    head = algorithm.make_head(nn.Linear(20, 10), torch.Generator().manual_seed(1))
    features = 100 * torch.randn(500, 20, generator=torch.Generator().manual_seed(2))
    directions = head.projection(features)
    directions = directions / directions.norm(dim=1, keepdim=True)
    for beta in (10.0, 0.5, -3.0):
        with torch.no_grad():
            head.temperature.fill_(beta)
            logits = head(features)
        assert logits.abs().max() <= abs(beta) * (1 + 1e-6)
        assert torch.allclose(logits, beta * directions @ head.etf, atol=1e-5)
    square = algorithm.make_head(nn.Linear(10, 10), torch.Generator().manual_seed(1))
    with torch.no_grad():
        square.projection.weight.copy_(torch.eye(10))
        square.projection.bias.zero_()
        at_class_vectors = square(5 * square.weight)
    expected = 10.0 * (10 / 9 * torch.eye(10) - 1 / 9)
    assert torch.allclose(at_class_vectors, expected, atol=1e-5), "the bound is reached at the class vectors"


def test_the_prediction_does_not_depend_on_a_positive_temperature():
    head = FedETF(tiny()).make_head(nn.Linear(20, 10), torch.Generator().manual_seed(1))
    features = torch.randn(300, 20, generator=torch.Generator().manual_seed(4))
    predictions = []
    with torch.no_grad():
        for beta in (0.01, 1.0, 10.0, 1000.0, -1.0):
            head.temperature.fill_(beta)
            predictions.append(head(features).argmax(1))
    assert all(torch.equal(p, predictions[0]) for p in predictions[1:4])
    assert not torch.equal(predictions[4], predictions[0]), "a negative temperature would flip it"


def test_a_round_trains_with_the_balanced_softmax_of_the_clients_counts(digits, monkeypatch):
    import fedbabu.algorithms.base as base

    calls = []
    monkeypatch.setattr(base, "sgd_epochs", lambda model, data, parts, settings, generator, **options:
                        calls.append((parts, settings, options["loss"])) or 0.0)
    config = tiny()
    logits = torch.randn(40, 10, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(40) % 10
    data = client_data(config, digits, 0)
    FedETF(config).client_update(model_for(config, digits), data, {}, 0.07, torch.Generator())
    (parts, settings, loss), = calls
    assert parts == ("body", "head.projection", "head.temperature") and settings.lr == 0.07
    counts = data.class_counts()
    assert (counts == 0).any(), "the shards leave classes out, whose count is taken as 1"
    assert torch.allclose(loss(logits, labels), nn.functional.cross_entropy(logits + counts.clamp(min=1).log(),
                                                                           labels))
    balanced = np.concatenate([np.flatnonzero(digits.train_y.numpy() == c)[:4] for c in range(10)])
    equal = ClientData(digits, balanced, balanced[:1], runtime_for(config))
    assert torch.allclose(FedETF(config).training_loss(equal)(logits, labels),
                          nn.functional.cross_entropy(logits, labels), atol=1e-6)
    assert not torch.allclose(loss(logits, labels), nn.functional.cross_entropy(logits, labels), atol=1e-3)


def test_a_round_is_the_default_one_on_fedetfs_loss_and_never_runs_vectorized(digits):
    """FedETF states its objective, not a round of its own: its round is the base class's, through the
    client's kept optimizer under the authors' training, and the vectorized executor, which computes
    cross-entropy through a fresh optimizer only, refuses it either way."""
    assert FedETF.client_update is Algorithm.client_update
    assert FedETF.training_loss is not Algorithm.training_loss
    for training in ("common", "authors"):
        algorithm = FedETF(tiny(fedetf={"training": training}))
        assert not vectorizable(algorithm)
        with pytest.raises(UserError, match="vectorized runs plain SGD client updates only"):
            choose_executor("vectorized", "cuda", algorithm, model_for(algorithm.config, digits))


def test_m_never_changes_and_never_travels(digits, federation):
    config, result = federation
    initial = model_for(config, digits)
    assert torch.equal(result.final_state["head.etf"], initial.head.etf)
    moved = [n for n, p in initial.named_parameters() if not torch.equal(result.final_state[n], p.detach())]
    assert set(moved) == set(result.final_state) - {"head.etf"}, "everything else trains"
    layout = Layout(initial)
    assert int(layout.mask(FedETF.shared_parts).sum()) == layout.total - initial.head.etf.numel()
    assert result.bytes_per_round_per_client == 8 * layout.count(FedETF.shared_parts)


def test_clients_train_beta_but_not_m_and_the_server_averages_what_they_share(digits):
    config = tiny(rounds=1, fedetf={"adapt_epochs": 0, "alternations": 0})
    result = run(config, digits)
    algorithm, partition = FedETF(config), partition_for(config, digits)
    clients = sample_clients(config.seed, 0, config.num_clients, config.client_fraction)
    updates = []
    for client in clients:
        model = model_for(config, digits)
        algorithm.client_update(model, client_data(config, digits, client), {}, config.lr_at(0),
                                client_generator(config.seed, 0, client, TRAIN_STREAM))
        updates.append(state_of(model, FedETF.shared_parts))
        assert torch.equal(model.head.etf, model_for(config, digits).head.etf), "a client never moves M"
    betas = [float(u["head.temperature"]) for u in updates]
    assert all(b != 10.0 for b in betas) and len(set(betas)) == len(betas), "each client moves beta its own way"
    weights = [len(partition.train[c]) for c in clients]
    for name in updates[0]:
        assert torch.equal(result.final_state[name], weighted_mean([u[name] for u in updates], weights)), name


def _phases(monkeypatch):
    """Every training phase of FedETF's personalization: (parts, settings, plain CE?, parameters that moved)."""
    import fedbabu.algorithms.fedetf as fedetf

    phases = []
    original = fedetf.sgd_epochs

    def spy(model, data, parts, settings, generator, **options):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = original(model, data, parts, settings, generator, **options)
        moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
        phases.append((parts, settings, options.get("loss") is None, moved))
        return loss

    monkeypatch.setattr(fedetf, "sgd_epochs", spy)
    return phases


def test_own_personalization_adapts_then_alternates_between_m_and_the_projection(digits, monkeypatch):
    config = tiny(lr_milestones=[2], weight_decay=1e-3)
    phases = _phases(monkeypatch)
    model, data = model_for(config, digits), client_data(config, digits, 1)
    initial = evaluate(model, data)
    curve = FedETF(config).personalize(model, data, {}, torch.Generator().manual_seed(0))
    assert len(curve) == 2 + SMALL_PROTOCOL["alternations"] and curve[0] == initial
    (parts, adapt, plain, moved), *alternations = phases
    assert parts == FedETF.trained_parts and not plain and "head.etf" not in moved and "head.temperature" in moved
    assert (adapt.epochs, adapt.lr, adapt.momentum, adapt.weight_decay) == (1, config.lr_at(2), 0.9, 1e-3)
    projection = {"head.projection.weight", "head.projection.bias"}
    assert len(alternations) == 2 * SMALL_PROTOCOL["alternations"]
    for (etf_parts, etf, etf_plain, etf_moved), (proj_parts, proj, proj_plain, proj_moved) in zip(
            alternations[::2], alternations[1::2], strict=True):
        assert etf_parts == ("head.etf",) and etf_plain and etf_moved == {"head.etf"}
        assert (etf.lr, etf.momentum, etf.weight_decay) == (pytest.approx(adapt.lr * 0.1 / 0.04), 0.0, 0.0)
        assert proj_parts == ("head.projection",) and proj_plain and proj_moved == projection
        assert (proj.lr, proj.momentum, proj.weight_decay) == (pytest.approx(adapt.lr * 0.05 / 0.04), 0.9, 5e-4), \
            "the authors' 0.1 and 0.05 relative to their adaptation lr of 0.04"


def test_common_evaluation_is_the_fine_tuning_of_every_algorithm_and_a_free_key(digits, federation):
    config = tiny(fedetf={"evaluation": "common"}, finetune={**DIGITS_DEFAULT["finetune"], "epochs": 1})
    algorithm, data = FedETF(config), client_data(config, digits, 2)
    ours = algorithm.personalize(model_for(config, digits), data, {}, torch.Generator().manual_seed(0))
    base = Algorithm.personalize(algorithm, model_for(config, digits), data, {}, torch.Generator().manual_seed(0))
    assert ours == base and len(ours) == 2
    assert algorithm.personalization_note() == "common protocol: full fine-tuning, 1 epochs, lr 0.01"
    assert algorithm.personalization_unit() == "epoch" and FedETF(tiny()).personalization_unit() == "stage"
    trained = federation[0]
    assert personalization_config(trained, {"fedetf": {"evaluation": "common", "alternations": 5}}).settings_for(
        "fedetf").alternations == 5
    with pytest.raises(UserError, match=r"fedetf\.temperature"):
        personalization_config(trained, {"fedetf": {"temperature": 1.0}})
    assert "20 x (3 epochs on the ETF" in FedETF(tiny(fedetf={})).personalization_note()


def test_two_workers_give_the_bits_of_one(digits, federation):
    _, one = federation
    two = run(tiny(workers=2), digits)
    assert same(one.final_state, two.final_state)
    assert [c["accuracies"] for c in one.clients] == [c["accuracies"] for c in two.clients]


def test_resume_after_an_interruption_gives_the_bits_of_an_uninterrupted_run(digits, federation, tmp_path):
    config, reference = federation
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "run", StopAtRound(3), dataset=digits)
    resume_experiment(tmp_path / "run")
    assert same(load_tensors(tmp_path / "run" / "model.pt"), reference.final_state)
    assert np.allclose(read_curves(tmp_path / "run" / "clients.csv"), reference.accuracy_curve(), atol=1e-6, rtol=0)
