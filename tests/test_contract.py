"""The contract every registered algorithm keeps, checked for each one without a list to maintain:
an algorithm added to the registry is tested here the day it is added.

* the number of worker processes changes nothing: model, clients' curves, round records and
  personal states are bit-identical with one worker and with two;
* a run interrupted after a checkpoint and resumed writes the bytes of the uninterrupted run.

(That the Flower engine equals the simulator for every algorithm is ``test_flower.py``'s.)
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import StopAtRound, same, small_config

from fedbabu.algorithms import ALGORITHMS
from fedbabu.engine.round import MEASURED_KEYS
from fedbabu.files import load_tensors
from fedbabu.runner import resume_experiment, run_experiment

pytestmark = pytest.mark.usefixtures("one_thread")

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


@pytest.fixture(scope="module", params=sorted(ALGORITHMS))
def reference(request, digits, tmp_path_factory):
    """One uninterrupted one-worker run per algorithm, shared by its contract tests."""
    algorithm = request.param
    folder = tmp_path_factory.mktemp(algorithm) / "reference"
    result = run_experiment(config_for(algorithm, workers=1), folder, dataset=digits).result
    return algorithm, folder, result


def assert_same_run(expected, got) -> None:
    for name in FINAL_FILES:
        assert (expected / name).read_bytes() == (got / name).read_bytes(), name
    model, other = load_tensors(expected / "model.pt"), load_tensors(got / "model.pt")
    assert model.keys() == other.keys() and all(torch.equal(model[k], other[k]) for k in model)
    assert records(expected) == records(got)


def test_two_workers_give_the_one_workers_run_bit_for_bit(reference, digits, tmp_path):
    algorithm, folder, result = reference
    two = run_experiment(config_for(algorithm, workers=2), tmp_path / "two", dataset=digits).result
    assert_same_run(folder, tmp_path / "two")
    assert set(result.personal) == set(two.personal)
    assert all(same(result.personal[c], two.personal[c]) for c in result.personal)


def test_an_interrupted_and_resumed_run_gives_the_uninterrupted_ones_bytes(reference, digits, tmp_path):
    algorithm, folder, _ = reference
    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config_for(algorithm, workers=1), interrupted, StopAtRound(2), dataset=digits)
    resume_experiment(interrupted)
    assert_same_run(folder, interrupted)
    assert (folder / "config.yaml").read_bytes() == (interrupted / "config.yaml").read_bytes()
