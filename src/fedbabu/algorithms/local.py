"""Local training only: no communication at all, the lower anchor of personalization.

Nothing is shared, so the engine aggregates nothing and counts zero bytes; each client's whole
model is its personal state and starts from the common initial model. Every client but the held-out
ones (``holdout_clients``) trains in every round, whatever the client sampling: a round is one more
stretch of training alone, so ``rounds x local_epochs`` is each client's number of epochs.

The authors' ``main_local.py`` trains each client through one SGD optimizer for all its epochs, the
lr stepped down by a schedule. A client here keeps its optimizer's momentum (``keeps_momentum``) and
the default round continues from it, which is that one optimizer: a new optimizer every round would
restart the momentum every ``local_epochs`` epochs. Because its optimizer outlives the round, the
vectorized executor (whose optimizers start fresh each round) never runs it.
"""

from fedbabu.algorithms.base import Algorithm


class Local(Algorithm):
    name = "local"
    shared_parts = ()
    trained_parts = ("body", "head")
    personal_parts = ("body", "head")
    keeps_momentum = True
    training_version = 2  # 1 restarted the momentum every round

    def training_clients(self, sampled: list[int], participating: list[int]) -> list[int]:
        return list(participating)
