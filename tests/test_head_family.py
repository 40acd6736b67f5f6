"""The head family side by side: one digits comparison of FedRoD, FedUH, FedNH and FedETF with FedBABU.

The same comparison on one and on two workers, and each of its runs interrupted and resumed, must
give the same bytes; every table names the evaluation each method was given.
"""

from __future__ import annotations

import csv

import pytest
import torch

from fedbabu.algorithms import ALGORITHMS
from fedbabu.algorithms.base import Algorithm
from fedbabu.config import DIGITS_DEFAULT, build_config
from fedbabu.files import load_tensors
from fedbabu.runner import run_comparison

FAMILY = ["fedbabu", "fedrod", "feduh", "fednh", "fedetf"]


def base(**overrides):
    values = {**DIGITS_DEFAULT, "num_clients": 5, "rounds": 3, "client_fraction": 0.6, "eval_every": 0,
              "finetune": {**DIGITS_DEFAULT["finetune"], "epochs": 1}, "fedetf": {"alternations": 1},
              "checkpoint_every": 1}
    values.update(overrides)
    return build_config(values)


def _rows(folder):
    with (folder / "comparison.csv").open() as handle:
        return list(csv.DictReader(handle))


def _same_model(a, b) -> bool:
    x, y = load_tensors(a / "model.pt"), load_tensors(b / "model.pt")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("family")
    for workers in (1, 2):
        run_comparison(base(workers=workers), FAMILY, out / f"workers-{workers}", dataset=digits)
    return out


def test_the_comparison_is_the_same_on_one_and_two_workers(compared):
    one, two = compared / "workers-1", compared / "workers-2"
    for name in FAMILY:
        assert _same_model(one / name, two / name), name
        assert (one / name / "clients.csv").read_bytes() == (two / name / "clients.csv").read_bytes(), name
    keep = ("algorithm", "initial_mean", "personalized_mean", "bytes_per_round_per_client")
    assert [{k: r[k] for k in keep} for r in _rows(one)] == [{k: r[k] for k in keep} for r in _rows(two)]


def test_every_method_is_labelled_with_its_evaluation(compared):
    markdown = (compared / "workers-1" / "comparison.md").read_text()
    for label in ("FedRoD's own: generic + personal logits", "feduh's own: one local round",
                  "fednh's own: one local round", "full fine-tuning, 1 epochs"):
        assert label in markdown
    assert "FedETF's own: 2 epochs of balanced softmax" in markdown


def test_the_own_or_common_switch_is_the_base_classs_and_each_method_states_only_its_own_protocol():
    switched = {name: cls for name, cls in ALGORITHMS.items() if "evaluation" in cls.Settings.model_fields}
    units = {"fedrep": "round", "fedrod": "round", "feduh": "round", "fednh": "round", "fedetf": "stage",
             "apfl": "round", "pfedme": "round", "fedpac": "round", "fedala": "aggregation",
             "knnper": "interpolation"}
    assert set(switched) == set(units)
    for name, cls in switched.items():
        for hook in ("personalize", "personalization_unit", "personalization_note"):
            assert getattr(cls, hook) is getattr(Algorithm, hook), (name, hook)
        own, common = (cls(base(algorithm=name, **{name: {"evaluation": e}})) for e in ("own", "common"))
        assert own.evaluates_own() and not common.evaluates_own()
        assert own.personalization_unit() == units[name]
        assert common.personalization_unit() == "epoch"
        assert own.personalization_note() == own.own_note()
        fine_tuning = "full fine-tuning, 1 epochs, lr 0.01"
        marked = fine_tuning if name == "fedrep" else f"common protocol: {fine_tuning}"
        assert common.personalization_note() == marked, "marked where it replaces the method's default own protocol"
