"""FedPer (Arivazhagan et al., 2019): the body is averaged, each client keeps its own head.

The head is trained with the body every round but never leaves the client, so clients are
evaluated (and fine-tuned) with their own heads.
"""

from fedbabu.algorithms.base import Algorithm


class FedPer(Algorithm):
    name = "fedper"
    shared_parts = ("body",)
    trained_parts = ("body", "head")
    personal_parts = ("head",)
