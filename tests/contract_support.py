"""What the contract tests share: one small run per registered algorithm and how two runs are compared.

The contract is checked in two files (``test_contract_workers.py``, ``test_contract_resume.py``) so
that the suite's two workers, which take whole files, share its cost.
"""

from __future__ import annotations

import json

import torch
from conftest import small_config

from fedbabu.engine.round import MEASURED_KEYS
from fedbabu.files import load_tensors
from fedbabu.runner import run_experiment

FINAL_FILES = ("clients.csv", "partition.json")
"""Besides the model and the round records; ``config.yaml`` names the workers, so only a resume keeps it."""
CHEAP = {"fedetf": {"alternations": 1}}
"""Own settings that keep an algorithm's evaluation short here (FedETF's 20 alternations are 120 epochs)."""


def config_for(algorithm: str, **overrides):
    own = {algorithm: CHEAP[algorithm]} if algorithm in CHEAP else {}
    return small_config(algorithm=algorithm, rounds=3, checkpoint_every=1, eval_every=2,
                        finetune={"epochs": 1}, **own, **overrides)


def records(folder):
    return [{k: v for k, v in json.loads(line).items() if k not in MEASURED_KEYS}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def reference_run(algorithm: str, digits, tmp_path_factory):
    """One uninterrupted one-worker run of an algorithm: what its contract tests compare against."""
    folder = tmp_path_factory.mktemp(algorithm) / "reference"
    result = run_experiment(config_for(algorithm, workers=1), folder, dataset=digits).result
    return algorithm, folder, result


def assert_same_run(expected, got) -> None:
    for name in FINAL_FILES:
        assert (expected / name).read_bytes() == (got / name).read_bytes(), name
    model, other = load_tensors(expected / "model.pt"), load_tensors(got / "model.pt")
    assert model.keys() == other.keys() and all(torch.equal(model[k], other[k]) for k in model)
    assert records(expected) == records(got)
