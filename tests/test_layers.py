"""The package's layers: config -> data -> models -> training -> algorithms -> engine -> results -> the app.

A module may import its own layer and those below it, never one above: that is what lets an
algorithm be added without touching the engine or the shared config, and the engine run an
algorithm it does not know. Checked on the source, so a new upward import fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fedbabu.algorithms  # noqa: F401  (registers the algorithms)
from fedbabu.algorithms import ALGORITHMS
from fedbabu.config import AlgorithmSettings, Config, build_config, registered_algorithms

SOURCE = Path(__file__).resolve().parents[1] / "src" / "fedbabu"
LAYERS = ["errors", "files", "config", "data", "models", "training", "algorithms", "engine", "results"]
"""Bottom to top; every other module (runner, cli, flower, ...) is the application on top of them all."""


def _layer(module: str) -> int:
    first = module.removeprefix("fedbabu.").split(".")[0]
    return LAYERS.index(first) if first in LAYERS else len(LAYERS)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedbabu"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("fedbabu"))
    return found - {"fedbabu"}


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for path in sorted(SOURCE.rglob("*.py")):
        module = "fedbabu." + ".".join(path.relative_to(SOURCE).with_suffix("").parts)
        upward += [f"{module} imports {other}" for other in _imports(path) if _layer(other) > _layer(module)]
    assert upward == []


def test_the_shared_config_lists_no_algorithm_and_every_algorithm_has_its_section():
    assert set(registered_algorithms()) == set(ALGORITHMS)
    for name, algorithm in ALGORITHMS.items():
        assert issubclass(algorithm.Settings, AlgorithmSettings)
        assert registered_algorithms()[name] is algorithm.Settings
        assert name not in Config.model_fields and not set(algorithm.Settings.legacy_keys) & set(Config.model_fields)
    assert Config(algorithm="ditto").to_plain()["ditto"] == {"lambda": 0.75}


def test_a_run_folder_config_of_an_older_build_loads_with_its_own_section_only():
    """Older builds wrote every algorithm's flat keys (fedprox_mu, ...) into every run's config.yaml."""
    flat = {"algorithm": "fedrep", "update_part": None, "fedprox_mu": 1.0, "ditto_lambda": 0.75,
            "fedrep_head_epochs": None, "fedrep_body_epochs": 1, "lg_warm_start": None, "perfedavg_variant": "fo",
            "perfedavg_alpha": None, "perfedavg_beta": 0.1, "perfedavg_delta": 0.001, "perfedavg_adapt_steps": 1}
    old = build_config(flat)
    # those builds' perfedavg adapt_steps was 1, today's default is 2: like any value that differs
    # from today's default it is kept, and only perfedavg reads it
    assert old == build_config({"algorithm": "fedrep", "fedrep": {"body_epochs": 1}, "perfedavg": {"adapt_steps": 1}})
    assert set(old.settings) == {"fedrep", "perfedavg"}
    changed = build_config({**flat, "ditto_lambda": 0.5})
    assert changed.settings_for("ditto").lambda_ == 0.5, "a value that differs from the default is kept"
