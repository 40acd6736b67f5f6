"""Every registered algorithm, interrupted after a checkpoint and resumed, writes the bytes of its
uninterrupted run: an algorithm added to the registry is tested here the day it is added."""

from __future__ import annotations

import pytest
from conftest import StopAtRound
from contract_support import assert_same_run, config_for

from fedbabu.runner import resume_experiment, run_experiment

pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_interrupted_and_resumed_run_gives_the_uninterrupted_ones_bytes(contract_reference, digits, tmp_path):
    algorithm, folder, _ = contract_reference
    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config_for(algorithm, workers=1), interrupted, StopAtRound(2), dataset=digits)
    resume_experiment(interrupted)
    assert_same_run(folder, interrupted)
    assert (folder / "config.yaml").read_bytes() == (interrupted / "config.yaml").read_bytes()
