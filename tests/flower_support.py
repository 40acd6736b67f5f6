"""What the Flower test files share: the small experiment, the simulator reference, and readers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from fedbabu.config import Config, load_config
from fedbabu.data.datasets import load_digits
from fedbabu.models import build_model
from fedbabu.runner import run_experiment

REPO = Path(__file__).resolve().parents[1]

SMALL = ["num_clients=3", "partition=dirichlet", "dirichlet_alpha=1.0", "client_fraction=1.0", "rounds=2",
         "local_epochs=1", "eval_every=0", "finetune.epochs=2", "fedetf.alternations=1"]
"""Three clients (one per SuperNode), every client in every round, two rounds, two fine-tuning epochs
(and one of FedETF's alternations, which its own evaluation runs 20 of)."""


def small_config(*overrides: str) -> Config:
    return load_config(None, [*SMALL, *overrides])


def simulator_run(config: Config):
    return run_experiment(config.model_copy(update={"workers": 1})).result


def read_clients(folder: Path) -> list[dict[str, str]]:
    with (folder / "clients.csv").open() as handle:
        return list(csv.DictReader(handle))


def initial_model(config: Config) -> dict[str, torch.Tensor]:
    digits = load_digits()
    model = build_model(config.resolved_model(), digits.channels, digits.image_size, digits.num_classes,
                        config.head_init, config.seed)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def initial_head(config: Config) -> dict[str, torch.Tensor]:
    return {k: v for k, v in initial_model(config).items() if k.startswith("head.")}


def read_records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]

