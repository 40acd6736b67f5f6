"""The head family side by side: one digits comparison of FedRoD, FedUH, FedNH and FedETF with FedBABU.

The same comparison on one and on two workers, and each of its runs interrupted and resumed, must
give the same bytes; every table names the evaluation each method was given.
"""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import StopAtRound

from fedbabu.config import DIGITS_DEFAULT, build_config
from fedbabu.files import load_tensors
from fedbabu.runner import resume_experiment, run_comparison, run_experiment, variant_config

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


@pytest.mark.parametrize("name", ["fedrod", "feduh", "fednh", "fedetf"])
def test_each_run_interrupted_and_resumed_gives_the_comparisons_bytes(compared, digits, tmp_path, name):
    config = variant_config(base(workers=1), name)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / name, StopAtRound(2), dataset=digits)
    resume_experiment(tmp_path / name)
    assert _same_model(tmp_path / name, compared / "workers-1" / name)
    assert (tmp_path / name / "clients.csv").read_bytes() == \
        (compared / "workers-1" / name / "clients.csv").read_bytes()
