"""Local training only: no communication at all, the lower anchor of personalization.

Nothing is shared, so the engine aggregates nothing and counts zero bytes; each client's whole
model is its personal state and starts from the common initial model.
"""

from fedbabu.algorithms.base import Algorithm


class Local(Algorithm):
    name = "local"
    shared_parts = ()
    trained_parts = ("body", "head")
    personal_parts = ("body", "head")
