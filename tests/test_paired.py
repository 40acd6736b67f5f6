"""The paired per-client difference that results tables report beside every comparison."""

import csv
import math

import numpy as np
import pytest

from fedbabu.results import plots
from fedbabu.results.paired import PairedDifference, paired_cell, paired_difference
from fedbabu.results.report import comparison_markdown, comparison_rows, write_comparison


def test_paired_difference_is_per_client_with_its_standard_error_and_counts():
    reference = np.array([0.50, 0.80, 0.90, np.nan, 0.70])
    other = np.array([0.60, 0.80, 0.85, 0.90, 0.90])
    pair = paired_difference([reference], [other])
    differences = np.array([0.10, 0.0, -0.05, 0.20])  # the untested client (NaN) is left out
    assert pair.mean == pytest.approx(differences.mean())
    assert pair.standard_error == pytest.approx(differences.std(ddof=1) / 2)
    assert (pair.higher, pair.lower, pair.tied) == (2, 1, 1)
    assert pair.text() == f"+{100 * differences.mean():.2f} ± {100 * differences.std(ddof=1) / 2:.2f} " \
                          "(2 higher, 1 lower, 1 tied)"


def test_paired_difference_pools_seeds_and_refuses_runs_of_other_clients():
    first, second = np.array([0.5, 0.6]), np.array([0.7, 0.7, 0.7])
    pooled = paired_difference([first, second], [first + 0.1, second - 0.1])
    assert pooled.mean == pytest.approx(-0.1 / 5) and (pooled.higher, pooled.lower) == (2, 3)
    assert paired_difference([first], [second]) is None
    assert paired_difference([first, second], [first]) is None
    single = paired_difference([np.array([0.5])], [np.array([0.6])])
    assert math.isnan(single.standard_error) and single.text() == "+10.00 (1 higher, 0 lower, 0 tied)"


def test_the_paired_cell_reads_the_same_in_the_terminal_and_in_written_tables():
    row = {"algorithm": "fedavg", "paired_against": "fedbabu", "paired_difference": -0.0123,
           "paired_standard_error": 0.0045, "clients_higher": 3, "clients_lower": 40, "clients_tied": 7}
    assert paired_cell(row) == "-1.23 ± 0.45 (3 higher, 40 lower, 7 tied)"
    assert paired_cell(row, counts=False) == "-1.23 ± 0.45"
    assert paired_cell({**row, "algorithm": "fedbabu"}) == "reference"
    assert paired_cell({**row, "paired_difference": None}, counts=False) == "–"


def test_the_differences_plot_draws_every_seed_with_its_paired_standard_error(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.setdefault("axes", fig.axes[0]))
    seed = [PairedDifference(0.015, 0.004, 60, 20, 20), PairedDifference(0.025, 0.002, 70, 10, 20)]
    single = [PairedDifference(-0.01, math.nan, 0, 1, 0)]
    plots.plot_paired_differences({"s=2": seed, "s=10": single}, tmp_path / "d.png", "title")
    ax = drawn["axes"]
    spans = sorted((round(lo[1], 6), round(hi[1], 6)) for container in ax.containers
                   for lo, hi in container.lines[2][0].get_segments())
    assert spans == [(-1.0, -1.0), (1.1, 1.9), (2.3, 2.7)]  # mean ± SE in points; one client: no SE
    means = [segment[0][1] for c in ax.collections if c not in [x.lines[2][0] for x in ax.containers]
             for segment in c.get_segments()]
    assert sorted(round(m, 6) for m in means) == [-1.0, 2.0]


def _summary(initial: float, personalized: float) -> dict:
    return {"initial_accuracy": {"mean": initial}, "personalized_accuracy": {"mean": personalized},
            "bytes_per_round_per_client": 8, "wall_time_s": 1.0, "personalization": "5 epochs",
            "personalization_unit": "epoch"}


def test_a_comparison_pairs_every_entry_against_fedbabu(tmp_path):
    """FedBABU is the reference wherever it is compared, whatever its place; each other entry gets the
    difference client by client, pooled over seeds, in the table, the CSV and the terminal rows."""
    babu = [np.array([[0.5, 0.9], [0.6, 0.8], [0.4, 0.7]]), np.array([[0.5, 0.6], [0.6, 0.9], [0.4, 0.8]])]
    fedavg = [np.array([[0.3, 0.8], [0.4, 0.8], [0.2, 0.5]]), np.array([[0.3, 0.7], [0.4, 0.6], [0.2, 0.8]])]
    curves = {"fedavg": fedavg, "fedbabu": babu}
    rows = comparison_rows({a: [_summary(0.5, 0.7)] * 2 for a in curves}, curves)
    differences = np.array([-0.1, 0.0, -0.2, 0.1, -0.3, 0.0])
    by_name = {r["algorithm"]: r for r in rows}
    assert by_name["fedbabu"]["paired_difference"] is None and by_name["fedavg"]["paired_against"] == "fedbabu"
    assert by_name["fedavg"]["paired_difference"] == pytest.approx(differences.mean())
    assert by_name["fedavg"]["paired_standard_error"] == pytest.approx(differences.std(ddof=1) / math.sqrt(6))
    assert [by_name["fedavg"][k] for k in ("clients_higher", "clients_lower", "clients_tied")] == [1, 3, 2]
    markdown = comparison_markdown(rows, "t")
    assert "| paired vs fedbabu |" in markdown and "| reference |" in markdown
    assert f"| {100 * differences.mean():+.2f} ± {100 * differences.std(ddof=1) / math.sqrt(6):.2f} " \
           "(1 higher, 3 lower, 2 tied) |" in markdown
    write_comparison(rows, curves, tmp_path, "t")
    written = {r["algorithm"]: r for r in csv.DictReader((tmp_path / "comparison.csv").open())}
    assert written["fedbabu"]["paired_difference"] == "" and written["fedavg"]["clients_lower"] == "3"
    assert float(written["fedavg"]["paired_difference"]) == pytest.approx(differences.mean(), abs=1e-6)
    without = comparison_rows({"fedavg": [_summary(0.5, 0.7)], "ditto": [_summary(0.5, 0.7)]},
                              {"fedavg": fedavg[:1], "ditto": babu[:1]})
    assert [r["paired_against"] for r in without] == ["fedavg", "fedavg"]
    assert without[1]["paired_difference"] == pytest.approx(np.mean([0.1, 0.0, 0.2]))
