"""The Python API: users' own data and networks, the examples, and clear errors for bad arguments."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

import fedbabu
from fedbabu.config import load_config
from fedbabu.engine.checkpoint import TIMING_KEYS
from fedbabu.models.custom import model_factory

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def tiny(**extra):
    """A digits federation that trains in about a second, in-process unless ``workers`` is given."""
    values = {"num_clients": 10, "rounds": 3, "eval_every": 3, "workers": 1, "finetune": {"epochs": 2}}
    return load_config(extra={**values, **extra})


class OddHead(nn.Module):
    """A network whose classifier has a non-standard, nested name: ``decision.scores``."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
        self.decision = nn.ModuleDict({"scores": nn.Linear(8 * 64, 10)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decision["scores"](self.trunk(x))


class SoftmaxAfterHead(OddHead):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(super().forward(x), dim=1)


class TupleOut(OddHead):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(x), x


class CountingBuffer(OddHead):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen += 1
        return super().forward(x)


@pytest.fixture(scope="module")
def digit_arrays():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.round(bunch.images * (255 / 16)).astype(np.uint8), bunch.target


@pytest.fixture(scope="module")
def digit_data(digit_arrays):
    return fedbabu.from_arrays(*digit_arrays)


def _initial(seed: int = 0) -> OddHead:
    torch.manual_seed(seed)
    return OddHead()


# --- examples --------------------------------------------------------------------------------------


def _example(name: str, out: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(EXAMPLES / name), "--rounds", "3", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, cwd=out.parent, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_example_own_model(tmp_path):
    out = tmp_path / "run"
    stdout = _example("own_model.py", out)
    assert "head unchanged by federated training: True" in stdout
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["dataset"], config["model"], config["algorithm"]) == ("custom", "custom", "fedbabu")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["personalized_accuracy"]["mean"] > 0.5


def test_example_natural_partition(tmp_path):
    out = tmp_path / "run"
    stdout = _example("natural_partition.py", out)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["partition"], config["num_clients"]) == ("natural", 12)
    assert stdout.count("writer-") == 12
    partition = json.loads((out / "partition.json").read_text())
    assert partition["kind"] == "natural" and len(partition["clients"]) == 12


def test_example_compare_image_folder(tmp_path):
    out = tmp_path / "cmp"
    stdout = _example("compare_image_folder.py", out)
    assert "1797 images of 10 classes" in stdout
    with open(out / "comparison.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["algorithm"] for r in rows] == ["fedavg", "fedbabu"]
    assert all(0.1 < float(r["personalized_mean"]) <= 1 for r in rows)
    assert (out / "fedbabu" / "summary.json").exists() and (out / "comparison.md").exists()


# --- your own network ---------------------------------------------------------------------------------


def test_custom_head_trains_and_stays_frozen_under_fedbabu(tmp_path, digit_data):
    results = fedbabu.run(tiny(), data=digit_data, model=OddHead, head="decision.scores", out=tmp_path / "b",
                          progress=False)
    start = fedbabu.split_body_head(_initial(), head="decision.scores")
    assert torch.equal(results.model.head.weight, start.head.weight)
    assert torch.equal(results.model.head.bias, start.head.bias)
    assert not torch.equal(results.model.body.trunk[0].weight, start.body.trunk[0].weight)
    assert results.personalized_accuracy > 0.5
    assert [m["round"] for m in results.metrics] == [1, 2, 3]
    assert len(results.clients) == 10 and len(results.clients[0]["accuracies"]) == 3
    saved = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert torch.equal(saved["head.weight"], start.head.weight)
    trained = fedbabu.join_body_head(results.model)
    assert isinstance(trained, OddHead)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(trained.eval()(x), results.model.eval()(x))


def test_same_network_under_fedavg_does_train_its_head(tmp_path, digit_data):
    results = fedbabu.run(tiny(algorithm="fedavg"), data=digit_data, model=OddHead, head="decision.scores",
                          out=tmp_path / "a", progress=False)
    assert not torch.equal(results.model.head.weight, _initial().decision["scores"].weight)


def test_custom_model_results_do_not_depend_on_forked_workers(tmp_path, digit_data):
    """The factory reaches forked workers by inheritance (a local function cannot be pickled) and changes nothing."""

    def build() -> OddHead:
        return OddHead()

    one = fedbabu.run(tiny(workers=1), data=digit_data, model=build, head="decision.scores", out=tmp_path / "1",
                      progress=False)
    two = fedbabu.run(tiny(workers=2), data=digit_data, model=build, head="decision.scores", out=tmp_path / "2",
                      progress=False)
    assert (tmp_path / "1" / "clients.csv").read_bytes() == (tmp_path / "2" / "clients.csv").read_bytes()
    for (name, a), (_, b) in zip(one.model.state_dict().items(), two.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_initial_weights_follow_the_seed_and_leave_torch_rng_alone(digit_data):
    factory = model_factory(OddHead, "decision.scores")
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = factory(tiny(seed=0), digit_data.dataset)
    b = factory(tiny(seed=0), digit_data.dataset)
    c = factory(tiny(seed=1), digit_data.dataset)
    assert torch.equal(torch.rand(3), before)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.head.weight, c.head.weight)


class Recorder(fedbabu.Observer):
    def __init__(self) -> None:
        self.rounds: list[int] = []

    def on_round(self, record: dict) -> None:
        self.rounds.append(record["round"])


def test_head_init_applies_to_a_users_head_without_bias(digit_data):
    net = fedbabu.split_body_head(body=nn.Flatten(), head=nn.Linear(64, 10, bias=False))
    built = model_factory(net, None)(tiny(head_init="orthogonal"), digit_data.dataset)
    weight = built.head.weight.detach()
    assert torch.allclose(weight @ weight.T, torch.eye(10), atol=1e-5)
    assert not torch.allclose(net.head.weight @ net.head.weight.T, torch.eye(10), atol=1e-2)


def test_a_module_instance_keeps_its_weights(tmp_path, digit_data):
    pretrained = _initial(seed=42)
    recorder = Recorder()
    results = fedbabu.run(tiny(rounds=2), data=digit_data, model=pretrained, head="decision.scores",
                          out=tmp_path / "p", progress=recorder)
    assert recorder.rounds == [1, 2]
    assert torch.equal(results.model.head.weight, pretrained.decision["scores"].weight)
    assert pretrained.trunk[1].track_running_stats, "the user's module must not be modified"


def test_split_keeps_batch_statistics_like_the_builtin_models():
    net = fedbabu.split_body_head(_initial(), head="decision.scores")
    assert list(net.buffers()) == []
    assert not net.body.trunk[1].track_running_stats
    kept = fedbabu.split_body_head(_initial(), head="decision.scores", drop_running_stats=False)
    assert len(list(kept.buffers())) == 3


def test_running_statistics_are_refused_before_anything_is_written(tmp_path, digit_data):
    """A worker reloads only parameters between clients: kept running statistics would flow from client
    to client, so a network that keeps them is refused with one line naming the buffer."""
    kept = fedbabu.split_body_head(_initial(), head="decision.scores", drop_running_stats=False)
    with pytest.raises(fedbabu.UserError, match=r"^model: buffer 'body.trunk.1.running_mean' changes during"):
        fedbabu.run(tiny(rounds=1), data=digit_data, model=kept, out=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_body_and_head_modules_with_the_default_progress_display(tmp_path, digit_data, capsys):
    body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
    net = fedbabu.split_body_head(body=body, head=nn.Linear(32, 10))
    results = fedbabu.run(tiny(), data=digit_data, model=net, out=tmp_path / "m")
    assert torch.equal(results.model.head.weight, net.head.weight)
    assert results.personalized_accuracy > 0.5
    shown = capsys.readouterr().out
    lines = shown.splitlines()
    assert len(lines) == 3 and lines[0].startswith("fedbabu: partition shards: 10 clients")
    assert lines[1].startswith("fedbabu round 3/3: lr 0.0005, loss ")
    assert lines[1].endswith(f", accuracy {100 * results.metrics[-1]['test_accuracy']:.1f}%")
    assert lines[2] == "fedbabu: personalized 10 clients"


def test_feature_vectors_with_an_mlp(tmp_path, digit_arrays):
    images, labels = digit_arrays
    features = images.reshape(len(images), -1).astype(np.float32) / 255.0
    data = fedbabu.from_arrays(features, labels)
    assert data.dataset.train_x.dtype == torch.float32 and data.dataset.train_x.shape[1] == 64
    mlp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    results = fedbabu.run(tiny(rounds=4), data=data, model=mlp, head="2", out=tmp_path / "f", progress=False)
    assert results.personalized_accuracy > 0.6


# --- your own data ------------------------------------------------------------------------------------


def test_natural_partition_keeps_every_clients_samples_together(tmp_path):
    rng = np.random.default_rng(3)
    n = 600
    labels = rng.integers(0, 4, n)
    owners = rng.choice(["ann", "bob", "cy", "dee", "eve"], n)
    features = np.stack([np.arange(n, dtype=np.float32), rng.normal(size=n).astype(np.float32)], axis=1)
    data = fedbabu.from_arrays(features, labels, client_ids=owners, test_fraction=0.25)
    assert data.client_names == ["ann", "bob", "cy", "dee", "eve"]
    train_ids = data.dataset.train_x[:, 0].numpy().astype(int)
    test_ids = data.dataset.test_x[:, 0].numpy().astype(int)
    assert sorted(np.concatenate([train_ids, test_ids]).tolist()) == list(range(n))
    for client, name in enumerate(data.client_names):
        mine = np.concatenate([train_ids[data.partition.train[client]], test_ids[data.partition.test[client]]])
        assert sorted(mine.tolist()) == np.flatnonzero(owners == name).tolist()
        assert len(data.partition.test[client]) == round(0.25 * (owners == name).sum())
    mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 4))
    results = fedbabu.run(tiny(num_clients=50), data=data, model=mlp, head="2", out=tmp_path / "n",
                          progress=False)
    assert results.config.num_clients == 5 and results.config.partition == "natural"
    assert [len(t) for t in results.partition.train] == [len(t) for t in data.partition.train]


def test_natural_partition_with_given_test_clients():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    y = np.tile([0, 1], 10)
    ids = np.repeat([10, 20], 10)
    data = fedbabu.from_arrays(x, y, test_x=x[:6], test_y=y[:6], client_ids=ids,
                               test_client_ids=[20, 20, 10, 10, 10, 20])
    assert [t.tolist() for t in data.partition.test] == [[2, 3, 4], [0, 1, 5]]
    assert [t.tolist() for t in data.partition.train] == [list(range(10)), list(range(10, 20))]
    spread = fedbabu.from_arrays(x, y, test_x=x[:6], test_y=y[:6], client_ids=np.where(y == 0, "zeros", "ones"))
    assert [spread.dataset.test_y[t].tolist() for t in spread.partition.test] == [[1, 1, 1], [0, 0, 0]]


def test_arrays_layouts_and_string_labels():
    rng = np.random.default_rng(0)
    nchw = rng.random((30, 3, 5, 5)).astype(np.float32)
    data = fedbabu.from_arrays(nchw, np.array(["cat", "dog", "emu"] * 10), test_fraction=0.2)
    assert data.class_names == ["cat", "dog", "emu"] and data.dataset.num_classes == 3
    assert data.dataset.train_x.shape[1:] == (5, 5, 3) and data.dataset.train_x.dtype == torch.uint8
    assert len(data.dataset.test_y) == 6 and np.bincount(data.dataset.test_y.numpy()).tolist() == [2, 2, 2]
    whole = np.concatenate([data.dataset.train_x.numpy(), data.dataset.test_x.numpy()])
    expected = np.round(nchw.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    assert sorted(map(bytes, whole)) == sorted(map(bytes, expected))


def test_from_torch_dataset():
    images = torch.rand(20, 1, 6, 6)
    labels = torch.arange(20) % 2
    data = fedbabu.from_torch(torch.utils.data.TensorDataset(images, labels),
                              torch.utils.data.TensorDataset(images[:4], labels[:4]))
    assert data.dataset.train_x.shape == (20, 6, 6, 1)
    assert torch.equal(data.dataset.test_x[..., 0], torch.round(images[:4, 0] * 255).to(torch.uint8))
    assert data.dataset.test_y.tolist() == [0, 1, 0, 1]


def _write_pngs(root: Path, sizes: dict[str, list[tuple[int, int]]], mode: str = "L") -> None:
    for cls, shapes in sizes.items():
        (root / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(shapes):
            pixels = np.full((h, w) if mode == "L" else (h, w, 3), 10 * i + len(cls), dtype=np.uint8)
            Image.fromarray(pixels, mode=mode).save(root / cls / f"{i}.png")


def test_read_image_folder(tmp_path):
    _write_pngs(tmp_path / "a", {"zebra": [(4, 5)] * 2, "ant": [(4, 5)] * 3})
    folder = fedbabu.read_image_folder(tmp_path / "a")
    assert folder.class_names == ["ant", "zebra"] and folder.labels.tolist() == [0, 0, 0, 1, 1]
    assert folder.images.shape == (5, 4, 5, 1)
    assert folder.images[4, 0, 0, 0] == 15 and folder.paths[4].name == "1.png"
    _write_pngs(tmp_path / "rgb", {"x": [(3, 3)], "y": [(6, 6)]}, mode="RGB")
    resized = fedbabu.read_image_folder(tmp_path / "rgb", size=(4, 4))
    assert resized.images.shape == (2, 4, 4, 3)
    with pytest.raises(ValueError, match=r"^root: images differ in size .* pass size="):
        fedbabu.read_image_folder(tmp_path / "rgb")
    test = fedbabu.read_image_folder(tmp_path / "a", classes=["zebra", "ant"])
    assert test.labels.tolist() == [0, 0, 1, 1, 1]


# --- results ------------------------------------------------------------------------------------------


def test_run_leaves_the_same_folder_as_the_cli(tmp_path):
    overrides = ["num_clients=10", "rounds=3", "eval_every=3", "finetune.epochs=2"]
    cli = subprocess.run([sys.executable, "-m", "fedbabu", "run", "--quiet", "--workers", "1", "--out",
                          str(tmp_path / "cli"), *[a for o in overrides for a in ("--set", o)]],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    results = fedbabu.run(load_config(None, overrides, {"workers": 1}), out=tmp_path / "api", progress=False)
    for name in ("clients.csv", "metrics.jsonl", "partition.json", "config.yaml"):
        if name == "metrics.jsonl":
            strip = [json.loads(line) for line in (tmp_path / "cli" / name).read_text().splitlines()]
            assert strip == [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in results.metrics]
        else:
            assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == sorted(p.name for p in (tmp_path / "api").iterdir())
    cli_model = torch.load(tmp_path / "cli" / "model.pt", weights_only=True)
    assert all(torch.equal(cli_model[k], v) for k, v in results.model.state_dict().items())


def test_a_loaded_dataset_keeps_its_name_and_gives_the_same_run(tmp_path):
    from fedbabu.data.datasets import load_digits as our_digits

    given = fedbabu.run(tiny(rounds=2), data=our_digits(), out=tmp_path / "given", progress=False)
    loaded = fedbabu.run(tiny(rounds=2), out=tmp_path / "loaded", progress=False)
    assert given.config.dataset == "digits" and given.config == loaded.config
    assert (tmp_path / "given" / "clients.csv").read_bytes() == (tmp_path / "loaded" / "clients.csv").read_bytes()


def test_to_dataframe_without_pandas_says_how_to_install(monkeypatch, tmp_path, digit_data):
    results = fedbabu.run(tiny(rounds=1), data=digit_data, out=tmp_path / "r", progress=False)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        results.to_dataframe()
    fake = types.ModuleType("pandas")
    fake.DataFrame = lambda rows: ("frame", rows)
    monkeypatch.setitem(sys.modules, "pandas", fake)
    _, rows = results.to_dataframe("clients")
    assert len(rows) == 10 and list(rows[0]) == ["client", "train_size", "test_size", "classes", "initial_accuracy",
                                                   "accuracy_after_epoch_1", "accuracy_after_epoch_2"]
    assert rows[3]["accuracy_after_epoch_2"] == results.clients[3]["accuracies"][2]
    _, rounds = results.to_dataframe("rounds")
    assert rounds == results.metrics
    with pytest.raises(ValueError, match=r"^table:"):
        results.to_dataframe("seeds")


def test_a_saved_custom_config_tells_the_cli_user_what_is_missing(tmp_path, digit_data, monkeypatch):
    from fedbabu.runner import partition_for, prepare_data

    monkeypatch.chdir(tmp_path)

    results = fedbabu.run(tiny(rounds=0), data=digit_data, model=OddHead, head="decision.scores",
                          out=tmp_path / "r", progress=False)
    saved = load_config(tmp_path / "r" / "config.yaml")
    with pytest.raises(fedbabu.UserError, match=r"^dataset: 'custom' means data given in Python"):
        prepare_data(saved)
    with pytest.raises(fedbabu.UserError, match=r"^model: 'custom' means a network given in Python"):
        fedbabu.run(saved.model_copy(update={"dataset": "digits"}), progress=False)
    with pytest.raises(fedbabu.UserError, match=r"^partition: 'natural' comes with the data"):
        partition_for(results.config.model_copy(update={"partition": "natural"}), digit_data.dataset)
    assert not (tmp_path / "runs").exists()


def test_every_public_name_is_documented():
    names = [n for n in fedbabu.__all__ if n != "__version__"]
    assert {"run", "compare", "Config", "load_config", "split_body_head", "from_arrays", "read_image_folder"} <= set(
        names)
    undocumented = [n for n in names if not (getattr(fedbabu, n).__doc__ or "").strip()]
    for cls in (fedbabu.Results, fedbabu.ComparisonResults, fedbabu.FederatedData):
        undocumented += [f"{cls.__name__}.{k}" for k, v in vars(cls).items()
                         if not k.startswith("_") and callable(getattr(v, "fget", v)) and not getattr(v, "__doc__", "")]
    assert undocumented == []


def test_importing_fedbabu_is_light():
    code = ("import sys, fedbabu; print('torch' in sys.modules, fedbabu.__version__); fedbabu.run; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "0.1.0", "True"]


# --- bad arguments ------------------------------------------------------------------------------------


BAD_CALLS = {
    "head: OddHead has no layer named 'fc'; its linear layers are 'decision.scores'":
        lambda d: fedbabu.split_body_head(OddHead(), head="fc"),
    "head: 'trunk.0' is a Conv2d": lambda d: fedbabu.split_body_head(OddHead(), head="trunk.0"),
    "head: with body= the head must be": lambda d: fedbabu.split_body_head(body=nn.Flatten(), head=nn.ReLU()),
    "model: give either": lambda d: fedbabu.split_body_head(OddHead(), body=nn.Flatten(), head=nn.Linear(1, 2)),
    "head: layer 'decision.scores' is not the final operation":
        lambda d: fedbabu.run(tiny(), data=d.data, model=SoftmaxAfterHead, head="decision.scores", progress=False),
    "model: buffer 'body.seen' changes during training":
        lambda d: fedbabu.run(tiny(), data=d.data, model=CountingBuffer, head="decision.scores", progress=False),
    "model: forward must return one tensor of class scores, got a tuple":
        lambda d: fedbabu.run(tiny(), data=d.data, model=TupleOut, head="decision.scores", progress=False),
    "head: the head has 3 outputs but the data has 10 classes":
        lambda d: fedbabu.run(tiny(), data=d.data, model=nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), head="1",
                              progress=False),
    "head: the model is a Sequential, not a BodyHead":
        lambda d: fedbabu.run(tiny(), data=d.data, model=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
                              progress=False),
    "model: a forward pass on a batch of the data (shape (8, 1, 8, 8)) failed":
        lambda d: fedbabu.run(tiny(), data=d.data, model=nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 10)), head="1",
                              progress=False),
    "model: 4convnet needs images of at least 16x16, got 8x8; choose another model":
        lambda d: fedbabu.run(load_config(extra={"model": "4convnet"}), data=d.data),
    "model: expected a torch.nn.Module or a function": lambda d: fedbabu.run(tiny(), data=d.data, model="resnet"),
    "head: names a layer of your own network": lambda d: fedbabu.run(tiny(), data=d.data, head="fc"),
    "config: expected a fedbabu.Config": lambda d: fedbabu.run({"rounds": 3}),
    "data: expected fedbabu.from_arrays": lambda d: fedbabu.run(tiny(), data=[1, 2, 3]),
    "progress: expected True, False": lambda d: fedbabu.run(tiny(), progress="yes"),
    "algorithms: unknown ['fedsgd']": lambda d: fedbabu.compare(tiny(), ["fedavg", "fedsgd"]),
    "algorithms: expected a list": lambda d: fedbabu.compare(tiny(), "fedavg,fedbabu"),
    "seeds: expected a list of integers": lambda d: fedbabu.compare(tiny(), seeds=[0, -1]),
    "model: feature vectors": lambda d: fedbabu.run(tiny(), data=(d.x.reshape(len(d.x), -1) / 255.0, d.y)),
    "y: expected one label per sample of x": lambda d: fedbabu.from_arrays(d.x, d.y[:-1]),
    "x: float images must be in [0, 1]": lambda d: fedbabu.from_arrays(d.x.astype(np.float32), d.y),
    "x: cannot tell the channel axis": lambda d: fedbabu.from_arrays(np.zeros((4, 5, 6, 7), np.uint8), d.y[:4]),
    "test_fraction: expected a fraction": lambda d: fedbabu.from_arrays(d.x, d.y, test_fraction=1.0),
    "test_y: give test_x and test_y together": lambda d: fedbabu.from_arrays(d.x, d.y, test_x=d.x),
    "client_ids: expected one client id per sample": lambda d: fedbabu.from_arrays(d.x, d.y, client_ids=[1, 2]),
    "test_client_ids: clients [9] have no training samples":
        lambda d: fedbabu.from_arrays(d.x[:4], [0, 1, 0, 1], test_x=d.x[:2], test_y=[0, 1], client_ids=[1, 1, 2, 2],
                                      test_client_ids=[1, 9]),
    "num_classes: labels go up to 9": lambda d: fedbabu.from_arrays(d.x, d.y, num_classes=5),
    "root: /nonexistent/images is not a folder": lambda d: fedbabu.read_image_folder("/nonexistent/images"),
    "mode: expected 'L', 'RGB'": lambda d: fedbabu.read_image_folder(ROOT, mode="CMYK"),
    "client: expected a client index in 0..9":
        lambda d: fedbabu.run(tiny(rounds=0), data=d.data, out=d.out, progress=False).client_model(10),
}


@pytest.mark.parametrize("message", list(BAD_CALLS))
def test_bad_arguments_raise_value_errors_naming_the_argument(message, digit_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y = digit_data.dataset.train_x.numpy(), digit_data.dataset.train_y.numpy()
    arguments = types.SimpleNamespace(data=digit_data, x=x, y=y, out=tmp_path / "r")
    with pytest.raises(ValueError) as err:
        BAD_CALLS[message](arguments)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "runs").exists(), "a refused call must not leave a run folder"


def test_a_used_or_wrong_out_names_the_api_arguments(tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "mine.txt").write_text("mine")
    with pytest.raises(ValueError, match=rf"^out {used}: folder is not empty; pass overwrite=True to replace"):
        fedbabu.run(tiny(), out=used, progress=False)
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(ValueError, match=rf"^out {tmp_path / 'a-file'}: exists and is not a folder$"):
        fedbabu.compare(tiny(), out=tmp_path / "a-file", progress=False)
    assert [p.name for p in used.iterdir()] == ["mine.txt"] and (tmp_path / "a-file").read_text() == "mine"
