"""FedBN (Li et al., ICLR 2021): FedAvg that leaves every normalization layer's parameters on its client.

Each client trains the whole network as FedAvg does; the server averages everything except the
batch-norm layers, whose affine parameters (scale and shift) each client keeps from round to round, so
that a client's features are normalized for its own data (paper, Algorithm 1; the authors'
``federated/fed_digits.py``, ``communication``: every key without ``bn`` in its name is averaged, the
others stay on the client). The part :data:`~fedbabu.models.NORM` names those layers by module type, so
every normalization layer of any network counts, whatever it is called; a network without one is FedAvg.

* The server's copy of the normalization parameters is never averaged, so it stays at the seeded
  initial values: a client never sampled (or held out) starts from them, as a new client of the
  authors' code starts from the server model's.
* Running statistics: the authors' networks track them and keep them local with the affine parameters.
  Ours normalize with batch statistics at test time too (no running statistics), so there are no
  buffers to keep; the affine parameters are all there is.
* Training as the run configures it (the ``finetune.*`` evaluation afterwards, like every algorithm
  here). The authors' digits script trains every client every round for one epoch of plain SGD
  (lr 0.01, batch 32, no momentum) and averages uniformly; we sample ``client_fraction`` of the
  clients, use the run's lr schedule and momentum, and weight the mean by client size as the engine
  does for every algorithm. They test the model each client holds after aggregation, which is what
  evaluation during training here reports (global weights, the client's own normalization).
"""

from fedbabu.algorithms.base import Algorithm
from fedbabu.models import EXCLUDED, NORM


class FedBN(Algorithm):
    name = "fedbn"
    shared_parts = ("body", "head", EXCLUDED + NORM)
    trained_parts = ("body", "head")
    personal_parts = (NORM,)
