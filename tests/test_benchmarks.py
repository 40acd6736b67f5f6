"""The benchmarks' command lines: each mode writes its own results file, so a quick run never replaces the
committed full results (``benchmarks/results.md``, ``benchmarks/scaling.md``) unasked."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts put src/ and benchmarks/ first; undone after
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_round_throughput_writes_each_modes_own_file(monkeypatch, tmp_path):
    bench = _load("round_throughput", monkeypatch)
    assert bench.parse_args([]).out == BENCHMARKS / "results.md"
    assert bench.parse_args(["--quick"]).out == BENCHMARKS / "results-quick.md"
    assert bench.parse_args(["--quick", "--out", str(tmp_path / "mine.md")]).out == tmp_path / "mine.md"
    assert bench.parse_args(["--out", str(tmp_path / "full.md")]).out == tmp_path / "full.md"
    assert bench.RESULTS["quick"].is_file() and bench.RESULTS["full"].is_file()  # both are committed


def test_scaling_writes_each_modes_own_file(monkeypatch, tmp_path):
    scaling = _load("scaling", monkeypatch)
    assert scaling.results_path(quick=False) == BENCHMARKS / "scaling.md"
    assert scaling.results_path(quick=True) == BENCHMARKS / "scaling-quick.md"
    assert scaling.results_path(quick=True, out=tmp_path / "mine.md") == tmp_path / "mine.md"


def test_quick_needs_a_pair(monkeypatch):
    bench = _load("round_throughput", monkeypatch)
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--pairs", "0"])
