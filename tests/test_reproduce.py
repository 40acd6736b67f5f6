"""The paper's presets expand to its settings, and a quick preset runs on real CIFAR-10."""

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedbabu.config import build_config, merge_dicts
from fedbabu.errors import UserError
from fedbabu.reproduce import (
    PRESET_DIR,
    cells,
    list_presets,
    load_preset,
    parse_selection,
    personalize_preset,
    run_preset,
)
from fedbabu.results.paired import paired_difference
from fedbabu.results.rebuild import read_curves


def test_cifar100_grid_is_the_papers():
    grid = cells(load_preset("cifar100-4convnet"))
    assert len(grid) == 2 * 3 * 3
    assert {(c.values["local_epochs"], c.values["rounds"]) for c in grid} == {(1, 320), (4, 80), (10, 32)}
    assert {c.values["shards_per_client"] for c in grid} == {10, 50, 100}
    assert {c.values["client_fraction"] for c in grid} == {0.1, 1.0}
    assert all(c.values["num_clients"] == 100 and c.values["dataset"] == "cifar100" for c in grid)
    assert all(c.values["finetune"]["lr"] == 0.001 for c in grid)


def test_cifar10_and_mobilenet_grids():
    assert {c.values["shards_per_client"] for c in cells(load_preset("cifar10-4convnet"))} == {2, 5, 10}
    mobilenet = cells(load_preset("cifar100-mobilenet"))
    assert len(mobilenet) == 18 and {c.values["model"] for c in mobilenet} == {"mobilenet"}


def test_quick_scale_shrinks_rounds_and_clients():
    quick = cells(load_preset("cifar100-4convnet"), "quick")
    assert {(c.values["local_epochs"], c.values["rounds"]) for c in quick} == {(1, 20), (4, 5), (10, 2)}
    assert {c.values["num_clients"] for c in quick} == {20}


@pytest.mark.parametrize("name", sorted(list_presets()))
@pytest.mark.parametrize("scale", ["full", "quick"])
def test_every_cell_of_every_preset_is_a_valid_config(name, scale):
    preset = load_preset(name)
    for cell in cells(preset, scale):
        for algorithm in preset.algorithms:
            config = build_config(merge_dicts(cell.values_for(algorithm), {"algorithm": algorithm}))
            assert config.rounds >= 2


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(UserError, match="cifar100-4convnet"):
        load_preset("cifar1000")


@pytest.mark.slow
def test_quick_preset_runs_on_real_cifar10_and_skips_finished_runs(cifar10_dir, tmp_path):
    command = [sys.executable, "-m", "fedbabu", "reproduce", "cifar10-4convnet-offline", "--scale", "quick",
               "--quiet", "--out", str(tmp_path), "--data-dir", str(cifar10_dir.parent), "--set", "rounds=2",
               "--set", "num_clients=10", "--set", "samples_per_client=100", "--set", "finetune.epochs=1",
               "--set", "eval_every=1", "--only", "local_epochs=10"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    results = (tmp_path / "results.md").read_text()
    assert "shards_per_client=2,local_epochs=10" in results and "fedbabu − fedavg" in results
    assert not (tmp_path / "shards_per_client-2_local_epochs-1").exists(), "--only runs only the named cells"
    assert (tmp_path / "shards_per_client-10_local_epochs-10" / "fedbabu" / "seed-0" / "summary.json").exists()
    interrupted = tmp_path / "shards_per_client-2_local_epochs-10" / "fedavg" / "seed-0"
    model_bytes = (interrupted / "model.pt").read_bytes()
    (interrupted / "summary.json").unlink()  # as if the run had been killed after its last checkpoint
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("already complete, skipped") == 3
    assert second.stdout.count("resuming from its checkpoint") == 1
    assert (interrupted / "model.pt").read_bytes() == model_bytes
    assert (interrupted / "summary.json").exists()


def _digits_preset(tmp_path: Path, monkeypatch, name: str, algorithms: str, rounds: int, more: str = "") -> None:
    """A preset of a few seconds on digits, in a preset folder of the test's own."""
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / f"{name}.yaml").write_text(
        f"title: {name}\nalgorithms: [{algorithms}]\nseeds: [0]\n"
        "base: {dataset: digits, model: digitcnn, num_clients: 10, partition: shards, shards_per_client: 2,\n"
        f"       client_fraction: 0.5, rounds: {rounds}, batch_size: 10, eval_every: 0, workers: 1,\n"
        "       max_update_norm: null, finetune: {epochs: 1}}\n" + more)
    monkeypatch.setattr("fedbabu.reproduce.PRESET_DIR", presets)


def test_a_diverging_run_is_recorded_and_the_grid_goes_on(tmp_path, monkeypatch):
    _digits_preset(tmp_path, monkeypatch, "tiny", "fedavg", 3, "grid: {weight_decay: [0.0, 1.0e+30]}\n")
    lines = []
    outcomes = run_preset("tiny", tmp_path / "out", log=lines.append)
    assert [len(o.summaries) for o in outcomes] == [1, 0]
    assert [o.diverged for o in outcomes] == [0, 1]
    results = (tmp_path / "out" / "results.md").read_text()
    assert "| weight_decay=1e+30 | – | diverged | diverged |" in results
    lines.clear()
    again = run_preset("tiny", tmp_path / "out", log=lines.append)
    assert [o.diverged for o in again] == [0, 1]
    assert "already complete, skipped" in lines[0] and "diverged in an earlier attempt" in lines[1]
    unselected = run_preset("tiny", tmp_path / "out", only=["weight_decay=0.0"], log=lambda line: None)
    assert [o.diverged for o in unselected] == [0, 1]
    assert "| weight_decay=1e+30 | – | diverged | diverged |" in (tmp_path / "out" / "results.md").read_text()


def test_results_cover_every_finished_seed_across_invocations(tmp_path, monkeypatch):
    _digits_preset(tmp_path, monkeypatch, "pair", "fedavg, fedbabu", 2)
    out = tmp_path / "out"
    run_preset("pair", out, log=lambda line: None)
    row = _row(out, "| default")
    over_seeds, per_seed = row.rsplit(" | ", 1)
    assert row.startswith("| default | 0 |") and "±" not in over_seeds and " ± " in per_seed  # one seed: no spread
    outcomes = run_preset("pair", out, seeds=[1], log=lambda line: None)
    assert [o.seeds for o in outcomes] == [[1, 0], [1, 0]]
    cells = _row(out, "| default").strip("| ").split(" | ")
    assert cells[:2] == ["default", "0, 1"]
    personalized = {a: [json.loads((out / "default" / a / f"seed-{k}" / "summary.json").read_text())
                        ["personalized_accuracy"]["mean"] for k in (0, 1)] for a in ("fedavg", "fedbabu")}
    diffs = np.subtract(personalized["fedbabu"], personalized["fedavg"])
    fedavg = np.array(personalized["fedavg"])
    assert cells[3] == f"{100 * fedavg.mean():.2f} ± {100 * fedavg.std(ddof=1) / np.sqrt(2):.2f}", "SE over seeds"
    assert cells[6] == f"{100 * diffs.mean():+.2f} ± {100 * diffs.std(ddof=1) / np.sqrt(2):.2f}"
    clients = {a: [read_curves(out / "default" / a / f"seed-{k}" / "clients.csv")[:, -1] for k in (0, 1)]
               for a in ("fedavg", "fedbabu")}
    per_seed = []
    for k, diff in enumerate(diffs):
        per_client = clients["fedbabu"][k] - clients["fedavg"][k]
        error = per_client.std(ddof=1) / np.sqrt(per_client.size)
        counts = [(per_client > 1e-9).sum(), (per_client < -1e-9).sum(), (np.abs(per_client) <= 1e-9).sum()]
        per_seed.append(f"{100 * diff:+.2f} ± {100 * error:.2f} ({counts[0]} higher, {counts[1]} lower, "
                        f"{counts[2]} tied)")
    assert cells[7] == "; ".join(per_seed)
    results = (out / "results.md").read_text()
    for plot in ("finetune.png", "seeds.png", "differences.png"):
        assert f"]({plot})" in results
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_many_method_preset_pairs_each_method_against_fedbabu_seed_by_seed(tmp_path, monkeypatch):
    _digits_preset(tmp_path, monkeypatch, "many", "fedavg, fedbabu, fedper", 2)
    out = tmp_path / "out"
    run_preset("many", out, log=lambda line: None)
    rows = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| default | ")]
    assert len(rows) == 3  # the accuracies, then fedavg and fedper against fedbabu
    babu = read_curves(out / "default" / "fedbabu" / "seed-0" / "clients.csv")[:, -1]
    for row, algorithm in zip(rows[1:], ("fedavg", "fedper"), strict=True):
        other = read_curves(out / "default" / algorithm / "seed-0" / "clients.csv")[:, -1]
        assert row == f"| default | {algorithm} | {paired_difference([babu], [other]).text()} |"
    assert "Paired against fedbabu:" in (out / "results.md").read_text()


def _row(out: Path, prefix: str) -> str:
    return next(line for line in (out / "results.md").read_text().splitlines() if line.startswith(prefix))


def test_only_runs_the_selected_cells_and_the_table_keeps_the_others(tmp_path, monkeypatch):
    _digits_preset(tmp_path, monkeypatch, "split", "fedavg", 2, "grid: {shards_per_client: [2, 3], lr: [0.05]}\n")
    out = tmp_path / "out"
    lines: list[str] = []
    first = run_preset("split", out, only=["shards_per_client=3"], log=lines.append)
    assert [o.seeds for o in first] == [[], [0]]
    assert len(lines) == 1 and "shards_per_client=3,lr=0.05 fedavg seed 0: running" in lines[0]
    assert not (out / "shards_per_client-2_lr-0.05").exists()
    rows = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| shards")]
    assert rows[0] == "| shards_per_client=2,lr=0.05 | – | not run | not run |"
    assert rows[1].startswith("| shards_per_client=3,lr=0.05 | 0 | ")
    lines.clear()
    second = run_preset("split", out, only=["shards_per_client=2,3", "lr=0.05"], log=lines.append)
    assert [o.seeds for o in second] == [[0], [0]]
    assert "running" in lines[0] and "already complete, skipped" in lines[1]
    assert second[1].summaries == first[1].summaries


def test_only_algorithm_runs_those_algorithms_and_the_table_keeps_the_others(tmp_path, monkeypatch):
    _digits_preset(tmp_path, monkeypatch, "pick", "fedavg, fedbabu", 2)
    out = tmp_path / "out"
    lines: list[str] = []
    first = run_preset("pick", out, only=["algorithm=fedbabu"], log=lines.append)
    assert [(o.algorithm, o.seeds) for o in first] == [("fedavg", []), ("fedbabu", [0])]
    assert len(lines) == 1 and "fedbabu seed 0: running" in lines[0]
    assert not (out / "default" / "fedavg").exists()
    row = _row(out, "| default")
    assert "not run" in row
    lines.clear()
    second = run_preset("pick", out, only=["algorithm=fedavg,fedbabu"], log=lines.append)
    assert [o.seeds for o in second] == [[0], [0]]
    assert "fedavg seed 0: running" in lines[0] and "fedbabu seed 0: already complete, skipped" in lines[1]
    assert second[1].summaries == first[1].summaries
    lines.clear()
    again = personalize_preset("pick", out, settings={"finetune": {"epochs": 2}}, only=["algorithm=fedavg"],
                               log=lines.append)
    assert [o.seeds for o in again] == [[0], []]
    assert (out / "default" / "fedavg" / "seed-0" / "personalize").is_dir()
    assert not (out / "default" / "fedbabu" / "seed-0" / "personalize").exists()


def test_the_table_has_the_runs_another_process_finished_while_this_one_trained(tmp_path, monkeypatch):
    _digits_preset(tmp_path, monkeypatch, "split", "fedavg, fedbabu", 2)
    elsewhere = tmp_path / "elsewhere"
    run_preset("split", elsewhere, only=["algorithm=fedavg"], log=lambda line: None)
    out = tmp_path / "out"

    def finish_fedavg_meanwhile(line: str) -> None:
        """What the other process (``--only algorithm=fedavg``) does while this one trains FedBABU."""
        if "fedbabu seed 0: running" in line:
            shutil.copytree(elsewhere / "default" / "fedavg", out / "default" / "fedavg")

    outcomes = run_preset("split", out, only=["algorithm=fedbabu"], log=finish_fedavg_meanwhile)
    assert [(o.algorithm, o.seeds) for o in outcomes] == [("fedavg", [0]), ("fedbabu", [0])]
    row = _row(out, "| default")
    assert "not run" not in row and row.count(" | ") == 7


def test_a_bad_selection_or_setting_stops_before_any_run(tmp_path, monkeypatch):
    _digits_preset(tmp_path, monkeypatch, "bad", "fedavg", 2, "grid: {shards_per_client: [2, 3]}\n")
    preset = load_preset("bad")
    assert parse_selection(preset, ["shards_per_client=3, 2"]) == {"shards_per_client": [3, 2]}
    with pytest.raises(UserError, match="'lr' is not a grid key of this preset \\(grid keys: shards_per_client; or"):
        parse_selection(preset, ["lr=0.1"])
    assert parse_selection(preset, ["algorithm=fedavg"]) == {"algorithm": ["fedavg"]}
    with pytest.raises(UserError, match="algorithm takes one of fedavg in this preset"):
        parse_selection(preset, ["algorithm=fedbabu"])
    with pytest.raises(UserError, match="shards_per_client takes one of 2, 3"):
        parse_selection(preset, ["shards_per_client=4"])
    with pytest.raises(UserError, match=r"\[shards_per_client=3\]: finetune.epochs"):
        run_preset("bad", tmp_path / "out", settings={"finetune": {"epochs": -1}}, only=["shards_per_client=3"])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_presets_ship_inside_the_wheel(tmp_path):
    root = Path(__file__).resolve().parents[1]
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path),
                            str(root)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("fedbabu-*.whl")
    shipped = {Path(name).name for name in zipfile.ZipFile(wheel).namelist() if "/presets/" in name}
    assert shipped == {path.name for path in PRESET_DIR.glob("*.yaml")} and len(shipped) >= 8
    assert (root / "configs" / "paper" / "cifar10-4convnet-offline.yaml").read_bytes() == \
        (PRESET_DIR / "cifar10-4convnet-offline.yaml").read_bytes()


@pytest.mark.parametrize("name", ["baselines", "baselines-cifar10-offline"])
def test_the_baselines_presets_run_each_baseline_as_the_authors_scripts(name):
    preset = load_preset(name)
    (cell,) = cells(preset)
    configs = {a: build_config(merge_dicts(cell.values_for(a), {"algorithm": a})) for a in preset.algorithms}
    fedavg, lg, local = configs["fedavg"], configs["lg_fedavg"], configs["local"]
    assert (fedavg.rounds, fedavg.local_epochs, fedavg.lr, fedavg.client_fraction, fedavg.num_clients) == \
        (32, 10, 0.1, 0.1, 100)
    assert (lg.rounds, lg.local_epochs, lg.lr, lg.resolved_milestones()) == (8, 10, 0.001, [])
    assert (local.rounds, local.local_epochs, local.lr, local.resolved_milestones()) == (160, 1, 0.1, [80, 120])
    assert local.batch_size == 10, "run_local.sh passes no --local_bs: options.py's 10"
    fedrep, perfedavg = configs["fedrep"].settings_for("fedrep"), configs["perfedavg"].settings_for("perfedavg")
    assert (fedrep.head_epochs, fedrep.body_epochs) == (None, 1)
    assert configs["fedrep"].momentum == 0.5, "run_fedrep.sh passes no --momentum: options.py's 0.5"
    assert {a: c.momentum for a, c in configs.items() if a != "fedrep"} == dict.fromkeys(set(configs) - {"fedrep"}, 0.9)
    assert configs["fedper"].settings_for("fedper").keep_head is False, "main_fed.py discards the trained head"
    assert {c.batch_size for a, c in configs.items() if a != "local"} == {50}
    assert (perfedavg.alpha, perfedavg.beta) == (None, 0.1)
    ditto, fedprox = configs["ditto"].settings_for("ditto"), configs["fedprox"].settings_for("fedprox")
    assert (ditto.lambda_, fedprox.mu) == (0.75, 1.0)
    assert {(c.shards_per_client, c.dataset) for c in configs.values()} == \
        {(10, "cifar100" if name == "baselines" else "cifar10")}
    quick = {a: cells(preset, "quick")[0].values_for(a)["rounds"] for a in ("fedavg", "lg_fedavg", "local")}
    assert quick == {"fedavg": 2, "lg_fedavg": 2, "local": 10}
    assert preset.seeds == ([0, 1, 2] if name == "baselines" else [0])


def test_an_algorithms_rounds_follow_the_cells_local_epochs(tmp_path, monkeypatch):
    _digits_preset(tmp_path, monkeypatch, "taus", "fedavg, lg_fedavg", 8,
                   "grid: {local_epochs: [1, 4]}\nalgorithm_settings: {lg_fedavg: {set: {lr: 0.001}, "
                   "rounds_per_local_epochs: {1: 80, 4: 20}}}\n")
    grid = cells(load_preset("taus"))
    assert [(c.values_for("fedavg")["rounds"], c.values_for("lg_fedavg")["rounds"]) for c in grid] == \
        [(8, 80), (8, 20)]
    assert [c.values_for("lg_fedavg")["lr"] for c in grid] == [0.001, 0.001] and "lr" not in grid[0].values


@pytest.mark.parametrize(("settings", "message"), [
    ("{fedbabu: {set: {lr: 0.01}}}", "'fedbabu' is not one of the preset's algorithms"),
    ("{fedavg: {set: {seed: 3}}}", "algorithm_settings.fedavg.set: seed is shared by every algorithm"),
    ("{fedavg: {set: {num_clients: 3}}}", "num_clients is shared by every algorithm"),
    ("{fedavg: {set: {rounds: 3}, rounds_per_local_epochs: {1: 3}}}", "not both"),
    ("{fedavg: {sett: {lr: 0.1}}}", "algorithm_settings.fedavg.sett"),
])
def test_algorithm_settings_are_validated(tmp_path, monkeypatch, settings, message):
    _digits_preset(tmp_path, monkeypatch, "bad", "fedavg", 2, f"algorithm_settings: {settings}\n")
    with pytest.raises(UserError, match=re.escape(message)):
        load_preset("bad")


def test_an_algorithm_without_rounds_for_the_cells_local_epochs_is_refused(tmp_path, monkeypatch):
    _digits_preset(tmp_path, monkeypatch, "gap", "fedavg", 2,
                   "algorithm_settings: {fedavg: {rounds_per_local_epochs: {4: 20}}}\n")
    with pytest.raises(UserError, match=re.escape("algorithm_settings.fedavg: no rounds given for local_epochs=1")):
        cells(load_preset("gap"))


def test_lg_fedavg_starts_from_the_cells_fedavg_run_or_from_a_fedavg_phase(tmp_path, monkeypatch):
    lg_settings = "algorithm_settings: {lg_fedavg: {set: {lr: 0.01, rounds: 1}}}\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _digits_preset(tmp_path / "a", monkeypatch, "lg", "lg_fedavg, fedavg", 2, lg_settings)
    out = tmp_path / "with"
    lines: list[str] = []
    run_preset("lg", out, log=lines.append)
    assert "default fedavg seed 0: running" in lines[0] and "default lg_fedavg seed 0: running" in lines[1]
    saved = yaml.safe_load((out / "default" / "lg_fedavg" / "seed-0" / "config.yaml").read_text())
    assert (saved["lg_fedavg"]["warm_start"], saved["lr"], saved["rounds"]) == \
        (str((out / "default" / "fedavg" / "seed-0").resolve()), 0.01, 1)
    lines.clear()
    run_preset("lg", out, log=lines.append)
    assert len(lines) == 2 and all("already complete, skipped" in line for line in lines)
    moved = tmp_path / "moved" / "with"  # a preset folder copied elsewhere (into a repository) is still complete
    shutil.copytree(out, moved)
    lines.clear()
    run_preset("lg", moved, log=lines.append)
    assert len(lines) == 2 and all("already complete, skipped" in line for line in lines)

    _digits_preset(tmp_path / "b", monkeypatch, "alone", "lg_fedavg, fedbabu", 2, lg_settings)
    out = tmp_path / "alone"
    lines.clear()
    outcomes = run_preset("alone", out, log=lines.append)
    assert "lg_fedavg seed 0: its fedavg phase: running" in lines[0] and "lg_fedavg seed 0: running" in lines[1]
    phase = out / "default" / "lg_fedavg" / "fedavg-phase" / "seed-0"
    phase_config = yaml.safe_load((phase / "config.yaml").read_text())
    assert (phase_config["algorithm"], phase_config["lr"], phase_config["rounds"]) == ("fedavg", 0.1, 2)
    saved = yaml.safe_load((out / "default" / "lg_fedavg" / "seed-0" / "config.yaml").read_text())
    assert saved["lg_fedavg"]["warm_start"] == str(phase.resolve())
    assert [o.seeds for o in outcomes] == [[0], [0]], "the phase is not a seed of the table"
    moved = tmp_path / "moved" / "alone"
    shutil.copytree(out, moved)
    lines.clear()
    run_preset("alone", moved, log=lines.append)
    assert len(lines) == 2 and all("already complete, skipped" in line for line in lines)


def test_a_checkpointed_run_resumes_with_another_number_of_workers(tmp_path, monkeypatch):
    """Results never depend on the worker count, so asking for more workers must continue an
    interrupted run, not train it again from round 0 over its checkpoint."""
    _digits_preset(tmp_path, monkeypatch, "tiny", "fedavg", 4, "")
    out = tmp_path / "out"
    run_preset("tiny", out, log=lambda line: None)
    run = out / "default" / "fedavg" / "seed-0"
    model_bytes = (run / "model.pt").read_bytes()
    (run / "summary.json").unlink()  # as if killed after its last checkpoint
    lines: list[str] = []
    run_preset("tiny", out, settings={"workers": 2}, log=lines.append)
    assert "resuming from its checkpoint" in lines[0]
    assert (run / "model.pt").read_bytes() == model_bytes
    assert yaml.safe_load((run / "config.yaml").read_text())["workers"] == 2


def test_a_dp_preset_gives_each_cell_its_epsilon_and_a_holdout_preset_its_participation_gap(tmp_path, monkeypatch):
    _digits_preset(tmp_path, monkeypatch, "study", "fedavg, fedbabu", 2,
                   "grid: {dp.noise_multiplier: [0.0, 1.0]}\n")
    out = tmp_path / "out"
    run_preset("study", out, settings={"holdout_clients": 2, "dp": {"clipping_norm": 1.0}}, log=lambda line: None)
    results = (out / "results.md").read_text()
    assert "| cell | seeds | ε | fedavg initial |" in results
    spent = json.loads((out / "dp.noise_multiplier-1.0" / "fedbabu" / "seed-0" / "summary.json").read_text())
    assert _row(out, "| dp.noise_multiplier=0.0 | 0 |").startswith("| dp.noise_multiplier=0.0 | 0 | no DP |")
    assert _row(out, "| dp.noise_multiplier=1.0 | 0 |").startswith(
        f"| dp.noise_multiplier=1.0 | 0 | {spent['privacy']['epsilon']:.3g} |")
    gap = spent["participation_gap"]
    row = _row(out, "| dp.noise_multiplier=1.0 | fedbabu | 0 |")
    assert row.endswith(f" | {100 * gap['mean']:+.2f} ± {100 * gap['standard_error']:.2f} |")
    assert row.count("→") == 2 and "Seen and unseen clients" in results
    # within each group, FedAvg against FedBABU client by client, and the two gaps' difference
    cell = out / "dp.noise_multiplier-1.0"
    fedavg_csv, fedbabu_csv = (cell / a / "seed-0" / "clients.csv" for a in ("fedavg", "fedbabu"))
    groups = np.array([line.split(",")[4] for line in fedbabu_csv.read_text().splitlines()[1:]])
    assert sorted(set(groups)) == ["seen", "unseen"] and (groups == "unseen").sum() == 2
    fedavg, fedbabu = read_curves(fedavg_csv)[:, -1], read_curves(fedbabu_csv)[:, -1]
    seen = paired_difference([fedbabu[groups == "seen"]], [fedavg[groups == "seen"]])
    unseen = paired_difference([fedbabu[groups == "unseen"]], [fedavg[groups == "unseen"]])
    gap = seen.mean - unseen.mean
    error = float(np.hypot(seen.standard_error, unseen.standard_error))
    expected = (f"| dp.noise_multiplier=1.0 | fedavg | {seen.text()} | {unseen.text()} | "
                f"{100 * gap:+.2f} ± {100 * error:.2f} |")
    assert expected in results.splitlines() and "| cell | algorithm | − fedbabu, seen |" in results
