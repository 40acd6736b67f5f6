"""Every registered algorithm gives bit-identical results with one and with two worker processes
(model, clients' curves, round records, personal states): an algorithm added to the registry is
tested here the day it is added. Resume is ``test_contract_resume.py``'s; Flower against the
simulator is ``test_flower.py``'s."""

from __future__ import annotations

import pytest
from conftest import same
from contract_support import assert_same_run, config_for

from fedbabu.runner import run_experiment

pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_workers_give_the_one_workers_run_bit_for_bit(contract_reference, digits, tmp_path):
    algorithm, folder, result = contract_reference
    two = run_experiment(config_for(algorithm, workers=2), tmp_path / "two", dataset=digits).result
    assert_same_run(folder, tmp_path / "two")
    assert set(result.personal) == set(two.personal)
    assert all(same(result.personal[c], two.personal[c]) for c in result.personal)
