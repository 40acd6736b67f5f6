"""Local training only: no communication at all, the lower anchor of personalization.

Nothing is shared, so the engine aggregates nothing and counts zero bytes; each client's whole
model is its personal state and starts from the common initial model. Every client trains in
every round, whatever the client sampling: a round is one more stretch of training alone, so
``rounds x local_epochs`` is each client's number of epochs.
"""

from fedbabu.algorithms.base import Algorithm


class Local(Algorithm):
    name = "local"
    shared_parts = ()
    trained_parts = ("body", "head")
    personal_parts = ("body", "head")

    def training_clients(self, sampled: list[int], num_clients: int) -> list[int]:
        return list(range(num_clients))
