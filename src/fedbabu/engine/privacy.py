"""User-level differential privacy of the shared parameters (DP-FedAvg, McMahan et al., 2018).

With ``dp.noise_multiplier`` z > 0, the server's round (:func:`fedbabu.engine.round.finish_round`, so
both engines) turns each accepted client's reply into its *update* of the shared parameters (its
shared vector minus the global one it started from), clips it to L2 norm C = ``dp.clipping_norm``
(:func:`clip`), averages the clipped updates uniformly over the expected number of clients per round
m = ``max(1, floor(f * N))`` (not over the replies, not by sample counts), adds Gaussian noise of
standard deviation ``z * C / m`` (:func:`noise`, drawn from a stream seeded by (seed, round) alone) and
adds the result to the previous global vector.

Accounting (:func:`epsilon`) uses Google's ``dp-accounting`` RDP accountant with the event that
matches the sampling the engine does:

* ``dp.sampling: fixed`` (the default, the engine's usual sample): m of the N clients drawn
  uniformly *without replacement* each round (``SampledWithoutReplacementDpEvent``), a Gaussian
  mechanism, composed over the rounds. That analysis (Wang, Balle and Kasiviswanathan, 2019) is for
  the *replace-one* neighbouring relation (two federations of N clients that differ in one client's
  data; N is public), under which the clipped sum has L2 sensitivity 2C: the accountant's Gaussian
  therefore has noise multiplier z / 2.
* ``dp.sampling: poisson``: each client joins a round independently with probability q = m / N
  (:func:`poisson_clients`), as DP-FedAvg's own analysis assumes (``PoissonSampledDpEvent``), for
  the *add-or-remove-one* relation, under which the clipped sum's sensitivity is C and the
  accountant's Gaussian has noise multiplier z. The mean still divides by m, the expected count.

Epsilon is a pure function of (N, m, z, delta, sampling, rounds), so a resumed run needs no
accountant state beyond the rounds done.

**Adaptive clipping** (``dp.adaptive_clipping``, Andrew et al., 2021) moves the clipping norm each
round toward the ``dp.target_quantile`` of the update norms: the server counts the updates within
the current norm, adds Gaussian noise of standard deviation sigma_b to the count, and sets
``C <- C * exp(-clipping_lr * (noisy count / m - target_quantile))`` (:func:`adapted_norm`).
The count is released too, so its cost is taken out of the same budget: the updates' noise
multiplier becomes ``(z**-2 - (2 sigma_b)**-2) ** -1/2`` (:func:`update_noise_multiplier`), which with
the count's noise composes to exactly the Gaussian of multiplier z the accountant counts (the
paper's Theorem 1; it holds for both relations, the count's sensitivity growing with the sum's).
The norm is part of the server's state (checkpointed), and each round's norm is in its record.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedbabu.algorithms.base import Algorithm
from fedbabu.config import Config
from fedbabu.errors import UserError

log = logging.getLogger("fedbabu")

NOISE_STREAM = 0xD9C
"""The stream of the server's Gaussian noise, with (seed, round): independent of workers, engine and resume."""

COUNT_STREAM = 0xC07
"""The stream of adaptive clipping's noise on the count of unclipped updates, with (seed, round)."""

ACCOUNTANT = "rdp (dp-accounting)"
SAMPLING = {
    "fixed": "fixed-size sampling without replacement (m of N clients per round), replace-one neighbours",
    "poisson": "Poisson sampling (each client with probability m/N per round), add-or-remove-one neighbours",
}


def enabled(config: Config) -> bool:
    """Whether the run is differentially private (``dp.noise_multiplier > 0``)."""
    return config.dp.enabled()


def expected_clients(config: Config) -> int:
    """m: the clients sampled each round, ``max(1, floor(f * N))`` (its expectation under Poisson sampling):
    the divisor of the private mean."""
    return config.clients_per_round()


def population(config: Config) -> int:
    """N: the clients a round may sample (the federation less its held-out clients), the accountant's N."""
    return config.trainable_clients()


def update_noise_multiplier(config: Config) -> float:
    """The noise multiplier of the mean update: z, or with adaptive clipping the share of z left once the
    count of unclipped updates has taken its own, ``(z**-2 - (2 sigma_b)**-2) ** -1/2``."""
    z = config.dp.noise_multiplier
    if not config.dp.adaptive_clipping:
        return z
    return (z ** -2 - (2 * config.clipped_count_stddev()) ** -2) ** -0.5


def noise_std(config: Config, clipping_norm: float | None = None) -> float:
    """The standard deviation of the noise added to the mean update: ``z * C / m`` at the round's norm C
    (``dp.clipping_norm`` unless adaptive clipping has moved it)."""
    bound = float(config.dp.clipping_norm if clipping_norm is None else clipping_norm)
    return update_noise_multiplier(config) * bound / expected_clients(config)


def poisson_clients(config: Config, round_index: int, participating: Sequence[int]) -> list[int]:
    """The clients of a Poisson-sampled round: each participating client independently with probability
    m / N, from the sampler's stream for (seed, round) alone."""
    from fedbabu.engine.round import SAMPLER_STREAM, stream_seed

    rng = np.random.default_rng(stream_seed(config.seed, round_index, 0, SAMPLER_STREAM))
    chosen = rng.random(len(participating)) < expected_clients(config) / len(participating)
    return [client for client, taken in zip(participating, chosen, strict=True) if taken]


def check_algorithm(algorithm: Algorithm) -> None:
    """Refuse, in one line, an algorithm under which the stated guarantee would not hold.

    The analysis covers a server whose new shared parameters are the previous ones plus the noisy
    mean of clipped updates of the sampled clients, and nothing else a client sent.
    """
    config = algorithm.config
    if not enabled(config):
        return
    name = config.algorithm
    if not algorithm.shared_parts:
        raise UserError(f"dp: {name} shares no parameters (its clients train alone), so there is nothing to "
                        "privatize; use an algorithm that shares a part")
    if type(algorithm).training_clients is not Algorithm.training_clients:
        raise UserError(f"dp: {name} chooses which clients train itself, not by the round's sample, which the "
                        "accountant assumes; DP is not available for it")
    if type(algorithm).server_update is not Algorithm.server_update:
        raise UserError(f"dp: {name}'s server step reads client statistics that are neither clipped nor noised, "
                        "so the guarantee would not hold; DP is available for algorithms whose server averages")
    if type(algorithm).collaborate is not Algorithm.collaborate:
        raise UserError(f"dp: {name}'s clients report per-client values to the server in the clear (collaborate), "
                        "which dp.noise_multiplier does not cover, so the guarantee would not hold; DP is not "
                        "available for it")
    if algorithm.warm_start is not None:
        raise UserError(f"dp: {name} starts from another run's model, whose privacy cost this run's accountant "
                        "does not count; DP is not available for it")


def clip(update: np.ndarray, norm: float) -> np.ndarray:
    """``update`` (float64) scaled down to L2 norm at most ``norm``; unchanged when it is within it."""
    length = math.sqrt(float(np.dot(update, update)))
    return update if length <= norm else update * (norm / length)


def noise(config: Config, round_index: int, size: int, clipping_norm: float | None = None) -> np.ndarray:
    """The round's Gaussian noise on the mean update (float64, std :func:`noise_std`), seeded by (seed, round)."""
    from fedbabu.engine.round import stream_seed

    rng = np.random.default_rng(stream_seed(config.seed, round_index, 0, NOISE_STREAM))
    return rng.standard_normal(size) * noise_std(config, clipping_norm)


def private_mean_update(config: Config, round_index: int, shared: Sequence[np.ndarray],
                        reference: np.ndarray, clipping_norm: float | None = None) -> tuple[np.ndarray, int]:
    """The noisy mean of the clipped updates (float64), what DP adds to the previous shared parameters, and
    how many updates were within the norm (adaptive clipping's count, before its noise).

    ``shared`` are the accepted clients' shared vectors in client order, ``reference`` the global
    shared vector they started from, ``clipping_norm`` the round's norm (``dp.clipping_norm`` by
    default). The clipped updates are summed in that order and divided by the expected number of
    clients (a round with fewer replies still divides by m, and a round with none still adds the
    noise), so the result never depends on which reply arrived first.
    """
    bound = float(config.dp.clipping_norm if clipping_norm is None else clipping_norm)
    total = np.zeros(reference.shape, dtype=np.float64)
    within = 0
    for vector in shared:
        update = np.subtract(vector, reference, dtype=np.float64)
        within += int(math.sqrt(float(np.dot(update, update))) <= bound)
        total += clip(update, bound)
    return total / expected_clients(config) + noise(config, round_index, reference.size, bound), within


def noisy_within_share(config: Config, round_index: int, within: int) -> float:
    """Adaptive clipping's released statistic: the share of the round's expected clients whose update was
    within the norm, after Gaussian noise of standard deviation sigma_b on the count (its own stream per
    (seed, round)). Rounds record it, so the norm can be replayed from them."""
    from fedbabu.engine.round import stream_seed

    rng = np.random.default_rng(stream_seed(config.seed, round_index, 0, COUNT_STREAM))
    return (within + rng.standard_normal() * config.clipped_count_stddev()) / expected_clients(config)


def adapted_norm(config: Config, clipping_norm: float, within_share: float) -> float:
    """The next round's norm: a geometric step toward the target quantile, down when more than that share of
    the updates was within the norm."""
    dp = config.dp
    return float(clipping_norm * math.exp(-dp.clipping_lr * (within_share - dp.target_quantile)))


def clipping_norm_after(config: Config, records: Sequence[Mapping[str, Any]]) -> float | None:
    """The norm the next round clips to, after the recorded rounds: ``dp.clipping_norm`` moved by each
    round's released share (``within_share``) under adaptive clipping; None without DP. A resumed run
    replays the records of its checkpoint, so it needs no other state."""
    if not enabled(config):
        return None
    norm = float(config.dp.clipping_norm)
    if config.dp.adaptive_clipping:
        for record in records:
            norm = adapted_norm(config, norm, float(record["within_share"]))
    return norm


def report_empty_round(round_number: int) -> None:
    """A DP round without accepted updates still releases noise: say so instead of "the model is kept"."""
    log.warning("round %d: no client update arrived or was accepted; with dp the round's noise is still added",
                round_number)


# --- accounting -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _round_rdp(num_clients: int, sample: int, noise_multiplier: float,
               sampling: str = "fixed") -> tuple[np.ndarray, np.ndarray]:
    """(orders, RDP of one round): computed once per setting (a fraction of a second), then scaled by rounds.

    Fixed-size sampling: m of N without replacement, then a Gaussian of noise multiplier z/2: z/2 because
    the analysis is for replace-one neighbours, under which the clipped sum's L2 sensitivity is 2C while
    the noise's standard deviation on it is zC. Poisson sampling: probability m/N, then a Gaussian of
    multiplier z, for add-or-remove-one neighbours (sensitivity C).
    """
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    if sampling == "poisson":
        one = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        one.compose(dp_accounting.PoissonSampledDpEvent(
            sample / num_clients, dp_accounting.GaussianDpEvent(noise_multiplier)))
    else:
        one = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        one.compose(dp_accounting.SampledWithoutReplacementDpEvent(
            num_clients, sample, dp_accounting.GaussianDpEvent(noise_multiplier / 2)))
    return np.array(one.orders), np.array(one.rdp)


def epsilon(config: Config, rounds: int) -> float:
    """Epsilon at ``config.resolved_delta()`` after ``rounds`` rounds: a pure function of the config and rounds.

    Composing the same event ``rounds`` times is ``rounds`` times its RDP, which is how the
    accountant composes a ``SelfComposedDpEvent`` too; the conversion to (epsilon, delta) is the
    accountant's own.
    """
    if rounds <= 0:
        return 0.0
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    orders, rdp = _round_rdp(population(config), expected_clients(config), float(config.dp.noise_multiplier),
                             config.dp.sampling)
    return float(compute_epsilon(orders, rounds * rdp, config.resolved_delta())[0])


def rounds_to_run(config: Config) -> int:
    """The rounds a run trains: ``rounds``, or fewer where the next round would take epsilon above the target."""
    target = config.dp.target_epsilon
    if not enabled(config) or target is None or config.rounds == 0 or epsilon(config, config.rounds) <= target:
        return config.rounds
    low, high = 0, config.rounds  # epsilon(low) <= target < epsilon(high); epsilon grows with the rounds
    while high - low > 1:
        middle = (low + high) // 2
        if epsilon(config, middle) <= target:
            low = middle
        else:
            high = middle
    return low


def stop_reason(config: Config, rounds_done: int) -> str | None:
    """Why a run trained fewer rounds than configured (the target epsilon), or None when it did not stop early."""
    if rounds_done >= config.rounds or not enabled(config) or config.dp.target_epsilon is None:
        return None
    return (f"dp.target_epsilon={config.dp.target_epsilon:g}: stopped after {rounds_done} of {config.rounds} rounds; "
            f"round {rounds_done + 1} would take epsilon from {epsilon(config, rounds_done):.4g} to "
            f"{epsilon(config, rounds_done + 1):.4g} (delta {config.resolved_delta():.3g})")


def announce_stop(config: Config, rounds_done: int) -> None:
    """The one line a run prints (and ``events.log`` keeps) when the target epsilon stops it early."""
    reason = stop_reason(config, rounds_done)
    if reason is not None:
        log.warning("%s", reason)


def summary(config: Config, records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """``summary.json``'s ``privacy``: the settings, the final (epsilon, delta) and how they were accounted,
    after the run's round ``records``."""
    if not enabled(config):
        return None
    dp, rounds_done = config.dp, len(records)
    adaptive = None
    if dp.adaptive_clipping:
        adaptive = {"target_quantile": dp.target_quantile, "clipping_lr": dp.clipping_lr,
                    "clipped_count_stddev": config.clipped_count_stddev(),
                    "update_noise_multiplier": update_noise_multiplier(config),
                    "final_clipping_norm": clipping_norm_after(config, records)}
    return {
        "noise_multiplier": dp.noise_multiplier,
        "clipping_norm": dp.clipping_norm,
        "clients_per_round": expected_clients(config),
        "population": population(config),
        "noise_std": noise_std(config),
        "delta": config.resolved_delta(),
        "epsilon": epsilon(config, rounds_done),
        "target_epsilon": dp.target_epsilon,
        "rounds": rounds_done,
        "stopped_early": stop_reason(config, rounds_done),
        "accountant": ACCOUNTANT,
        "sampling": SAMPLING[dp.sampling],
        "adaptive_clipping": adaptive,
        "protects": "the shared parameters of every round's global model (user level); not the metrics clients "
                    "report, nor individual updates from the server that receives them",
    }
