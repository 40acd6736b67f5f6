"""The CLI reads in an 80- or 60-column terminal and through a pipe: every name a user types back
(preset, algorithm entry, run folder, seeds) is printed whole, numeric headers are not cut, progress
keeps its round, lr, loss and times, and piped output is plain lines without control characters."""

import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import small_config
from rich.cells import cell_len
from rich.console import Console

from fedbabu.cli import main
from fedbabu.data.datasets import load_digits
from fedbabu.progress import RichProgress
from fedbabu.reproduce import list_presets
from fedbabu.runner import partition_for
from fedbabu.tables import Column, print_results, print_table, summary_row

WIDTHS = [80, 60]
ALGORITHMS = ["fedavg", "fedavg:update_part=head", "perfedavg:variant=hf"]
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but a newline or a tab


def tokens(output: str) -> set[str]:
    """The words of rendered output, split at spaces and table borders, without trailing separators."""
    return {t.rstrip(":,;") for t in re.split(r"[\s│┃]+", output)} - {""}


def assert_fits(output: str, width: int) -> None:
    """Nothing is cut, and only a name longer than the width (a deep run folder) runs past it, alone."""
    assert all(cell_len(line) <= width or " " not in line.strip() for line in output.splitlines()), output
    assert "…" not in output, output


def plain_env(columns: int) -> dict[str, str]:
    """The environment of a run in a pipe (CI log) of ``columns`` columns: no colour forced."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    return {**env, "COLUMNS": str(columns), "FLWR_DISABLE_UPDATE_CHECK": "1"}


@pytest.fixture(scope="module")
def piped_compare(tmp_path_factory):
    """``fedbabu compare`` of three algorithm entries (two with settings), stdout and stderr into pipes."""
    out = tmp_path_factory.mktemp("compare")
    command = [sys.executable, "-m", "fedbabu", "compare", "--algorithms", ",".join(ALGORITHMS), "--out", str(out),
               "--overwrite", "--workers", "1", "--set", "num_clients=10", "--set", "rounds=2",
               "--set", "eval_every=1", "--set", "finetune.epochs=1"]
    done = subprocess.run(command, capture_output=True, text=True, env=plain_env(80), timeout=300)
    assert done.returncode == 0, done.stderr
    return out, done.stdout, done.stderr


def test_a_piped_run_prints_plain_lines_and_whole_names(piped_compare):
    out, stdout, stderr = piped_compare
    assert not CONTROL.search(stdout) and not CONTROL.search(stderr)
    assert "━" not in stderr  # no frozen bar: one line per evaluation round instead
    progress = [line for line in stderr.splitlines() if " round " in line]
    assert [line.rsplit(": lr ", 1)[0] for line in progress] == [
        f"{a} seed 0 round {r}/2" for a in ALGORITHMS for r in (1, 2)]
    assert all(re.search(r": lr \S+, loss \d+\.\d{3}, accuracy \d+\.\d%$", line) for line in progress), progress
    assert_fits(stdout, 80)
    assert set(ALGORITHMS) <= tokens(stdout)
    assert f"comparison: {out / 'comparison.md'}" in stdout


@pytest.mark.parametrize("width", WIDTHS)
def test_the_results_table_keeps_entries_and_headers_whole(piped_compare, width):
    """The table of compare (its rows as comparison.csv keeps them) and of run, resume, personalize and
    flower sim (one run's summary.json)."""
    out = piped_compare[0]
    with (out / "comparison.csv").open() as f:
        compared = [{**r, **{k: float(r[k]) for k in r if k.endswith(("_mean", "_std", "_s", "_difference", "_error"))
                             and r[k]},
                     "bytes_per_round_per_client": int(r["bytes_per_round_per_client"])} for r in csv.DictReader(f)]
    assert [r["algorithm"] for r in compared] == ALGORITHMS
    one = summary_row(json.loads((out / "fedavg" / "summary.json").read_text()))
    for rows in (compared, [one]):
        console = Console(file=io.StringIO(), width=width)
        print_results(console, "digits digitcnn: 10 clients", rows)
        output = console.file.getvalue()
        assert_fits(output, width)
        assert {r["algorithm"] for r in rows} <= tokens(output)
        assert {"initial", "personalized", "gain", "bytes/client", "time"} <= tokens(output)
        for r in rows:
            assert f"{r['bytes_per_round_per_client']:,}" in output
        assert ("reference" in tokens(output)) == (rows is compared)


@pytest.mark.parametrize("width", WIDTHS)
def test_report_keeps_every_run_folder_whole(piped_compare, width, monkeypatch, capsys):
    folders = sorted(str(p.parent) for p in piped_compare[0].glob("*/summary.json"))
    assert len(folders) == len(ALGORITHMS)
    monkeypatch.setenv("COLUMNS", str(width))
    assert main(["report", *folders]) == 0
    output = capsys.readouterr().out
    assert_fits(output, width)
    assert set(folders) | {"fedavg", "perfedavg", "digits", "2/2"} <= tokens(output)


@pytest.mark.parametrize("width", WIDTHS)
def test_reproduce_list_keeps_every_preset_algorithm_and_seed_list_whole(width, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", str(width))
    assert main(["reproduce", "list"]) == 0
    output = capsys.readouterr().out
    assert_fits(output, width)
    presets = list_presets()
    words = tokens(output)
    for name, preset in presets.items():
        assert {name, *preset.algorithms, ",".join(map(str, preset.seeds))} <= words, name
    assert not CONTROL.search(output)


@pytest.mark.parametrize("width", [*WIDTHS, 120])
def test_a_table_is_drawn_where_it_fits_and_listed_where_it_would_cut_a_key(width):
    columns = [Column("name"), Column("about", "text"), Column("runs", "number"), Column("algorithms", "keys")]
    rows = [["a-rather-long-preset-name-number-one", "a description " * 6, "18", ["fedavg", "fedbabu", "lg_fedavg"]],
            ["a-rather-long-preset-name", "short", "4", ["fedavg"]]]
    console = Console(file=io.StringIO(), width=width)
    print_table(console, "presets", columns, rows)
    output = console.file.getvalue()
    assert_fits(output, width)
    assert {"a-rather-long-preset-name-number-one", "a-rather-long-preset-name", "fedavg", "fedbabu", "lg_fedavg"} \
        <= tokens(output)
    drawn = "┃" in output
    assert drawn == (width == 120)
    if not drawn:  # one entry per row, its first line starting with the key
        assert [line.split(":")[0] for line in output.splitlines() if not line.startswith(" ")][1:] == [
            "a-rather-long-preset-name-number-one", "a-rather-long-preset-name"]


def test_a_table_refuses_a_row_of_the_wrong_shape():
    console = Console(file=io.StringIO(), width=80)
    with pytest.raises(ValueError, match="2 values for 3 columns"):
        print_table(console, "t", [Column("a"), Column("b"), Column("c")], [["x", "y"]])
    with pytest.raises(TypeError, match="expected a list of strings"):
        print_table(console, "t", [Column("a", "keys")], [["fedavg,fedbabu"]])


@pytest.fixture(scope="module")
def partition():
    config = small_config(rounds=320)
    return config, partition_for(config, load_digits())


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("label", ["fedbabu", "perfedavg:variant=hf seed 2"])
def test_the_progress_line_keeps_round_lr_loss_and_times(partition, width, label):
    """The bar over rounds as it last drew, at a fixed width: the bar and the label give way first."""
    config, split = partition
    console = Console(file=io.StringIO(), width=width)
    progress = RichProgress(label, console)
    progress.on_start(config, split, None)
    progress.on_round({"round": 120, "lr": 0.0001, "train_loss": 1.2345, "test_accuracy": 0.4567})
    progress.on_personalize_start(100)
    progress.on_personalized(100, 100)
    lines = console.file.getvalue().splitlines()
    assert lines[0] == f"{label}: {split.summary()}"
    rounds, clients = lines[1:]
    assert cell_len(rounds) <= width and cell_len(clients) <= width
    assert re.search(r" 120/320 lr 0\.0001 loss 1\.234 (acc 45\.7% )?\d+:\d\d:\d\d<(\d+:\d\d:\d\d|-:--:--)$",
                     rounds.rstrip()), rounds
    assert re.search(r" 100/100 \d+:\d\d:\d\d<\d+:\d\d:\d\d$", clients.rstrip()), clients
    if width == 80 and label == "fedbabu":  # room for everything: the label, a bar and the accuracy
        assert rounds.startswith("fedbabu rounds ━") and "acc 45.7%" in rounds


def test_flower_log_lines_reach_a_pipe_without_colour_codes(monkeypatch):
    from fedbabu.flower.launch import _tee

    coloured = "\x1b[92mINFO \x1b[0m:      [ROUND 1]\n\x1b[92mINFO \x1b[0m:      configure_train\n"
    log, echoed = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(echoed):
        _tee(io.StringIO(coloured), log, echo=True)
    assert echoed.getvalue() == "INFO :      [ROUND 1]\nINFO :      configure_train\n"
    assert log.getvalue() == coloured  # the log file keeps what Flower wrote
