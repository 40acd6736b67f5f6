"""FedBABU (Oh et al., ICLR 2022): body aggregation and body update, head fixed at its random init.

The head is neither trained nor aggregated, so it stays bit-identical to the server's initial
head on every client (averaging identical floats is not always exact, so it must not be averaged).
"""

from fedbabu.algorithms.base import Algorithm, refuse
from fedbabu.config import Config


class FedBABU(Algorithm):
    name = "fedbabu"
    shared_parts = ("body",)
    trained_parts = ("body",)

    def check_config(self, config: Config) -> None:
        if config.head_init == "zeros":
            raise refuse(
                "head_init",
                "fedbabu cannot learn with a zero head: the head is never trained, so every class gets the "
                "same logit and the body receives no gradient; use default or orthogonal",
            )
