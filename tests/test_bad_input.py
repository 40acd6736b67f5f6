"""Every way the input can be wrong gets exit code 2 and one line naming the culprit, and damages nothing.

Each case runs the real command line in a subprocess, inside a workspace holding good and bad
configs, data folders and checkpoints; after each case every file of the workspace must be
byte-for-byte what it was, and no new file may have appeared.
"""

import fcntl
import gzip
import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FMNIST_DIR, small_config

from fedbabu.cli import main
from fedbabu.engine.checkpoint import Checkpoint, capture_rng, encode

FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz")


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch exploited",))


def _write_run(folder: Path, config) -> None:
    """A run folder at its initial checkpoint (what `fedbabu run` leaves before round 1)."""
    from fedbabu.config import dump_config

    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_config(config))
    (folder / "metrics.jsonl").write_text("")
    vector = torch.zeros(4)  # never reached: the config check comes first
    (folder / "checkpoint.pt").write_bytes(encode(Checkpoint(config, 0, vector, {}, [], capture_rng())))


def _damaged_fmnist_copies(ws: Path, fmnist_dir: Path) -> None:
    """A Fashion-MNIST folder with a file cut in half, and one whose labels lack 100 samples."""
    truncated = ws / "fmnist-truncated" / "fashion-mnist"
    truncated.mkdir(parents=True)
    for name in FMNIST_FILES:
        (truncated / name).symlink_to(fmnist_dir / name)
    (truncated / FMNIST_FILES[1]).unlink()
    raw = (fmnist_dir / FMNIST_FILES[1]).read_bytes()
    (truncated / FMNIST_FILES[1]).write_bytes(raw[: len(raw) // 2])
    short = ws / "fmnist-short" / "fashion-mnist"
    short.mkdir(parents=True)
    for name in FMNIST_FILES:
        (short / name).symlink_to(fmnist_dir / name)
    (short / FMNIST_FILES[3]).unlink()
    (short / FMNIST_FILES[3]).write_bytes(gzip.compress(gzip.decompress((fmnist_dir / FMNIST_FILES[3])
                                                                        .read_bytes())[:-100]))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("bad-input")
    (ws / "good.yaml").write_text("dataset: digits\nrounds: 2\n")
    (ws / "typo.yaml").write_text("dataset: digits\nrouns: 2\n")
    (ws / "syntax.yaml").write_text("dataset: digits\nrounds: [2\n")
    (ws / "tabs.yaml").write_text("dataset: digits\n\trounds: 2\n")
    (ws / "list.yaml").write_text("- dataset\n- digits\n")
    (ws / "a-file").write_text("not a folder\n")

    if (FMNIST_DIR / FMNIST_FILES[0]).exists():
        _damaged_fmnist_copies(ws, FMNIST_DIR)

    (ws / "cifar-archive").mkdir()
    (ws / "cifar-archive" / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b" + b"\0" * 4000)
    for folder, content in (("cifar-list", pickle.dumps(["not", "cifar"])),
                            ("cifar-exploit", pickle.dumps({b"data": _Exploit()})),
                            ("cifar-cut", pickle.dumps({b"data": b"x" * 5000, b"labels": [1] * 50})[:2000])):
        batches = ws / folder / "cifar-10-batches-py"
        batches.mkdir(parents=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            (batches / name).write_bytes(content)

    config = small_config(rounds=2, workers="auto")
    _write_run(ws / "run", config)
    for name in ("run-truncated", "run-foreign", "run-exploit"):
        _write_run(ws / name, config)
    checkpoint = ws / "run-truncated" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:3000])
    torch.save({"model": torch.zeros(3)}, ws / "run-foreign" / "checkpoint.pt")
    (ws / "run-exploit" / "checkpoint.pt").write_bytes(pickle.dumps(_Exploit()))
    (ws / "not-a-run").mkdir()
    (ws / "not-a-run" / "notes.txt").write_text("mine\n")
    return ws


# (case, command line, fragments the one-line message must contain)
CASES = [
    ("unknown key", ["run", "--set", "rouns=3"], ["unknown key 'rouns'", "did you mean 'rounds'"]),
    ("unknown nested key", ["run", "--set", "finetune.epoch=3"],
     ["unknown key 'finetune.epoch'", "did you mean 'finetune.epochs'"]),
    ("unknown key in a file", ["run", "--config", "typo.yaml"], ["typo.yaml", "'rouns'", "did you mean 'rounds'"]),
    ("wrong type", ["run", "--set", "rounds=many"], ["rounds", "valid integer", "'many'"]),
    ("wrong type of section", ["run", "--set", "finetune=3"], ["finetune", "FinetuneConfig"]),
    ("fraction zero", ["run", "--set", "client_fraction=0"], ["client_fraction", "greater than 0"]),
    ("fraction above one", ["run", "--set", "client_fraction=1.5"], ["client_fraction", "less than or equal to 1"]),
    ("negative epochs", ["run", "--set", "local_epochs=-1"], ["local_epochs", "greater than or equal to 1"]),
    ("negative fine-tuning epochs", ["run", "--set", "finetune.epochs=-2"], ["finetune.epochs", "greater than"]),
    ("zero lr", ["run", "--set", "lr=0"], ["lr", "greater than 0"]),
    ("negative lr", ["run", "--set", "lr=-0.1"], ["lr", "greater than 0"]),
    ("failure rate of one", ["run", "--set", "client_failure_rate=1"], ["client_failure_rate", "less than 1"]),
    ("zero norm bound", ["run", "--set", "max_update_norm=0"], ["max_update_norm", "greater than 0"]),
    ("negative checkpoint interval", ["run", "--set", "checkpoint_every=-1"], ["checkpoint_every", "greater"]),
    ("unknown algorithm", ["run", "--set", "algorithm=fedbabo"], ["algorithm", "unknown algorithm 'fedbabo'",
                                                                  "fedavg"]),
    ("unknown model", ["run", "--set", "model=vgg"], ["model", "'auto'", "'4convnet'", "'vgg'"]),
    ("unknown dataset", ["run", "--set", "dataset=mnist"], ["dataset", "'cifar10'", "'mnist'"]),
    ("unknown partition", ["run", "--set", "partition=pathological"], ["partition", "'shards'"]),
    ("impossible shards", ["run", "--set", "num_clients=3", "--set", "shards_per_client=1"],
     ["shards_per_client", "3 shards cannot be split evenly over 10 classes"]),
    ("more clients than samples", ["run", "--set", "partition=iid", "--set", "num_clients=5000"],
     ["num_clients", "5000 clients but only"]),
    ("algorithm refuses a setting", ["run", "--set", "head_init=zeros"], ["head_init", "zero head"]),
    ("overwrite with a setting the algorithm refuses",
     ["run", "--out", "run", "--overwrite", "--set", "head_init=zeros"],
     ["head_init", "zero head"]),
    ("overwrite with missing data", ["run", "--out", "run", "--overwrite", "--set", "dataset=fmnist", "--data-dir",
                                     "no/such/dir"], ["data_dir", "no/such/dir", "does not exist"]),
    ("compare with missing data", ["compare", "--algorithms", "fedavg,fedbabu", "--out", "new-comparison", "--set",
                                   "dataset=fmnist", "--data-dir", "no/such/dir"], ["data_dir", "does not exist"]),
    ("vectorized executor for an algorithm with its own update",
     ["run", "--set", "algorithm=ditto", "--set", "executor=vectorized"],
     ["executor: vectorized runs plain SGD client updates only",
      "ditto with this config trains its clients otherwise"]),
    ("missing data dir", ["run", "--set", "dataset=fmnist", "--data-dir", "no/such/dir"],
     ["data_dir", "no/such/dir", "does not exist"]),
    ("truncated dataset file", ["run", "--set", "dataset=fmnist", "--data-dir", "fmnist-truncated"],
     ["train-labels-idx1-ubyte.gz", "not a readable gzip file"]),
    ("dataset file missing samples", ["run", "--set", "dataset=fmnist", "--data-dir", "fmnist-short"],
     ["t10k-labels-idx1-ubyte.gz", "truncated IDX file"]),
    ("md5-mismatched archive", ["run", "--set", "dataset=cifar10", "--data-dir", "cifar-archive"],
     ["cifar-10-python.tar.gz", "md5 mismatch", "c58f30108f718f92721af3b95e74349a"]),
    ("a pickle that is not CIFAR", ["run", "--set", "dataset=cifar10", "--data-dir", "cifar-list"],
     ["data_batch_1", "not a CIFAR batch (expected a dict"]),
    ("a malicious pickle", ["run", "--set", "dataset=cifar10", "--data-dir", "cifar-exploit"],
     ["data_batch_1", "references posix.system, which CIFAR files never do"]),
    ("truncated CIFAR batch", ["run", "--set", "dataset=cifar10", "--data-dir", "cifar-cut"],
     ["data_batch_1", "not a readable CIFAR pickle"]),
    ("truncated checkpoint", ["resume", "run-truncated"], ["run-truncated/checkpoint.pt", "not a readable checkpoint"]),
    ("foreign checkpoint", ["resume", "run-foreign"], ["run-foreign/checkpoint.pt", "not a fedbabu checkpoint"]),
    ("checkpoint with code in it", ["resume", "run-exploit"], ["run-exploit/checkpoint.pt", "not a readable"]),
    ("resume with another config", ["run", "--resume", "run", "--set", "lr=0.5"],
     ["--resume run", "different config (lr is 0.05 there, 0.5 here)"]),
    ("resume with another seed", ["run", "--resume", "run", "--seed", "7"], ["--resume run", "seed is 0 there"]),
    ("resume a folder without a run", ["resume", "not-a-run"], ["not-a-run", "no checkpoint.pt to resume from"]),
    ("resume a missing folder", ["resume", "gone"], ["gone", "no such run folder"]),
    ("resume and overwrite", ["run", "--resume", "run", "--overwrite"], ["--resume and --overwrite contradict"]),
    ("non-empty output folder", ["run", "--out", "not-a-run"], ["--out not-a-run", "not empty; pass --overwrite"]),
    ("output under a file", ["run", "--out", "a-file/run"], ["--out a-file/run", "cannot write there"]),
    ("output is a file", ["run", "--out", "a-file"], ["--out a-file", "exists and is not a folder"]),
    ("report of a folder without a run", ["report", "not-a-run"], ["not-a-run", "not a run folder"]),
    ("YAML syntax error", ["run", "--config", "syntax.yaml"], ["syntax.yaml", "YAML syntax error at line 3"]),
    ("YAML with a tab", ["run", "--config", "tabs.yaml"], ["tabs.yaml", "YAML syntax error at line 2"]),
    ("YAML that is a list", ["run", "--config", "list.yaml"], ["list.yaml", "expected a mapping", "got list"]),
    ("missing config file", ["run", "--config", "nope.yaml"], ["nope.yaml", "config file not found"]),
    ("override without =", ["run", "--set", "rounds"], ["--set 'rounds'", "expected key=value"]),
    ("bad --workers", ["run", "--workers", "many"], ["--workers", "expected 'auto' or an integer"]),
    ("unknown option", ["run", "--round", "3"], ["unrecognized arguments: --round 3", "(see fedbabu run --help)"]),
    ("unknown option of a subcommand", ["flower", "sim", "--zz"], ["--zz", "(see fedbabu flower sim --help)"]),
    ("reproduce a cell outside the grid", ["reproduce", "cifar10-4convnet-offline", "--only", "tau=1"],
     ["--only 'tau=1'", "not a grid key", "(grid keys: shards_per_client, local_epochs; or algorithm)"]),
    ("reproduce a value outside the grid", ["reproduce", "cifar10-4convnet-offline", "--only", "local_epochs=4"],
     ["--only 'local_epochs=4'", "local_epochs takes one of 1, 10"]),
    ("reproduce an algorithm not in the preset", ["reproduce", "cifar10-4convnet-offline", "--only", "algorithm=ditto"],
     ["--only 'algorithm=ditto'", "algorithm takes one of fedavg, fedbabu"]),
    ("reproduce with a bad value", ["reproduce", "cifar10-4convnet-offline", "--set", "rounds=x", "--out", "grid"],
     ["preset cifar10-4convnet-offline [shards_per_client=2,local_epochs=1]: rounds"]),
    ("Per-FedAvg's Hessian-free variant in bf16",
     ["run", "--set", "algorithm=perfedavg", "--set", "perfedavg.variant=hf", "--set", "precision=bf16"],
     ["perfedavg.variant: hf cannot run with precision bf16"]),
    ("LG-FedAvg from a missing run", ["run", "--set", "algorithm=lg_fedavg", "--set", "lg_fedavg.warm_start=gone"],
     ["lg_fedavg.warm_start: gone is not a run folder"]),
    ("LG-FedAvg from an unfinished run", ["run", "--set", "algorithm=lg_fedavg", "--set", "lg_fedavg.warm_start=run"],
     ["lg_fedavg.warm_start: run is not a finished run (no summary.json)"]),
    ("compare with LG-FedAvg from an unfinished run",
     ["compare", "--algorithms", "fedavg,lg_fedavg:warm_start=run", "--out", "new-comparison"],
     ["lg_fedavg.warm_start: run is not a finished run"]),
    ("a misspelt algorithm setting", ["run", "--set", "fedprox.muu=0.1"],
     ["unknown key 'fedprox.muu'; did you mean 'fedprox.mu'?"]),
    ("a bad algorithm setting", ["run", "--set", "ditto.lambda=-1"],
     ["ditto.lambda: Input should be greater than or equal to 0 (got -1)"]),
    ("an algorithm section that is not a mapping", ["run", "--set", "fedprox=1"],
     ["fedprox: expected a mapping of fedprox's settings (mu), got 1"]),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file's hash and every folder: a refused command may neither change a file nor leave a folder."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


def test_there_are_at_least_25_distinct_cases():
    assert len({tuple(args) for _, args, _ in CASES}) == len(CASES) >= 25


def _check(message: str, code: int, fragments: list[str]) -> None:
    assert code == 2, message
    assert message.startswith("error: ") and message.count("\n") == 1, message
    assert "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(("args", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line(workspace, args, fragments, monkeypatch, capsys, request):
    """The CLI's entry point in-process (each case in a subprocess would cost minutes of interpreter starts)."""
    if any(arg.startswith("fmnist-") for arg in args):
        request.getfixturevalue("fmnist_dir")  # the damaged copies need the real files (skips only off CI)
    monkeypatch.chdir(workspace)
    before = _snapshot(workspace)
    try:
        code = main([*args, "--quiet"] if args[0] != "report" else args)
    except SystemExit as stop:  # argparse's own exit
        code = stop.code
    _check(capsys.readouterr().err, code, fragments)
    assert _snapshot(workspace) == before
    assert not (workspace / "exploited").exists()


@pytest.mark.parametrize("name", ["unknown key", "truncated checkpoint", "output under a file"])
def test_the_installed_command_behaves_the_same(workspace, name):
    """A few cases through ``python -m fedbabu`` itself: same exit code, same single line."""
    args, fragments = next(c[1:] for c in CASES if c[0] == name)
    before = _snapshot(workspace)
    done = subprocess.run([sys.executable, "-m", "fedbabu", *args, "--quiet"], cwd=workspace, capture_output=True,
                          text=True, timeout=300)
    _check(done.stderr, done.returncode, fragments)
    assert _snapshot(workspace) == before


def test_a_run_folder_in_use_is_refused(workspace, monkeypatch, capsys):
    """A second writer (resume, or --overwrite) while a run still holds its folder gets one line."""
    monkeypatch.chdir(workspace)
    before = _snapshot(workspace)
    held = os.open(workspace / "run", os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = main(["resume", "run", "--quiet"])
    finally:
        os.close(held)
    _check(capsys.readouterr().err, code, ["run: another fedbabu process is writing this run folder"])
    assert _snapshot(workspace) == before


@pytest.mark.parametrize("command", [["run"], ["run", "--out", "new-run"]])
def test_cuda_without_a_cuda_device(workspace, command, monkeypatch, capsys):
    """``--device cuda`` where torch sees no GPU: one line naming ``device`` and the way out, no run folder.

    The GPU is hidden on purpose, so that the case holds on a GPU machine too; not even an empty
    folder may be left (the workspace snapshot sees files only).
    """
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = _snapshot(workspace)
    code = main([*command, "--device", "cuda", "--quiet"])
    _check(capsys.readouterr().err, code, ["device: cuda requested but torch sees no CUDA device",
                                           "this torch build: ", "use device=cpu or auto"])
    assert _snapshot(workspace) == before
    assert not (workspace / "runs").exists() and not (workspace / "new-run").exists()
