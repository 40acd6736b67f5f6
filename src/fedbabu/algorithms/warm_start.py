"""Starting an algorithm from the final global model of another finished run (LG-FedAvg after FedAvg).

The run folder is named by one of the algorithm's own settings and checked before anything trains: it must be a finished
run of the expected algorithm on the same data, partition, seed and network, otherwise the warm
start would silently mix two experiments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from fedbabu.config import AlgorithmSettings, Config, build_config, read_yaml
from fedbabu.errors import UserError
from fedbabu.files import load_tensors


@dataclass(frozen=True)
class WarmStart:
    """The setting ``owner.field`` names a finished run of ``algorithm`` whose ``model.pt`` starts this run."""

    owner: str
    field: str
    algorithm: str
    same: ClassVar[tuple[str, ...]] = Config.keys_with_role("data")
    """Settings the two runs must share: they define the clients' data and the seeded initial model."""

    @property
    def key(self) -> str:
        """The setting as users write it (``lg_fedavg.warm_start``)."""
        return f"{self.owner}.{self.field}"

    def folder(self, config: Config) -> Path | None:
        """The run folder the config names, if any."""
        return getattr(config.settings_for(self.owner), self.field)

    def with_folder(self, config: Config, folder: Path) -> Config:
        """The config starting from ``folder``."""
        return config.with_settings(self.owner, **{self.field: folder})

    def load(self, model: nn.Module, config: Config, settings: AlgorithmSettings) -> None:
        """Load the named run's final model into ``model``, or refuse a run that cannot start this one."""
        folder = getattr(settings, self.field)
        if folder is None:
            return
        folder = Path(folder)
        if not folder.is_dir():
            raise self._refuse(f"{folder} is not a run folder")
        for name in ("config.yaml", "summary.json", "model.pt"):
            if not (folder / name).is_file():
                raise self._refuse(f"{folder} is not a finished run (no {name}); start from a {self.algorithm} "
                                   "run that has completed")
        saved = build_config(read_yaml(folder / "config.yaml"), str(folder / "config.yaml"))
        part = getattr(saved.settings_for(saved.algorithm), "update_part", None)
        if saved.algorithm != self.algorithm or part not in (None, "full"):
            kind = saved.algorithm + (f" (update_part={part})" if part else "")
            raise self._refuse(f"{folder} is a {kind} run; expected a {self.algorithm} run")
        for name in self.same:
            if getattr(saved, name) != getattr(config, name):
                raise self._refuse(f"{folder} ran with {name}={getattr(saved, name)!r}, this run has "
                                   f"{getattr(config, name)!r}; both must use the same data, partition and seed")
        if saved.resolved_model() != config.resolved_model():
            raise self._refuse(f"{folder} trained model {saved.resolved_model()!r}, this run builds "
                               f"{config.resolved_model()!r}")
        state = load_tensors(folder / "model.pt")
        params = dict(model.named_parameters())
        if state.keys() != params.keys() or any(state[n].shape != p.shape for n, p in params.items()):
            raise self._refuse(f"{folder / 'model.pt'} does not fit this run's network (other parameter names "
                               "or shapes)")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])

    def _refuse(self, message: str) -> UserError:
        return UserError(f"{self.key}: {message}")
