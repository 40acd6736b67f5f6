"""fedbabu: FedBABU and honest baselines for personalized federated learning.

The public Python API, imported on first use (``import fedbabu`` stays cheap)::

    run, compare, personalize, analyze, Results,    # experiments (fedbabu.api)
    ComparisonResults
    Config, load_config                              # configuration (fedbabu.config)
    from_arrays, from_torch, read_image_folder,      # your data (fedbabu.data.custom)
    FederatedData, ImageFolder
    split_body_head, join_body_head, BodyHead        # your network (fedbabu.models)
    Observer, UserError                              # progress hooks, the error of bad input
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "run": "fedbabu.api",
    "compare": "fedbabu.api",
    "personalize": "fedbabu.api",
    "analyze": "fedbabu.api",
    "Results": "fedbabu.api",
    "ComparisonResults": "fedbabu.api",
    "Config": "fedbabu.config",
    "load_config": "fedbabu.config",
    "from_arrays": "fedbabu.data.custom",
    "from_torch": "fedbabu.data.custom",
    "read_image_folder": "fedbabu.data.custom",
    "FederatedData": "fedbabu.data.custom",
    "ImageFolder": "fedbabu.data.custom",
    "split_body_head": "fedbabu.models.custom",
    "join_body_head": "fedbabu.models.custom",
    "BodyHead": "fedbabu.models",
    "Observer": "fedbabu.engine.simulation",
    "UserError": "fedbabu.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import a public name's module only when the name is first used."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedbabu' has no attribute {name!r}")
    importlib.import_module("fedbabu.algorithms")  # registers the algorithm names a config may use
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
