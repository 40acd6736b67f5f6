"""fedbabu on Flower's simulation engine (Ray): bit-identical to the in-process simulator.

Every process is started here with its own FLWR_HOME and stopped by PID in teardown.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flower_support import initial_head, read_clients, read_records, simulator_run

from fedbabu.config import load_config
from fedbabu.engine.round import MEASURED_KEYS
from fedbabu.files import load_tensors
from fedbabu.flower.launch import flower_env, stop

pytestmark = pytest.mark.flower


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedbabu", "fedper"])
def test_ray_simulation_four_virtual_clients_equals_the_simulator(algorithm: str, tmp_path: Path) -> None:
    """Two rounds on Ray equal ``fedbabu run`` bit for bit. FedPer's heads live only in each virtual
    client's ``context.state``: the round-2 body (trained on top of them) and the personalization
    curves (starting from them) can only match if that state survived between rounds."""
    out = tmp_path / "run"
    overrides = [f"algorithm={algorithm}", "num_clients=4", "partition=shards", "shards_per_client=5", "rounds=2",
                 "client_fraction=1.0", "finetune.epochs=2", "eval_every=1"]
    command = [sys.executable, "-m", "fedbabu", "flower", "sim", "--quiet", "--out", str(out)]
    for override in overrides:
        command += ["--set", override]
    with (tmp_path / "sim.log").open("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True,
                                   env=flower_env(tmp_path / "home"), start_new_session=True)
        try:
            returncode = process.wait(400)
        finally:
            stop(process, grace=10, group=True)
        log.seek(0)
        output = log.read()
    flower_log = out / "flower.log"
    assert returncode == 0, output + (flower_log.read_text() if flower_log.exists() else "")
    summary = json.loads((out / "summary.json").read_text())
    config = load_config(None, overrides)
    state = load_tensors(out / "model.pt")
    for name, tensor in initial_head(config).items():
        assert torch.equal(state[name], tensor), f"{name} moved"
    assert summary["initial_accuracy"]["mean"] > 0.5  # 5 of 10 classes per client: chance is 0.2
    assert summary["personalized_accuracy"]["mean"] > 0.5
    assert summary["flower"]["failures"] == [] and summary["flower"]["rejected"] == []
    reference = simulator_run(config)
    for name, tensor in reference.final_state.items():
        assert torch.equal(state[name], tensor), name
    curves = [[float(v) for v in list(row.values())[4:]] for row in read_clients(out)]
    assert curves == [pytest.approx(c["accuracies"], abs=1e-6) for c in reference.clients]
    ours = [{k: v for k, v in r.items() if k not in MEASURED_KEYS} for r in read_records(out)]
    theirs = [{k: v for k, v in m.items() if k not in MEASURED_KEYS} for m in reference.metrics]
    assert [r.keys() for r in ours] == [m.keys() for m in theirs], "the same record fields in both engines"
    for key in ("round", "lr", "clients", "dropped", "failed", "rejected"):
        assert [r[key] for r in ours] == [m[key] for m in theirs], key
    for key in ("train_loss", "test_accuracy"):
        assert [r[key] for r in ours] == pytest.approx([m[key] for m in theirs], abs=1e-9), key

