"""User-level differential privacy (``dp``): clipping, the noise, the accountant, and the engine's promises.

A DP run clips every accepted update of the shared parameters, averages over the expected number of
clients per round, adds Gaussian noise seeded by (seed, round) and reports epsilon after each round.
So it must still be bit-identical for any number of workers and after a resume, ``noise_multiplier:
0`` must be exactly a run without DP, and settings under which the guarantee would not hold are
refused in one line. (The Flower engine's equality with DP on is in ``test_flower.py``.)
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import dp_accounting
import numpy as np
import pytest
import torch
from conftest import StopAtRound, small_config
from dp_accounting.rdp import RdpAccountant
from torch import nn

from fedbabu.algorithms import ALGORITHMS
from fedbabu.config import build_config
from fedbabu.engine import privacy
from fedbabu.engine.round import MEASURED_KEYS, ClientReply, RoundPlan, ServerState, finish_round
from fedbabu.errors import UserError
from fedbabu.files import load_tensors
from fedbabu.results.report import comparison_markdown
from fedbabu.runner import resume_experiment, run_experiment

pytestmark = pytest.mark.usefixtures("one_thread")

DP = {"noise_multiplier": 0.5, "clipping_norm": 0.5}


def dp_config(**overrides):
    values = {"rounds": 4, "checkpoint_every": 1, "eval_every": 2, "finetune": {"epochs": 1}, **overrides}
    return small_config(**{**values, "dp": {**DP, **overrides.get("dp", {})}})


def records(folder):
    return [{k: v for k, v in json.loads(line).items() if k not in MEASURED_KEYS}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def same_model(a, b) -> bool:
    one, other = load_tensors(a / "model.pt"), load_tensors(b / "model.pt")
    return one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)


# --- the server step -------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(8, 4)
        self.head = nn.Linear(4, 2)


def tiny_round(config, updates, round_index=0):
    """A server with a tiny network and replies moving its shared parameters by ``updates``; one DP round."""
    algorithm = ALGORITHMS[config.algorithm](config)
    server = ServerState.of(algorithm, Tiny())
    reference = server.shared().numpy().copy()
    replies = [ClientReply(c, (reference + u).astype(np.float32), 0.5, 10 * (c + 1)) for c, u in enumerate(updates)]
    plan = RoundPlan(round_index, 0.1, tuple(range(len(updates))), ())
    outcome = finish_round(plan, replies, server, algorithm, config, {})
    return reference, server.shared().numpy().astype(np.float64), replies, outcome


def test_clipping_bounds_every_update_and_leaves_small_ones_alone() -> None:
    rng = np.random.default_rng(0)
    for scale in (1e-3, 0.1, 1.0, 10.0, 1e6):
        update = rng.standard_normal(1000) * scale
        clipped = privacy.clip(update, 0.7)
        norm = float(np.linalg.norm(update))
        assert float(np.linalg.norm(clipped)) <= 0.7 * (1 + 1e-12)
        if norm <= 0.7:
            assert clipped is update
        else:
            assert np.allclose(clipped / np.linalg.norm(clipped), update / norm)  # only scaled


def test_the_server_adds_the_noisy_mean_of_clipped_updates_over_the_expected_clients() -> None:
    """Uniform over m = floor(f * N) = 5, not by sample counts; an update far over max_update_norm is clipped,
    not rejected (with dp, clipping replaces the norm screen)."""
    config = small_config(algorithm="fedavg", dp=DP)
    assert privacy.expected_clients(config) == 5
    rng = np.random.default_rng(1)
    size = ServerState.of(ALGORITHMS["fedavg"](config), Tiny()).shared_floats()
    updates = [rng.standard_normal(size) * s for s in (0.01, 3.0, 1e5)]
    reference, after, _, outcome = tiny_round(config, updates)
    assert [r.client for r in outcome.accepted] == [0, 1, 2] and outcome.record.rejected == 0
    expected = reference + (sum(privacy.clip(np.subtract((reference + u).astype(np.float32), reference,
                                                         dtype=np.float64), 0.5) for u in updates) / 5
                            + privacy.noise(config, 0, size))
    assert np.array_equal(after, expected.astype(np.float32).astype(np.float64))
    assert outcome.record.epsilon == privacy.epsilon(config, 1)


def test_the_noise_has_the_stated_standard_deviation() -> None:
    """z * C / m over 10^5 draws, within five standard errors; the mean is zero within five as well."""
    config = small_config(dp={"noise_multiplier": 1.3, "clipping_norm": 2.0})
    sigma = 1.3 * 2.0 / 5
    assert privacy.noise_std(config) == pytest.approx(sigma)
    n = 100_000
    draws = privacy.noise(config, 7, n)
    assert abs(draws.std() - sigma) < 5 * sigma / math.sqrt(2 * n)
    assert abs(draws.mean()) < 5 * sigma / math.sqrt(n)
    assert np.array_equal(draws, privacy.noise(config, 7, n)), "a pure function of (seed, round)"
    assert not np.array_equal(draws, privacy.noise(config, 8, n))


def test_a_round_without_accepted_updates_still_adds_exactly_the_rounds_noise(caplog) -> None:
    config = small_config(algorithm="fedavg", dp=DP)
    with caplog.at_level(logging.WARNING, logger="fedbabu"):
        reference, after, _, outcome = tiny_round(config, [], round_index=3)
    assert not outcome.accepted
    noise = privacy.noise(config, 3, reference.size)
    assert np.array_equal(after, (reference + noise).astype(np.float32).astype(np.float64))
    assert "the round's noise is still added" in caplog.text


# --- the accountant --------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_clients", "fraction", "z", "rounds"), [(10, 0.5, 0.5, 4), (100, 0.1, 1.1, 30)])
def test_epsilon_is_dp_accountings_for_the_same_events(num_clients, fraction, z, rounds) -> None:
    config = small_config(num_clients=num_clients, client_fraction=fraction,
                          dp={"noise_multiplier": z, "clipping_norm": 1.0})
    m = max(1, int(fraction * num_clients))
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(num_clients, m, dp_accounting.GaussianDpEvent(z / 2))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    delta = 1 / num_clients**1.1
    assert config.resolved_delta() == delta
    assert privacy.epsilon(config, rounds) == pytest.approx(accountant.get_epsilon(delta), rel=1e-12)
    assert math.isfinite(privacy.epsilon(config, rounds))
    assert privacy.epsilon(config, 0) == 0.0
    spent = [privacy.epsilon(config, t) for t in range(1, rounds + 1)]
    assert spent == sorted(spent), "epsilon grows with every round"


def test_poisson_sampling_is_accounted_as_dp_accountings_poisson_event() -> None:
    config = small_config(num_clients=100, client_fraction=0.1,
                          dp={"noise_multiplier": 1.1, "clipping_norm": 1.0, "sampling": "poisson"})
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    event = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, 30))
    assert privacy.epsilon(config, 30) == pytest.approx(accountant.get_epsilon(1 / 100**1.1), rel=1e-12)
    fixed = small_config(num_clients=100, client_fraction=0.1, dp={"noise_multiplier": 1.1, "clipping_norm": 1.0})
    assert privacy.epsilon(config, 30) != privacy.epsilon(fixed, 30)


def test_poisson_sampling_takes_each_client_with_probability_m_over_n_from_a_seeded_stream() -> None:
    config = small_config(num_clients=50, client_fraction=0.2,
                          dp={"noise_multiplier": 1.0, "clipping_norm": 1.0, "sampling": "poisson"})
    participating = list(range(50))
    rounds = [privacy.poisson_clients(config, t, participating) for t in range(2000)]
    assert rounds[7] == privacy.poisson_clients(config, 7, participating), "a pure function of (seed, round)"
    assert len({len(r) for r in rounds}) > 5, "the count varies from round to round"
    taken = np.bincount(np.concatenate([np.array(r, dtype=int) for r in rounds]), minlength=50) / 2000
    # each client's inclusion frequency: q = 0.2, standard error sqrt(q(1-q)/2000) = 0.009
    assert np.all(np.abs(taken - 0.2) < 5 * math.sqrt(0.2 * 0.8 / 2000))


def test_adaptive_clipping_spends_exactly_the_budget_of_its_noise_multiplier() -> None:
    config = small_config(num_clients=100, client_fraction=0.2,
                          dp={"noise_multiplier": 1.5, "clipping_norm": 1.0, "adaptive_clipping": True})
    sigma_b = config.clipped_count_stddev()
    assert sigma_b == 20 / 20
    z_update = privacy.update_noise_multiplier(config)
    assert z_update > 1.5
    assert z_update ** -2 + (2 * sigma_b) ** -2 == pytest.approx(1.5 ** -2, rel=1e-12)
    plain = small_config(num_clients=100, client_fraction=0.2, dp={"noise_multiplier": 1.5, "clipping_norm": 1.0})
    assert privacy.epsilon(config, 10) == privacy.epsilon(plain, 10)
    assert privacy.noise_std(config, 2.0) == pytest.approx(z_update * 2.0 / 20)


def next_norm(config, round_index, norm, within):
    return privacy.adapted_norm(config, norm, privacy.noisy_within_share(config, round_index, within))


def test_adaptive_clipping_moves_the_norm_geometrically_toward_the_target_quantile() -> None:
    config = small_config(num_clients=100, client_fraction=0.2,
                          dp={"noise_multiplier": 0.5, "clipping_norm": 1.0, "adaptive_clipping": True,
                              "clipped_count_stddev": 2.0})
    for t in range(5):  # the same round draws the same count noise, so the count's effect is exact
        all_within, none_within = (next_norm(config, t, 1.0, k) for k in (20, 0))
        assert math.log(all_within) - math.log(none_within) == pytest.approx(-0.2 * 20 / 20, rel=1e-12)
        assert next_norm(config, t, 3.0, 7) == pytest.approx(3 * next_norm(config, t, 1.0, 7), rel=1e-12)
    # the noisy count: log(C'/C) = -0.2 * ((10 + noise) / 20 - 0.5), so noise = -log(C'/C) / 0.2 * 20
    noise = np.array([-math.log(next_norm(config, t, 1.0, 10)) / 0.2 * 20 for t in range(4000)])
    assert abs(noise.mean()) < 5 * 2.0 / math.sqrt(4000) and noise.std() == pytest.approx(2.0, rel=0.05)


def test_private_mean_update_counts_the_updates_within_the_norm() -> None:
    config = dp_config()
    reference = np.zeros(4)
    shared = [np.array([0.3, 0, 0, 0]), np.array([0, 2.0, 0, 0]), np.array([0, 0, 0.5, 0])]
    _, within = privacy.private_mean_update(config, 0, shared, reference)
    assert within == 2
    _, within = privacy.private_mean_update(config, 0, shared, reference, clipping_norm=0.4)
    assert within == 1


# --- runs ------------------------------------------------------------------------------------------


def test_noise_multiplier_zero_is_exactly_a_run_without_dp(digits, tmp_path) -> None:
    plain = small_config(rounds=3, eval_every=2, finetune={"epochs": 1})
    off = small_config(rounds=3, eval_every=2, finetune={"epochs": 1},
                       dp={"noise_multiplier": 0, "clipping_norm": 0.01, "target_epsilon": 0.1})
    run_experiment(plain, tmp_path / "plain", dataset=digits)
    run_experiment(off, tmp_path / "off", dataset=digits)
    assert (tmp_path / "plain" / "model.pt").read_bytes() == (tmp_path / "off" / "model.pt").read_bytes()
    for name in ("metrics.jsonl", "clients.csv"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "off" / name).read_bytes(), name
    assert "privacy" not in json.loads((tmp_path / "off" / "summary.json").read_text())
    assert all("epsilon" not in r for r in records(tmp_path / "off"))


@pytest.fixture(scope="module")
def dp_reference(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dp") / "reference"
    run_experiment(dp_config(workers=1), folder, dataset=digits)
    return folder


def test_a_dp_run_writes_epsilon_every_round_and_privacy_in_its_summary(dp_reference) -> None:
    config = dp_config()
    rows = records(dp_reference)
    assert [r["epsilon"] for r in rows] == [privacy.epsilon(config, t) for t in range(1, 5)]
    spent = json.loads((dp_reference / "summary.json").read_text())["privacy"]
    assert spent["epsilon"] == rows[-1]["epsilon"] and math.isfinite(spent["epsilon"])
    assert spent["rounds"] == 4 and spent["stopped_early"] is None and spent["delta"] == 1 / 10**1.1
    assert (spent["noise_multiplier"], spent["clipping_norm"], spent["clients_per_round"]) == (0.5, 0.5, 5)
    assert "SampledWithoutReplacement" not in spent["sampling"] and "without replacement" in spent["sampling"]
    assert "Differential privacy: (ε = " in (dp_reference / "report.md").read_text()


def test_a_dp_run_is_bit_identical_with_two_workers(dp_reference, digits, tmp_path) -> None:
    run_experiment(dp_config(workers=2), tmp_path / "two", dataset=digits)
    assert same_model(dp_reference, tmp_path / "two")
    assert records(dp_reference) == records(tmp_path / "two")


def test_a_resumed_dp_run_is_bit_identical_epsilon_included(dp_reference, digits, tmp_path) -> None:
    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(dp_config(workers=1), interrupted, StopAtRound(2), dataset=digits)
    resume_experiment(interrupted)
    assert same_model(dp_reference, interrupted)
    assert records(dp_reference) == records(interrupted)
    assert (dp_reference / "clients.csv").read_bytes() == (interrupted / "clients.csv").read_bytes()


def test_target_epsilon_stops_the_run_cleanly_before_the_round_that_would_exceed_it(digits, tmp_path, caplog):
    config = dp_config(rounds=6, dp={"target_epsilon": None})
    target = (privacy.epsilon(config, 3) + privacy.epsilon(config, 4)) / 2
    config = dp_config(rounds=6, dp={"target_epsilon": target})
    assert privacy.rounds_to_run(config) == 3
    folder = tmp_path / "stopped"
    with caplog.at_level(logging.WARNING, logger="fedbabu"):
        run_experiment(config, folder, dataset=digits)
    lines = [r.getMessage() for r in caplog.records if "target_epsilon" in r.getMessage()]
    assert len(lines) == 1 and "stopped after 3 of 6 rounds" in lines[0]
    rows = records(folder)
    assert len(rows) == 3 and rows[-1]["epsilon"] <= target and "test_accuracy" in rows[-1]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["privacy"]["rounds"] == 3 and summary["privacy"]["epsilon"] <= target
    assert "stopped after 3 of 6 rounds" in summary["privacy"]["stopped_early"]
    assert "Stopped early" in (folder / "report.md").read_text()
    assert (folder / "clients.csv").exists() and (folder / "model.pt").exists()
    with pytest.raises(UserError, match="already finished all 3 rounds"):
        resume_experiment(folder)


ADAPTIVE = {"adaptive_clipping": True, "clipped_count_stddev": 1.0, "clipping_norm": 0.05, "sampling": "poisson"}


@pytest.fixture(scope="module")
def adaptive_reference(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adaptive") / "reference"
    run_experiment(dp_config(workers=1, dp=ADAPTIVE), folder, dataset=digits)
    return folder


def test_adaptive_clipping_records_each_rounds_norm_and_replays_it_from_the_records(adaptive_reference) -> None:
    config = dp_config(dp=ADAPTIVE)
    rows = records(adaptive_reference)
    norms = [r["clipping_norm"] for r in rows]
    assert norms[0] == 0.05 and len(set(norms)) == 4
    for before, after, row in zip(norms, norms[1:], rows, strict=False):
        assert after == privacy.adapted_norm(config, before, row["within_share"])
    # every update of this run is far above 0.05, so the noisy share sits near 0 and the norm grows
    assert norms == sorted(norms)
    spent = json.loads((adaptive_reference / "summary.json").read_text())["privacy"]
    assert spent["adaptive_clipping"]["final_clipping_norm"] == privacy.clipping_norm_after(config, rows)
    assert spent["epsilon"] == privacy.epsilon(config, 4) and "Poisson" in spent["sampling"]
    final = spent["adaptive_clipping"]["final_clipping_norm"]
    report = (adaptive_reference / "report.md").read_text()
    assert f"Adaptive clipping: the norm moved from 0.05 to {final:.4g}" in report


def test_poisson_rounds_take_the_seeded_poisson_sample(adaptive_reference) -> None:
    config = dp_config(dp=ADAPTIVE)
    rows = records(adaptive_reference)
    assert [r["clients"] for r in rows] == [privacy.poisson_clients(config, t, list(range(10))) for t in range(4)]


def test_adaptive_clipping_is_bit_identical_with_two_workers_and_after_a_resume(adaptive_reference, digits,
                                                                                tmp_path) -> None:
    run_experiment(dp_config(workers=2, dp=ADAPTIVE), tmp_path / "two", dataset=digits)
    assert same_model(adaptive_reference, tmp_path / "two")
    assert records(adaptive_reference) == records(tmp_path / "two")
    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(dp_config(workers=1, dp=ADAPTIVE), interrupted, StopAtRound(2), dataset=digits)
    resume_experiment(interrupted)
    assert same_model(adaptive_reference, interrupted)
    assert records(adaptive_reference) == records(interrupted)


# --- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "message"), [
    ({"dp": {"noise_multiplier": 1.0, "clipping_norm": 0}}, "dp.clipping_norm: expected an L2 norm > 0"),
    ({"dp": {"noise_multiplier": 1.0, "clipping_norm": -1}}, "dp.clipping_norm: expected an L2 norm > 0"),
    ({"dp": {"noise_multiplier": 1.0}}, "needs dp.clipping_norm"),
    ({"dp": DP, "client_failure_rate": 0.1}, "does not model client dropouts"),
    ({"dp": DP, "max_update_norm": 0.1}, "updates are clipped, not screened by norm"),
    ({"dp": {**DP, "delta": 1.0}}, "dp.delta"),
    ({"dp": {"noise_multipler": 1.0}}, "did you mean 'dp.noise_multiplier'"),
    ({"dp": {**DP, "adaptive_clipping": True, "clipped_count_stddev": 0.2}}, "dp.adaptive_clipping: the count noise"),
    ({"dp": {**DP, "sampling": "uniform"}}, "dp.sampling"),
])
def test_settings_without_a_guarantee_are_refused_in_one_line(values, message) -> None:
    with pytest.raises(UserError, match=message) as err:
        build_config({**small_config().to_plain(), **values})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("algorithm", "message"), [
    ("fednh", "server step reads client statistics"),
    ("fedpac", "server step reads client statistics"),
    ("local", "shares no parameters"),
    ("lg_fedavg", "starts from another run's model"),
])
def test_algorithms_whose_server_step_breaks_the_analysis_are_refused(algorithm, message) -> None:
    config = small_config(algorithm=algorithm, dp=DP)
    with pytest.raises(UserError, match=message):
        privacy.check_algorithm(ALGORITHMS[algorithm](config))


def test_an_algorithm_whose_server_collaborates_on_client_reports_is_refused_in_one_line() -> None:
    class Collaborating(ALGORITHMS["fedper"]):
        def collaborate(self, reports):
            return {client: {} for client in reports}

    with pytest.raises(UserError, match=r"^dp: fedper's clients report .* dp\.noise_multiplier") as err:
        privacy.check_algorithm(Collaborating(small_config(algorithm="fedper", dp=DP)))
    assert "\n" not in str(err.value)
    privacy.check_algorithm(ALGORITHMS["fedper"](small_config(algorithm="fedper", dp=DP)))


def test_the_cli_refuses_noise_without_clipping_with_exit_2_and_one_line(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "fedbabu", "run", "--set", "dp.noise_multiplier=1.0",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "needs dp.clipping_norm" in done.stderr
    assert not (tmp_path / "run").exists()


def test_the_comparison_gets_an_epsilon_column_only_when_an_entry_has_dp() -> None:
    row = {"algorithm": "fedavg", "initial_mean": 0.5, "initial_std": 0.1, "personalized_mean": 0.6,
           "personalized_std": 0.1, "initial_seed_std": math.nan, "personalized_seed_std": math.nan, "seeds": 1,
           "bytes_per_round_per_client": 8, "wall_time_s": 1.0, "personalization": "fine-tune",
           "paired_against": "fedavg", "paired_difference": None, "epsilon": None}
    assert " ε |" not in comparison_markdown([row], "t")
    private = {**row, "algorithm": "fedbabu", "epsilon": 3.14159}
    table = comparison_markdown([row, private], "t")
    assert " ε |" in table and "| no DP |" in table and "| 3.14 |" in table
