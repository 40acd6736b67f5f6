"""FedAvg (McMahan et al., 2017): every client trains the whole network; the server averages it all.

Evaluated with the same fine-tuning as FedBABU, so the comparison isolates the training phase.
The ``fedavg.update_part`` ablation trains and averages only the body (FedBABU's rule) or only the head
(the body stays at its random initialization), to show which part's training matters.
"""

from typing import ClassVar, Literal

from fedbabu.algorithms.base import Algorithm, refuse
from fedbabu.config import AlgorithmSettings, Config

UPDATE_PARTS = {"full": ("body", "head"), "body": ("body",), "head": ("head",)}


class FedAvg(Algorithm):
    name = "fedavg"

    class Settings(AlgorithmSettings):
        update_part: Literal["body", "head", "full"] | None = None
        """The ablation's trained and averaged part: body (FedBABU's rule), head, or unset (= full)."""
        legacy_keys: ClassVar[dict[str, str]] = {"update_part": "update_part"}

    settings: Settings
    shared_parts = ("body", "head")
    trained_parts = ("body", "head")

    def __init__(self, config: Config) -> None:
        self.trained_parts = self.shared_parts = UPDATE_PARTS[config.settings_for(self.name).update_part or "full"]
        super().__init__(config)

    def check_config(self, config: Config) -> None:
        if self.settings.update_part == "body" and config.head_init == "zeros":
            raise refuse(
                "head_init",
                "fedavg.update_part=body cannot learn with a zero head: the head is never trained, so every class gets "
                "the same logit and the body receives no gradient; use default or orthogonal",
            )
