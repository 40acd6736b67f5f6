"""The documentation site builds under ``mkdocs build --strict`` (every link and anchor resolves, the
configuration reference is generated from the code, the API reference has no griffe errors), and
``make run`` ends with the command that shows FedBABU's effect on real data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedbabu.cli import REAL_DATA_COMMAND, real_data_hint
from fedbabu.config import load_config

ROOT = Path(__file__).resolve().parents[1]
MKDOCS = Path(sys.executable).with_name("mkdocs")


@pytest.mark.skipif(not MKDOCS.exists() and shutil.which("mkdocs") is None, reason="mkdocs not installed (dev extra)")
def test_site_builds_strict(tmp_path: Path) -> None:
    command = [str(MKDOCS) if MKDOCS.exists() else "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    warnings = [line for line in (done.stdout + done.stderr).splitlines() if "WARNING" in line or "ERROR" in line]
    assert done.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(warnings or [done.stderr[-4000:]])
    site = tmp_path / "site"
    assert (site / "configuration" / "index.html").read_text().count("fedetf.training") >= 1
    assert not list(site.rglob("*.pt")), "the trained runs' model files must stay out of the site"


def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No dataset anywhere the data module looks: empty $FEDBABU_DATA and cache, a folder without .cache/."""
    monkeypatch.setenv("FEDBABU_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def hinted_command(lines: list[str]) -> str:
    """The hint's command as one line, its shell continuations joined."""
    return " ".join(line.strip().removesuffix("\\").strip() for line in lines[1:])


def test_hint_for_the_embedded_default_downloads_when_cifar10_is_absent(monkeypatch, tmp_path) -> None:
    _isolated(monkeypatch, tmp_path)
    lines = real_data_hint(None, load_config())
    assert lines and hinted_command(lines) == f".venv/bin/{REAL_DATA_COMMAND} --download"
    assert all(len(line) <= 76 for line in lines[1:]), "the command fits a terminal, continued with backslashes"


def test_hint_runs_offline_where_cifar10_is_found(monkeypatch, tmp_path) -> None:
    _isolated(monkeypatch, tmp_path)
    (tmp_path / "cache" / "fedbabu" / "cifar-10-batches-py").mkdir(parents=True)
    assert hinted_command(real_data_hint(None, load_config())) == f".venv/bin/{REAL_DATA_COMMAND}"
    given = tmp_path / "mine"
    (given / "cifar-10-batches-py").mkdir(parents=True)
    config = load_config(extra={"data_dir": str(given)})
    assert hinted_command(real_data_hint(None, config)) == f".venv/bin/{REAL_DATA_COMMAND} --data-dir {given}"


def test_no_hint_for_a_config_file_or_another_dataset(monkeypatch, tmp_path) -> None:
    _isolated(monkeypatch, tmp_path)
    assert real_data_hint(ROOT / "configs" / "digits.yaml", load_config(ROOT / "configs" / "digits.yaml")) == []
    assert real_data_hint(None, load_config(extra={"dataset": "fmnist"})) == []


def test_make_run_prints_the_hint_and_a_config_file_does_not(tmp_path) -> None:
    """``fedbabu compare`` as ``make run`` calls it, shrunk to one round of ten clients."""
    tiny = ["--set", "rounds=1", "--set", "num_clients=10", "--set", "finetune.epochs=1", "--set", "eval_every=0",
            "--workers", "1", "--quiet"]
    base = [sys.executable, "-m", "fedbabu", "compare", "--algorithms", "fedavg,fedbabu", "--overwrite"]
    env = {**os.environ, "FEDBABU_DATA": str(tmp_path / "none"), "XDG_CACHE_HOME": str(tmp_path / "none")}
    default = subprocess.run([*base, "--out", str(tmp_path / "a"), *tiny], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300, env=env)
    assert default.returncode == 0, default.stderr
    lines = default.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("These digits are too easy"))
    command = [line for line in lines[start:] if line.startswith("  ")]
    assert hinted_command(["", *command]) == f".venv/bin/{REAL_DATA_COMMAND} --download"
    with_file = subprocess.run([*base, "--out", str(tmp_path / "b"), "--config", str(ROOT / "configs" / "digits.yaml"),
                                *tiny], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert with_file.returncode == 0, with_file.stderr
    assert "fedbabu reproduce" not in with_file.stdout
