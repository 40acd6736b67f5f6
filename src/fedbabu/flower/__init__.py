"""FedBABU and every registered algorithm on Flower (Message API): a ServerApp and a ClientApp.

The apps are thin: the server samples clients, averages the algorithm's ``shared_parts`` with
:func:`fedbabu.engine.params.weighted_mean` and writes the simulator's result files; each client
builds the same model, partition share and :class:`~fedbabu.training.ClientData` as the
simulator and calls the algorithm's own hooks. Nothing about any algorithm is written here.

Import :mod:`fedbabu.flower.server` / :mod:`fedbabu.flower.client` for the apps; this package
itself does not import Flower, so the rest of fedbabu works without it.
"""
