"""Round throughput of the engine against a plain federated loop, measured side by side in one run.

    python benchmarks/round_throughput.py [--quick] [--out PATH]

Rows (same workload: 4convNet, CIFAR-shaped images, 10 clients x 500 images, tau = 1, batch 50, SGD
momentum 0.9, FedBABU):

1. ``reference``: the loop most FL code bases use: deep-copy the global model per client, a
   ``DataLoader`` over a per-client ``Dataset`` applying per-image transforms, torch's default threads,
   NCHW tensors, glibc's default allocator. Runs first, before this process is tuned by the engine.
2. ``engine workers=1``: our engine, in-process, one thread.
3. ``engine default``: our engine with default settings (one worker process per core).
4. ``engine default bf16``: row 3 with ``precision: bf16``, labelled with whether this CPU computes
   bf16 (AVX512-BF16 or AMX) or PyTorch emulates it (much slower; ``--quick`` leaves the row out there).
5. ``engine workers=1, executor=vectorized``: the 10 clients trained together (``torch.func``), to compare
   with row 2; it is meant for GPUs, and on a CPU it shows what stacking clients costs there.
6. ``kernel ceiling``: forward, backward and SGD step repeated on one prepared batch, one thread per
   process, channels_last, the allocator tuned: no data, no copies, no evaluation, in one process per
   core stepping at the same time (as the engine's workers do, sharing caches, memory bandwidth and
   clocks). No engine can beat it; the engine is reported as a fraction of it.

After the rows, ``--pairs`` pairs of (ceiling, engine default) measured back to back give the engine's
fraction of the ceiling free of the machine's drift between rows, each side taking its best repeat,
with the share of the workers' time spent in client tasks (what the engine loses to waiting for a
round's last client). Then: personalization of 100 clients (5 epochs), one ResNet-18 round, and the
accuracy effect of bf16. Prints ``speedup: X.XX`` (row 3 over row 1) last and writes
``benchmarks/results.md``. ``--quick`` measures one round per row, takes rows 3 and 6 from its one
pair, personalizes 2 clients, and skips the vectorized row (a GPU executor) and the ResNet-18 and
bf16 accuracy runs; it writes ``benchmarks/results-quick.md``, so it never replaces the full results.
``--out PATH`` writes elsewhere.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedbabu.config import build_config  # noqa: E402
from fedbabu.data.datasets import CIFAR10_MEAN, CIFAR10_STD, Dataset, read_cifar10  # noqa: E402
from fedbabu.data.partition import make_partition  # noqa: E402
from fedbabu.engine.hardware import cpu_flags, native_bf16  # noqa: E402
from fedbabu.engine.pool import tune_process  # noqa: E402
from fedbabu.engine.simulation import simulate  # noqa: E402
from fedbabu.models import build_model  # noqa: E402

CIFAR_CACHE = ROOT / ".cache" / "datasets" / "cifar-10-batches-py"

RESULTS = {"full": ROOT / "benchmarks" / "results.md", "quick": ROOT / "benchmarks" / "results-quick.md"}
"""Each mode's own results file: a quick run never replaces the committed full results, nor a full run the quick."""


def results_path(quick: bool, out: Path | None = None) -> Path:
    """Where a run writes its results: ``--out`` when given, else its mode's own file (:data:`RESULTS`)."""
    return out if out is not None else RESULTS["quick" if quick else "full"]


def cifar_like(num_train: int) -> tuple[Dataset, str]:
    """Real CIFAR-10 when the cache has it (for the accuracy check), else random CIFAR-shaped images."""
    if (CIFAR_CACHE / "test_batch").exists():
        return read_cifar10(CIFAR_CACHE), "CIFAR-10 (offline JPEG-derived copy)"
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(num_train) % 10
    test_labels = torch.arange(num_train // 5) % 10
    return Dataset("cifar10", torch.randint(0, 256, (num_train, 32, 32, 3), dtype=torch.uint8, generator=gen),
                   labels, torch.randint(0, 256, (num_train // 5, 32, 32, 3), dtype=torch.uint8, generator=gen),
                   test_labels, 10, CIFAR10_MEAN, CIFAR10_STD, "random CIFAR-shaped images"), "random"


def workload(dataset: Dataset, clients: int, **overrides) -> tuple:
    values = {"dataset": "cifar10", "model": "4convnet", "algorithm": "fedbabu", "num_clients": clients,
              "partition": "iid", "client_fraction": 1.0, "local_epochs": 1, "batch_size": 50, "lr": 0.05,
              "momentum": 0.9, "eval_every": 0, "augment": "on", "finetune": {"epochs": 0}}
    values.update(overrides)
    config = build_config(values)
    # 500 training and 100 test images per client, the paper's CIFAR client, whatever the number of clients
    partition = make_partition("iid", dataset.train_y.numpy()[: clients * 500], dataset.test_y.numpy()[: clients * 100],
                               clients, 10, seed=0)
    return config, partition


class PerClientDataset(torch.utils.data.Dataset):
    """The usual per-sample dataset: one image at a time through Python transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std) -> None:
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean)[:, None, None]
        self.std = torch.tensor(std)[:, None, None]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i].permute(2, 0, 1).float() / 255
        img = nn.functional.pad(img, (4, 4, 4, 4))
        dy, dx = np.random.randint(0, 9, size=2)
        img = img[:, dy:dy + 32, dx:dx + 32]
        if np.random.rand() < 0.5:
            img = img.flip(2)
        return (img - self.mean) / self.std, self.labels[i]


def body_sgd(model: nn.Module) -> torch.optim.SGD:
    """FedBABU's local optimizer for the hand-written loops: the head frozen, SGD on the body."""
    for p in model.head.parameters():
        p.requires_grad_(False)
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)


def reference_round(global_model: nn.Module, dataset: Dataset, partition) -> float:
    """One round the common way; returns seconds."""
    start = time.perf_counter()
    states = []
    for client in range(partition.num_clients):
        model = copy.deepcopy(global_model)
        idx = torch.as_tensor(partition.train[client])
        loader = torch.utils.data.DataLoader(
            PerClientDataset(dataset.train_x[idx], dataset.train_y[idx], dataset.mean, dataset.std),
            batch_size=50, shuffle=True)
        optimizer = body_sgd(model)
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        states.append(model.state_dict())
    averaged = {k: torch.stack([s[k].float() for s in states]).mean(0) for k in states[0]}
    global_model.load_state_dict(averaged)
    return time.perf_counter() - start


def engine_records(dataset: Dataset, rounds: int, workers: int | str, precision: str = "fp32",
                   model: str = "4convnet", clients: int = 10, executor: str = "sequential") -> list[dict]:
    """The engine's round records (seconds, workers' utilization), the first round (worker start-up) dropped."""
    config, partition = workload(dataset, clients, rounds=rounds + 1, workers=workers, precision=precision,
                                 model=model, executor=executor)
    return simulate(config, dataset, partition).metrics[1:]


def engine_rounds(dataset: Dataset, rounds: int, workers: int | str, **settings: Any) -> float:
    """Median seconds per round of the engine."""
    return float(np.median([m["seconds"] for m in engine_records(dataset, rounds, workers, **settings)]))


def _bare_steps(steps: int, repeats: int, start: Any, results: Any) -> None:
    """One process's share of the ceiling: the bare step on one prepared batch, timed after a common start."""
    tune_process(1)
    model = build_model("4convnet", 3, 32, 10).to(memory_format=torch.channels_last)
    optimizer = body_sgd(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 32, 32, generator=gen).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (50,), generator=gen)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    for _ in range(10):
        step()
    for _ in range(repeats):
        start.wait()
        began = time.perf_counter()
        for _ in range(steps):
            step()
        results.put(time.perf_counter() - began)


def kernel_ceiling_seconds(steps: int, cores: int, repeats: int = 3) -> float:
    """Seconds per round of the bare training step (10 x 500 images) with every core stepping at once.

    ``cores`` forked processes, one thread each, start each timed stretch together, as the engine's
    workers run: shared caches, memory bandwidth and clocks then cost what they cost the engine,
    which a single core's rate multiplied by the cores would hide. The best of ``repeats`` stretches;
    within one, the rate is the sum of the processes' rates.
    """
    tune_process(1)  # as the engine's pool does before it forks: children start with one OpenMP thread
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(cores), context.Queue()
    processes = [context.Process(target=_bare_steps, args=(steps, repeats, start, results)) for _ in range(cores)]
    for process in processes:
        process.start()
    timings = [[results.get() for _ in range(cores)] for _ in range(repeats)]
    for process in processes:
        process.join()
    best_rate = max(sum(steps * 50 / seconds for seconds in stretch) for stretch in timings)
    return 10 * 500 / best_rate


def personalization_seconds(dataset: Dataset, clients: int, epochs: int) -> float:
    config, partition = workload(dataset, clients, rounds=0, finetune={"epochs": epochs, "lr": 0.001})
    start = time.perf_counter()
    simulate(config, dataset, partition)
    return time.perf_counter() - start


def bf16_accuracy(dataset: Dataset, rounds: int) -> dict[str, tuple[float, float]]:
    """Initial / personalized accuracy of a short shards run in fp32 and bf16 (same seed and partition)."""
    outcome = {}
    for precision in ("fp32", "bf16"):
        config = build_config({"dataset": "cifar10", "model": "4convnet", "num_clients": 20, "partition": "shards",
                               "shards_per_client": 2, "rounds": rounds, "client_fraction": 0.5, "lr": 0.05,
                               "eval_every": 0, "precision": precision, "finetune": {"epochs": 3, "lr": 0.01}})
        partition = make_partition("shards", dataset.train_y.numpy()[:10000], dataset.test_y.numpy(), 20, 10,
                                   seed=0, shards_per_client=2)
        curves = simulate(config, dataset, partition).accuracy_curve()
        outcome[precision] = (float(curves[:, 0].mean()), float(curves[:, -1].mean()))
    return outcome


def core_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {core_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def bf16_is_native() -> bool | None:
    """Whether this CPU computes bf16 (AVX512-BF16 or AMX); None where its flags cannot be read."""
    flags = cpu_flags()
    return None if flags is None else native_bf16(flags)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with ``out`` resolved to the file this run writes (:func:`results_path`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one measured round per row, the default engine and the ceiling measured once, as "
                             "one pair; 2 clients personalized; no vectorized row, no ResNet-18 or bf16 accuracy "
                             "runs, and no bf16 row on a CPU that emulates bf16 (under 2 min on 2 cores)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the Markdown results (default: benchmarks/results.md, with --quick "
                             "benchmarks/results-quick.md)")
    parser.add_argument("--pairs", type=int, default=None,
                        help="pairs of (kernel ceiling, engine rounds: 3, 2 with --quick) measured back to back "
                             "after the rows, for the engine's fraction of the ceiling (default 5; 1 with --quick)")
    args = parser.parse_args(argv)
    if args.pairs is None:
        args.pairs = 1 if args.quick else 5
    if args.quick and args.pairs < 1:
        parser.error("--quick needs --pairs 1 or more: its default-engine and ceiling rows are the first pair")
    args.out = results_path(args.quick, args.out)
    return args


def main() -> None:
    args = parse_args()
    began = time.perf_counter()
    rounds = 1 if args.quick else 5
    dataset, provenance = cifar_like(50000)
    images_per_round = 10 * 500
    bf16_native = bf16_is_native()
    bf16_label = {True: "native bf16", False: "emulated: no AVX512-BF16 or AMX", None: "bf16 support unknown"}

    _, partition = workload(dataset, 10)
    model = build_model("4convnet", 3, 32, 10)
    reference_round(model, dataset, partition)  # warm-up
    reference = float(np.median([reference_round(model, dataset, partition) for _ in range(rounds)]))
    cores = core_count()
    seconds = {"reference": reference, "workers=1": engine_rounds(dataset, rounds, 1)}
    if not args.quick:
        seconds["default"] = engine_rounds(dataset, rounds, "auto")
    if not (args.quick and bf16_native is False):
        seconds["bf16"] = engine_rounds(dataset, rounds, "auto", precision="bf16")
    if not args.quick:
        seconds["vectorized"] = engine_rounds(dataset, rounds, 1, executor="vectorized")
        seconds["ceiling"] = kernel_ceiling_seconds(100, cores)
    # One engine row against one ceiling differs by the machine's drift between them (10-20% a minute
    # apart on shared virtual machines); pairs measured back to back, alternating, bound that. Both
    # sides of a pair take their best repeat: the ceiling its best of 3 stretches, the engine its best
    # of 3 rounds (2 with --quick, whose rows are then the pair's own measurements).
    pairs = [(kernel_ceiling_seconds(40, cores), engine_records(dataset, 2 if args.quick else 3, "auto"))
             for _ in range(args.pairs)]
    fractions = [ceiling / min(r["seconds"] for r in records) for ceiling, records in pairs]
    utilization = float(np.median([r["utilization"] for _, records in pairs for r in records])) if pairs else None
    if args.quick:
        seconds["default"] = float(np.median([r["seconds"] for r in pairs[0][1]]))
        seconds["ceiling"] = pairs[0][0]
    seconds = {key: seconds[key] for key in ("reference", "workers=1", "default", "bf16", "vectorized", "ceiling")
               if key in seconds}
    names = {
        "reference": "reference (deep copy, DataLoader, default threads, NCHW)",
        "workers=1": "engine workers=1",
        "default": "engine default (workers=auto)",
        "bf16": f"engine default, bf16 autocast ({bf16_label[bf16_native]})",
        "vectorized": "engine workers=1, executor=vectorized (torch.func)",
        "ceiling": f"kernel ceiling: bare step on one batch, {cores} processes x 1 thread stepping at once",
    }
    lines = [f"| {names[key]} | {images_per_round / s:,.0f} | {s:.2f} |" for key, s in seconds.items()]
    table = ["| setting | images/s | s/round |", "|---|---|---|", *lines]
    print("\n".join(table))

    personal_clients = 2 if args.quick else 100
    personal_s = personalization_seconds(dataset, personal_clients, 5)
    ceiling_personal_s = 100 * 5 * 500 * seconds["ceiling"] / images_per_round
    extra = [
        f"- personalization of {personal_clients} 4convNet clients x 5 epochs (500 images each, evaluation "
        f"after every epoch): {personal_s:.1f} s",
        f"- paper CIFAR setting (f = 0.1, tau = 1, 320 rounds of 10 x 500 images) estimated from the default "
        f"engine row plus the personalization above scaled to 100 clients: "
        f"{(320 * seconds['default'] + personal_s * 100 / personal_clients) / 60:.1f} min",
        f"- workers=auto over workers=1: {seconds['workers=1'] / seconds['default']:.2f}x",
        f"- kernel ceiling: the engine default reaches {seconds['ceiling'] / seconds['default']:.0%} of it in the "
        f"rows above" + (f", and {np.median(fractions):.0%} (median; {min(fractions):.0%} to {max(fractions):.0%}) "
                         f"in {len(fractions)} pairs of ceiling and engine measured back to back, each side its best "
                         f"repeat; in those rounds the workers spent {utilization:.0%} of their time in client tasks "
                         "(the rest waiting for the round's last client and for the server)" if fractions else "")
        + "; the most "
        f"any engine could show against the reference on this machine in fp32 is "
        f"{seconds['reference'] / seconds['ceiling']:.2f}x, and personalizing 100 clients x 5 epochs needs at least "
        f"{ceiling_personal_s:.0f} s of training steps alone, the paper CIFAR setting at least "
        f"{(320 * seconds['ceiling'] + ceiling_personal_s) / 60:.1f} min",
    ]
    if "bf16" in seconds:
        extra.append(f"- bf16 over fp32: {seconds['default'] / seconds['bf16']:.2f}x ({bf16_label[bf16_native]}; "
                     "bf16 is faster only where the hardware computes it)")
    else:
        extra.append("- bf16 row left out of --quick: this CPU emulates bf16 (no AVX512-BF16 or AMX), about 8x "
                     "slower than fp32; the full run measures it")
    if "vectorized" in seconds:
        extra.append(f"- vectorized over sequential (both workers=1): "
                     f"{seconds['workers=1'] / seconds['vectorized']:.2f}x")
    if not args.quick:
        resnet_s = engine_rounds(dataset, 1, "auto", model="resnet18", clients=10)
        extra.append(f"- one ResNet-18 round, 10 clients x 500 images: {resnet_s:.1f} s "
                     f"({10 * 500 / resnet_s:,.0f} images/s)")
        if provenance != "random" and bf16_native is False:
            extra.append("- bf16 accuracy effect not measured: this CPU emulates bf16, which would take over 20 min "
                         "here (the numerics are bf16's either way; measure it on a CPU or GPU that computes bf16)")
        elif provenance != "random":
            accuracy = bf16_accuracy(dataset, 30)
            extra.append("- bf16 accuracy effect (20 clients, 2 classes each, CIFAR-10): " + "; ".join(
                f"{p}: initial {100 * a:.1f}%, personalized {100 * b:.1f}%" for p, (a, b) in accuracy.items()))
    extra.append(f"- this benchmark ran {time.perf_counter() - began:.0f} s")
    print("\n".join(extra))
    speedup = seconds["reference"] / seconds["default"]
    report = [
        "# Round throughput", "",
        f"Machine: {machine()}. Data: {provenance}. Mode: {'quick' if args.quick else 'full'}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}.", "",
        "Workload: 4convNet, 10 clients x 500 images, tau = 1, batch 50, SGD momentum 0.9, FedBABU "
        "(median seconds per round).", "",
        *table, "", *extra, "", f"speedup: {speedup:.2f}", "",
    ]
    args.out.write_text("\n".join(report))
    print(f"results written to {args.out}")
    print(f"speedup: {speedup:.2f}")


if __name__ == "__main__":
    main()
