"""FedRoD: its two heads, its round (balanced step of the shared parts, residual step of the personal
head), personal heads that persist and never travel, and its evaluation, on the real digits data."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from conftest import StopAtRound, client_data, five_clients, model_for, run, same
from torch import nn

from fedbabu.algorithms import ALGORITHMS
from fedbabu.algorithms.fedrod import ABSENT_CLASS_COUNT, FedRoD, RoDHead
from fedbabu.engine.checkpoint import load_checkpoint
from fedbabu.engine.params import Layout
from fedbabu.engine.simulation import personalize_generator, runtime_for
from fedbabu.errors import UserError
from fedbabu.files import load_tensors
from fedbabu.personalization import personalization_config
from fedbabu.results import report
from fedbabu.runner import partition_for, resume_experiment, run_experiment
from fedbabu.training import ClientData, balanced_softmax, evaluate, load_state, state_of

pytestmark = pytest.mark.usefixtures("one_thread")

SHARED, PERSONAL = FedRoD.shared_parts, FedRoD.personal_parts
ALL = ("body", "head")


def tiny(**overrides):
    return five_clients("fedrod", **overrides)


def shifted(state: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in state.items()}


@pytest.fixture(scope="module")
def recorded(digits):
    """A two-round run whose client updates are recorded: (personal state given, personal state returned)."""
    calls = []
    original = FedRoD.client_update

    def spy(self, model, data, personal, lr, generator):
        given = {k: v.clone() for k, v in personal.items()}
        update = original(self, model, data, personal, lr, generator)
        calls.append((given, update.personal))
        return update

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FedRoD, "client_update", spy)
        result = run(tiny(), digits)
    return result, calls


def test_the_head_is_a_generic_head_plus_a_personal_copy_and_predicts_with_their_sum(digits):
    generic = nn.Linear(256, 10)
    head = FedRoD(tiny()).make_head(generic, torch.Generator().manual_seed(0))
    assert isinstance(head, RoDHead) and head.generic is generic and head.in_features == 256
    assert torch.equal(head.personal.weight, generic.weight) and torch.equal(head.personal.bias, generic.bias)
    assert head.personal.weight.data_ptr() != generic.weight.data_ptr(), "a copy, not the same tensor"
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in head.personal.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    z = torch.randn(7, 256, generator=g)
    assert torch.equal(head(z), head.generic(z) + head.personal(z)), "the sum of the logits, not their mean"
    assert torch.equal(head.weight, generic.weight + head.personal.weight)
    with torch.no_grad():
        for p in head.personal.parameters():
            p.zero_()
    assert torch.equal(head(z), generic(z)), "a zero personal head predicts as the generic one"
    model = model_for(tiny(), digits)
    heads = {n: p for n, p in model.named_parameters() if n.startswith("head.")}
    assert set(heads) == {"head.generic.weight", "head.generic.bias", "head.personal.weight", "head.personal.bias"}
    assert torch.equal(heads["head.personal.weight"], heads["head.generic.weight"]), "every party starts equal"


def test_balanced_softmax_as_fedrod_uses_it():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(32, 10, generator=g), torch.randint(0, 10, (32,), generator=g)
    plain = nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(balanced_softmax(torch.full((10,), 7), ABSENT_CLASS_COUNT)(logits, labels), plain)
    counts = torch.tensor([5, 1, 0, 3, 9, 0, 2, 4, 6, 8])
    loss = balanced_softmax(counts, ABSENT_CLASS_COUNT)
    prior = torch.log(torch.where(counts > 0, counts.double(), torch.tensor(1e-12, dtype=torch.float64))).float()
    assert ABSENT_CLASS_COUNT == 1e-12 and prior[2].item() == pytest.approx(-27.631, abs=1e-3)
    assert torch.allclose(loss(logits, labels), nn.functional.cross_entropy(logits + prior, labels))
    present = counts + 1  # scale-free where every class is present: the absent count is not scaled
    assert torch.allclose(balanced_softmax(present * 3, ABSENT_CLASS_COUNT)(logits, labels),
                          balanced_softmax(present, ABSENT_CLASS_COUNT)(logits, labels))
    one_class = torch.zeros(10, dtype=torch.long)
    one_class[4] = 30
    leaf = logits.clone().requires_grad_()
    value = balanced_softmax(one_class, ABSENT_CLASS_COUNT)(leaf, torch.full((32,), 4))
    value.backward()
    assert torch.isfinite(value) and value.item() < 1e-8, "a single-class client has (almost) nothing to learn"
    assert leaf.grad.abs().max() < 1e-8


def test_a_round_interleaves_a_balanced_step_of_the_shared_parts_and_a_plain_step_of_the_personal_head(
        digits, monkeypatch):
    config = tiny(local_epochs=2, weight_decay=1e-3)
    model = model_for(config, digits)
    partition = partition_for(config, digits)
    data = ClientData(digits, partition.train[0][:25], partition.test[0], runtime_for(config))
    optimizers, steps = [], []
    real = torch.optim.SGD

    class Recording(real):
        def __init__(self, params, **options):
            super().__init__(params, **options)
            optimizers.append(self)

        def step(self, closure=None):
            before = state_of(model, ALL)
            result = super().step(closure)
            after = state_of(model, ALL)
            steps.append((self, {n for n in before if not torch.equal(before[n], after[n])}))
            return result

    monkeypatch.setattr(torch.optim, "SGD", Recording)
    update = ALGORITHMS["fedrod"](config).client_update(model, data, {}, 0.03, torch.Generator().manual_seed(0))
    assert len(optimizers) == 2, "one optimizer pair per round"
    shared, own = optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in shared.param_groups[0]["params"]} == set(state_of(model, SHARED))
    assert {names[id(p)] for p in own.param_groups[0]["params"]} == set(state_of(model, PERSONAL))
    assert (shared.defaults["lr"], shared.defaults["momentum"], shared.defaults["weight_decay"]) == (0.03, 0.9, 1e-3)
    assert (own.defaults["lr"], own.defaults["momentum"], own.defaults["weight_decay"]) == (0.03, 0, 0)
    batches = config.local_epochs * math.ceil(data.num_train / config.batch_size)
    assert [opt for opt, _ in steps] == [shared, own] * batches
    for opt, moved in steps:
        expected = set(state_of(model, SHARED if opt is shared else PERSONAL))
        assert moved and moved <= expected, "a personal step leaves body and generic head bit-identical"
    assert set(update.personal) == {"head.personal.weight", "head.personal.bias"}
    assert math.isfinite(update.loss)
    assert not any(p.requires_grad for p in model.parameters()), "nothing is left trainable"


def test_one_batch_round_is_the_balanced_step_then_the_residual_personal_step_on_detached_features(digits):
    config = tiny(batch_size=1000)
    model = model_for(config, digits)
    reference = copy.deepcopy(model)
    data = client_data(config, digits, 1)
    assert (data.class_counts() == 0).any(), "a client with absent classes, where balanced softmax differs from CE"
    lr = 0.05
    update = ALGORITHMS["fedrod"](config).client_update(model, data, {}, lr, torch.Generator().manual_seed(3))
    x, y = next(data.train_batches(1000, torch.Generator().manual_seed(3)))
    reference.train()
    features = reference.body(x)
    generic = reference.head.generic(features)
    counts = data.class_counts().double()
    prior = torch.log(torch.where(counts > 0, counts, torch.tensor(1e-12, dtype=torch.float64))).float()
    balanced = nn.functional.cross_entropy(generic + prior, y)
    shared = [p for n, p in reference.named_parameters() if n.startswith(("body.", "head.generic."))]
    shared_grads = torch.autograd.grad(balanced, shared)
    personal = list(reference.head.personal.parameters())
    residual = nn.functional.cross_entropy(generic.detach() + reference.head.personal(features.detach()), y)
    personal_grads = torch.autograd.grad(residual, personal)
    with torch.no_grad():  # SGD's first step, momentum or not, is p - lr * grad
        for p, grad in zip(shared + personal, shared_grads + personal_grads, strict=True):
            p.sub_(lr * grad)
    expected, got = state_of(reference, ALL), state_of(model, ALL)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6), name
    assert update.loss == pytest.approx(balanced.item(), rel=1e-5)


def test_the_shared_update_does_not_depend_on_the_personal_head(digits):
    config = tiny()
    model = model_for(config, digits)
    start = state_of(model, ALL)
    data = client_data(config, digits, 2)
    algorithm = ALGORITHMS["fedrod"](config)
    own = state_of(model, PERSONAL)
    updates, uploads = [], []
    for personal in (own, shifted(own, 7)):
        load_state(model, start)
        updates.append(algorithm.client_update(model, data, personal, 0.05, torch.Generator().manual_seed(5)))
        uploads.append(state_of(model, SHARED))
    assert same(*uploads), "what the server averages is bit-identical whatever the personal head"
    assert updates[0].loss == updates[1].loss
    assert not same(updates[0].personal, updates[1].personal)


def test_a_client_without_training_data_keeps_its_head_and_reports_no_loss(digits):
    config = tiny()
    model = model_for(config, digits)
    empty = ClientData(digits, np.zeros(0, dtype=np.int64), partition_for(config, digits).test[0], runtime_for(config))
    own = shifted(state_of(model, PERSONAL), 3)
    update = ALGORITHMS["fedrod"](config).client_update(model, empty, own, 0.05, torch.Generator().manual_seed(0))
    assert math.isnan(update.loss)
    assert same(update.personal, own)


def test_personal_heads_persist_across_rounds_differ_and_never_leave_the_client(recorded, digits):
    result, calls = recorded
    config = tiny()
    assert len(calls) == 3 * 5, "every client in both rounds, then once more in its own evaluation"
    first, second, evaluation = calls[:5], calls[5:10], calls[10:]
    for c in range(5):
        assert first[c][0] == {}, "a client's first round starts from the initial personal head"
        assert same(second[c][0], first[c][1]), f"client {c} resumes the head it ended round 1 with"
        assert same(result.personal[c], second[c][1])
        assert same(evaluation[c][0], second[c][1]), "the evaluation's local round starts from the kept head"
    for a, b in itertools.combinations(range(5), 2):
        assert not torch.equal(torch.from_numpy(result.personal[a]["head.personal.weight"]),
                               torch.from_numpy(result.personal[b]["head.personal.weight"]))
    initial = model_for(config, digits)
    assert same({k: v for k, v in result.final_state.items() if k.startswith("head.personal.")},
                state_of(initial, PERSONAL)), "the server never sees or changes a personal head"
    assert not same(result.final_state, state_of(initial, ALL))
    assert result.bytes_per_round_per_client == 8 * Layout(initial).count(SHARED)


def test_the_run_does_not_depend_on_the_number_of_workers(recorded, digits):
    one, _ = recorded
    two = run(tiny(workers=2), digits)
    assert same(one.final_state, two.final_state)
    assert one.personal.keys() == two.personal.keys() == set(range(5))
    for c in one.personal:
        assert same(one.personal[c], two.personal[c]), c
    assert one.clients == two.clients


def test_own_evaluation_is_the_personalized_logits_and_common_changes_only_the_personalization(recorded, digits):
    own, _ = recorded
    common = run(tiny(fedrod={"evaluation": "common"}), digits)
    assert same(own.final_state, common.final_state)
    assert all(same(own.personal[c], common.personal[c]) for c in range(5))
    assert [m["train_loss"] for m in own.metrics] == [m["train_loss"] for m in common.metrics]
    config = tiny()
    for c in range(5):
        model = model_for(config, digits)
        load_state(model, own.final_state)
        kept = {k: torch.from_numpy(v) for k, v in own.personal[c].items()}
        load_state(model, kept)
        data = client_data(config, digits, c)
        before = evaluate(model, data)
        FedRoD(config).client_update(model, data, kept, config.lr_at(config.rounds - 1),
                                     personalize_generator(config, c))
        assert own.clients[c]["accuracies"] == [before, evaluate(model, data)], \
            "the kept head as trained, then after one more local round from the final model at the final lr"
        curve = common.clients[c]["accuracies"]
        assert len(curve) == 1 + config.finetune.epochs and curve[0] == own.clients[c]["accuracies"][0]
    assert FedRoD(config).personalization_note() == ("FedRoD's own: generic + personal logits after one local "
                                                     "round (1 epochs at the final lr 0.0005), no fine-tuning")
    assert FedRoD(common.config).personalization_note().startswith("common protocol: full fine-tuning, 1 epochs")


def test_evaluation_is_the_only_setting_and_may_differ_when_personalizing():
    assert tiny().settings_for("fedrod").evaluation == "own"
    assert FedRoD.Settings.evaluation_keys == ("evaluation",)
    with pytest.raises(UserError, match=r"fedrod\.evaluation"):
        tiny(fedrod={"evaluation": "fine-tuned"})
    again = personalization_config(tiny(), {"fedrod": {"evaluation": "common"}})
    assert again.settings_for("fedrod").evaluation == "common"


def test_an_interrupted_and_resumed_run_is_bit_identical(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "write_plots", lambda *args: None)  # half the time of a tiny run, and not compared
    config = tiny(checkpoint_every=1)
    run_experiment(config, tmp_path / "ref", dataset=digits)
    folder = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, folder, StopAtRound(2), dataset=digits)
    assert load_checkpoint(folder / "checkpoint.pt").rounds_done == 1
    resume_experiment(folder)
    for name in ("metrics.jsonl", "clients.csv"):
        assert (folder / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert same(load_tensors(folder / "model.pt"), load_tensors(tmp_path / "ref" / "model.pt"))
    reference, resumed = load_checkpoint(tmp_path / "ref" / "checkpoint.pt"), load_checkpoint(folder / "checkpoint.pt")
    assert reference.personal.keys() == resumed.personal.keys() == set(range(5))
    for c in reference.personal:
        assert same(reference.personal[c], resumed.personal[c]), c
