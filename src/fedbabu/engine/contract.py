"""What the engines do with an algorithm beyond calling its hooks.

:class:`~fedbabu.algorithms.base.Algorithm` lists only what an algorithm may override; everything
here is derived from those declarations, identically for every algorithm, so it lives with the
engines that use it (the simulator, the Flower apps, ``personalize`` and the reports).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from torch import nn

from fedbabu.algorithms.base import Algorithm, PersonalState
from fedbabu.models import in_parts
from fedbabu.training import OPTIMIZER_STATE, ClientData, evaluate, load_state


def start_global_model(algorithm: Algorithm, model: nn.Module) -> None:
    """Set the initial global model in place: the seeded one, or the algorithm's warm start's final model.

    Called where the initial model is built, so a warm start that cannot serve refuses the run
    before any folder is touched; reports and rebuilt summaries never read it.
    """
    if algorithm.warm_start is not None:
        algorithm.warm_start.load(model, algorithm.config, algorithm.settings)


def personal_shapes(algorithm: Algorithm, shapes: Mapping[str, tuple[int, ...]],
                    norms: Collection[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor a client keeps across rounds, with its shape, given the model's parameter shapes (and
    its normalization parameters, :attr:`~fedbabu.engine.params.Layout.norms`, which the part ``norm`` needs).

    Its personal parts, where it keeps its optimizer (``keeps_momentum``, with momentum on) a momentum
    buffer per trained parameter, and the auxiliary tensors it declares (``auxiliary_shapes``). The
    engine refuses an update whose personal state holds anything else, so a client cannot smuggle
    other tensors into the next round.
    """
    kept = {name: shape for name, shape in shapes.items() if in_parts(name, algorithm.personal_parts, norms)}
    if algorithm.keeps_momentum and algorithm.config.momentum > 0:
        kept |= {OPTIMIZER_STATE + name: shape for name, shape in shapes.items()
                 if in_parts(name, algorithm.trained_parts, norms)}
    return kept | algorithm.auxiliary_shapes(shapes)


def keeps_client_state(algorithm: Algorithm) -> bool:
    """Whether clients carry anything from round to round (personal parts, optimizer momentum or
    auxiliary tensors), which only the run's checkpoint then holds."""
    return (bool(algorithm.personal_parts) or (algorithm.keeps_momentum and algorithm.config.momentum > 0)
            or type(algorithm).auxiliary_shapes is not Algorithm.auxiliary_shapes)


def evaluate_client(model: nn.Module, data: ClientData, personal: PersonalState) -> float:
    """Accuracy a client sees from the current global model with its personal parts (if it has any): the
    same for every algorithm, whose differences are all in the personal state."""
    load_state(model, personal)
    return evaluate(model, data)


def describe(algorithm: Algorithm) -> str:
    """One line saying what the algorithm trains, aggregates and keeps per client, for logs."""
    def parts(names: tuple[str, ...]) -> str:
        return "+".join(names) or "nothing"

    return (f"{algorithm.name}: trains {parts(algorithm.trained_parts)}, aggregates {parts(algorithm.shared_parts)}, "
            f"keeps {parts(algorithm.personal_parts)} per client")


def versions(algorithm: type[Algorithm] | Algorithm) -> dict[str, int]:
    """The training and evaluation versions a run of this build records (``summary.json``)."""
    return {"training": algorithm.training_version, "evaluation": algorithm.evaluation_version}
