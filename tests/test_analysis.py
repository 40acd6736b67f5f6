"""`fedbabu analyze`: each measure against a case computed by hand, then whole runs on real digits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import fingerprint, small_config

import fedbabu
from fedbabu.cli import main
from fedbabu.results import representation as rep
from fedbabu.runner import run_experiment

# ---- the measures, on cases whose answer is known -------------------------------------------------


def test_nearest_mean_is_perfect_on_separable_features_and_blind_to_classes_it_never_saw():
    rng = np.random.default_rng(0)
    centres = np.eye(4) * 10
    train_y = np.repeat(np.arange(4), 25)
    test_y = np.repeat(np.arange(4), 10)
    train = centres[train_y] + rng.normal(scale=0.5, size=(100, 4))
    test = centres[test_y] + rng.normal(scale=0.5, size=(40, 4))
    for metric in rep.METRICS:
        assert rep.nearest_mean_accuracy(train, train_y, test, test_y, metric) == 1.0
    seen = train_y < 2
    assert rep.nearest_mean_accuracy(train[seen], train_y[seen], test, test_y) == 0.5
    assert np.isnan(rep.nearest_mean_accuracy(train, train_y, test[:0], test_y[:0]))


def test_euclidean_and_cosine_nearest_means_differ_where_norms_mislead():
    train = np.array([[1.0, 0.0], [10.0, 1.0]])
    labels = np.array([0, 1])
    test = np.array([[9.0, 0.0]])  # near class 1 in distance, along class 0 in direction
    assert rep.nearest_mean_accuracy(train, labels, test, np.array([1]), "euclidean") == 1.0
    assert rep.nearest_mean_accuracy(train, labels, test, np.array([0]), "cosine") == 1.0


def test_linear_cka_identity_invariances_and_independence():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 20))
    assert rep.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    rotation, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    assert rep.linear_cka(x, x @ rotation) == pytest.approx(1.0, abs=1e-10)
    assert rep.linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=1e-12)
    assert rep.linear_cka(3.0 * x @ rotation, x) == pytest.approx(1.0, abs=1e-10)
    assert rep.linear_cka(x, rng.normal(size=(500, 20))) < 0.1
    with pytest.raises(ValueError, match="same inputs"):
        rep.linear_cka(x, x[:10])


def test_effective_rank_of_identity_and_rank_one():
    assert rep.effective_rank(np.linalg.svd(np.eye(16), compute_uv=False)) == pytest.approx(16.0)
    v = np.arange(1.0, 9.0)
    assert rep.effective_rank(np.linalg.svd(np.outer(v, v), compute_uv=False)) == pytest.approx(1.0, abs=1e-6)
    features = np.random.default_rng(2).normal(size=(300, 8)) @ np.diag([1, 1, 1, 0, 0, 0, 0, 0])
    assert rep.effective_rank(rep.singular_values(features)) == pytest.approx(3.0, rel=0.1)
    assert rep.numerical_rank(np.linalg.svd(np.eye(16), compute_uv=False)) == 16
    assert rep.numerical_rank(np.linalg.svd(np.outer(v, v), compute_uv=False)) == 1
    assert rep.numerical_rank(rep.singular_values(features)) == 3, "the five dead feature columns are not in use"


def test_cosine_matrix_and_geometry_of_an_orthogonal_head():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(32, 10)))
    head = 2.0 * q.T  # 10 classes, orthogonal rows of equal norm
    np.testing.assert_allclose(rep.cosine_matrix(head), np.eye(10), atol=1e-12)
    geometry = rep.head_geometry(head)
    assert geometry["norm_cv"] == pytest.approx(0.0, abs=1e-12)
    assert geometry["mean_abs_cosine"] == pytest.approx(0.0, abs=1e-12)
    skewed = head.copy()
    skewed[0] *= 5
    skewed[1] = skewed[2]
    assert rep.head_geometry(skewed)["norm_cv"] > 0.5
    assert rep.head_geometry(skewed)["max_cosine"] == pytest.approx(1.0)


def test_linear_probe_reaches_100_percent_on_separable_features():
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 40)
    x = np.eye(3)[y] * 5 + rng.normal(scale=0.3, size=(120, 3))
    result = rep.linear_probe(x[::2], y[::2], x[1::2], y[1::2], seed=0)
    assert result["train_accuracy"] == 1.0 and result["test_accuracy"] == 1.0 and result["converged"]


def test_label_entropy_and_correlation():
    assert rep.label_entropy(np.array([3, 3, 3]), 10) == 0.0
    assert rep.label_entropy(np.array([0, 1, 2, 3]), 10) == pytest.approx(2.0)
    assert rep.correlation(np.arange(5), 2 * np.arange(5) + 1) == pytest.approx(1.0)
    assert np.isnan(rep.correlation(np.ones(5), np.arange(5)))


# ---- whole runs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """FedAvg (full fine-tuning) and FedBABU fine-tuning only its head, on one partition and 2 workers."""
    root = tmp_path_factory.mktemp("analyzed")
    folders = {}
    for name, overrides in (("fedavg", {"algorithm": "fedavg"}),
                            ("head-only", {"algorithm": "fedbabu", "finetune": {"part": "head"}})):
        folders[name] = root / name
        run_experiment(small_config(workers=2, **overrides), folders[name])
    return folders


@pytest.fixture(scope="module")
def analyzed(runs, tmp_path_factory) -> Path:
    """The two runs analyzed together from the command line, on two workers; the run folders checked intact."""
    before = {name: fingerprint(folder) for name, folder in runs.items()}
    out = tmp_path_factory.mktemp("analysis") / "all"
    assert main(["analyze", *(str(folder) for folder in runs.values()), "--out", str(out), "--quiet",
                 "--probe-size", "200", "--workers", "2"]) == 0
    assert {name: fingerprint(folder) for name, folder in runs.items()} == before
    return out


def _analysis(folder: Path) -> dict:
    return json.loads((folder / "analysis.json").read_text())


def test_analyze_compares_runs_and_rederives_their_personalization(runs, analyzed):
    assert (analyzed / "comparison.md").is_file() and (analyzed / "comparison.csv").is_file()
    for name in runs:
        analysis = _analysis(analyzed / name)
        assert analysis["reproduces_run"] == {"checked": True, "identical_clients": 10, "clients": 10}
        saved = json.loads((runs[name] / "summary.json").read_text())
        assert analysis["personalized_accuracy"] == saved["personalized_accuracy"]
        assert analysis["settings"]["probe_size"] == 200 and len(analysis["per_client"]) == 10
        assert {p.name for p in (analyzed / name).iterdir()} >= {
            "analysis.json", "analysis.md", "clients.csv", "head_cosine.png", "cka.png", "gain.png", "spectrum.png"}
    table = (analyzed / "comparison.md").read_text()
    assert "| fedavg | fedavg |" in table and "| head-only | fedbabu |" in table


def test_fedbabus_global_head_is_its_initial_head(analyzed):
    """The analysis reads the trained model: FedBABU's head geometry is that of the seeded initial head."""
    from fedbabu.data.datasets import load_digits
    from fedbabu.engine.simulation import config_model

    initial = config_model(small_config(), load_digits()).head.weight.detach().numpy()
    np.testing.assert_array_equal(_analysis(analyzed / "head-only")["head"]["global"]["cosine"],
                                  rep.cosine_matrix(initial))
    assert not np.array_equal(_analysis(analyzed / "fedavg")["head"]["global"]["cosine"], rep.cosine_matrix(initial))


def test_head_only_fine_tuning_leaves_the_body_where_it_was(analyzed):
    for row in _analysis(analyzed / "head-only")["per_client"]:
        assert row["body_change"] == 0.0 and row["head_change"] > 0
        assert row["cka_global_personalized"] == pytest.approx(1.0, abs=1e-9)
        assert row["nearest_mean_personalized_euclidean"] == row["nearest_mean_global_euclidean"]
    assert all(row["body_change"] > 0 for row in _analysis(analyzed / "fedavg")["per_client"])


def test_one_worker_gives_the_analysis_of_two_in_the_runs_own_folder(runs, analyzed, tmp_path, capsys):
    run = tmp_path / "fedavg"
    shutil.copytree(runs["fedavg"], run)
    result = fedbabu.analyze(run, workers=1, progress=False, probe_size=200)
    assert result.folder == run / "analysis"
    assert (run / "analysis" / "clients.csv").read_bytes() == (analyzed / "fedavg" / "clients.csv").read_bytes()

    def same(analysis: dict) -> str:
        return json.dumps({k: v for k, v in analysis.items() if k not in ("wall_time_s", "run")})

    assert same(result.runs[0]) == same(_analysis(analyzed / "fedavg"))
    assert main(["analyze", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out ") and "--overwrite" in err and len(err.splitlines()) == 1


def test_an_old_protocol_run_is_checked_against_its_personalization_again(runs, tmp_path):
    """A run personalized under the old protocol, then again with its own settings, as docs/trained-runs keeps them."""
    run = tmp_path / "old"
    shutil.copytree(runs["head-only"], run)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "personalization_protocol": 1}))
    (run / "clients.csv").write_text((run / "clients.csv").read_text().replace("0.", "0.9", 1))
    fedbabu.personalize(run, progress=False, workers=1)
    check = fedbabu.analyze(run, progress=False, workers=1, probe_size=50).runs[0]["reproduces_run"]
    assert check == {"checked": True, "identical_clients": 10, "clients": 10,
                     "reference": str(run / "personalize" / "head-2ep-lr0.01-mom0.9-wd0-bs10")}


@pytest.mark.parametrize("width", [80, 60])
def test_the_terminal_table_keeps_every_run_name_whole(analyzed, width):
    import io

    from rich.console import Console

    from fedbabu.cli import _print_analysis

    analyses = [_analysis(analyzed / name) for name in ("fedavg", "head-only")]
    for analysis in analyses:
        analysis["label"] = f"cifar10-s10-tau10-{analysis['label']}-seed-0"
    buffer = io.StringIO()
    _print_analysis(Console(file=buffer, width=width), analyses)
    text = buffer.getvalue()
    assert all(len(line) <= width for line in text.splitlines())
    for analysis in analyses:
        assert analysis["label"] in text
    assert "…" not in text and "CKA between clients" in text


@pytest.mark.parametrize("case", ["missing", "not-a-run", "unfinished", "data-absent", "twice", "probe"])
def test_bad_folders_get_one_line_and_exit_2(runs, tmp_path, capsys, case):
    run = tmp_path / "run"
    shutil.copytree(runs["head-only"], run)
    args = [str(run)]
    if case == "missing":
        args = [str(tmp_path / "nowhere")]
    elif case == "not-a-run":
        (run / "config.yaml").unlink()
    elif case == "unfinished":
        (run / "model.pt").unlink()
    elif case == "data-absent":
        config = yaml.safe_load((run / "config.yaml").read_text())
        config.update(dataset="cifar10", model="4convnet", data_dir=str(tmp_path / "empty"), download=False)
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    elif case == "twice":
        args = [str(run), str(run)]
    elif case == "probe":
        args = [str(run), "--probe-size", "3"]
    before = fingerprint(run) if run.exists() else {}
    assert main(["analyze", *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert (fingerprint(run) if run.exists() else {}) == before


@pytest.mark.parametrize("algorithm", ["fedrod", "feduh"])
def test_heads_of_their_own_are_analyzed_through_their_class_vectors(algorithm, tmp_path):
    """FedRoD's global head is its trained generic head (the personal heads stay with the clients);
    FedUH's is its fixed prototypes. The run's own evaluation is re-derived and checked as for any run."""
    from fedbabu.files import load_tensors

    folder = tmp_path / algorithm
    run_experiment(small_config(algorithm=algorithm, rounds=2), folder)
    analysis = fedbabu.analyze(folder, out=tmp_path / "analysis", workers=1, probe_size=100, progress=False).runs[0]
    assert analysis["reproduces_run"] == {"checked": True, "identical_clients": 10, "clients": 10}
    state = load_tensors(folder / "model.pt")
    weight = state["head.generic.weight" if algorithm == "fedrod" else "head.prototypes"].numpy()
    np.testing.assert_allclose(analysis["head"]["global"]["cosine"], rep.cosine_matrix(weight), atol=1e-12)
    assert len(analysis["per_client"]) == 10
