"""How a run's costs grow with the number of clients, measured in one invocation.

    python benchmarks/scaling.py [--clients 100,1000,10000] [--flower-clients 100,1000]
                                 [--algorithms fedbabu,fedper,ditto] [--flower-algorithms fedbabu,fedper,ditto]
                                 [--quick] [--out benchmarks/scaling.md]

Simulator rows: for every N and algorithm, one ``fedbabu.run`` on random CIFAR-shaped images, 50
training and 10 test images per client whatever N (so a round's work is the same for every N), IID,
10 clients per round, 4convNet, batch 50, tau = 1, six rounds, every client evaluated in rounds 3
and 6, checkpoints after rounds 2, 4 and 6, 10 clients personalized at the end, the engine's
default workers.

Flower rows: the same for ``fedbabu flower sim`` (Ray, one virtual SuperNode per client) at the
Flower client counts, for the Flower algorithms, on the real CIFAR-10 cut to 50 training images
per client (the Flower ClientApp loads its data by name), each next to the simulator on the same
config: their ratio is what Flower's machinery costs. The Flower server keeps no checkpoint
(per-client parts stay on the nodes), so those columns are empty there.

Measured per row, each in a fresh process so that its memory is its own: seconds per round (median
of the rounds without evaluation, the first dropped), seconds per evaluation of every client
(evaluation rounds minus that median), seconds and bytes written per checkpoint (the largest save;
bytes of new or rewritten files), personal state on disk at the end, and peak memory: the largest
sum of proportional set sizes (PSS, so pages the worker processes share count once) over the run's
process tree, sampled every 0.2 s. Next to the round time: a kernel ceiling measured in the same
process just before the run, the bare training step of one round's 500 images on every core (as
``round_throughput.py`` measures it), and the round time as a multiple of it.

Writes ``benchmarks/scaling.md`` and ``benchmarks/scaling.png`` (``--out``: another Markdown file,
the plot beside it). ``--quick``: N = 100 and 1,000, FedBABU only, Flower at 100, written to
``benchmarks/scaling-quick.md`` (and ``.png``) so that it never replaces the full results. An empty list
(``--clients ""``, ``--flower-clients ""``) leaves that engine's rows out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from round_throughput import CIFAR_CACHE, core_count, kernel_ceiling_seconds, machine  # noqa: E402

TRAIN_PER_CLIENT, TEST_PER_CLIENT, PER_ROUND = 50, 10, 10
ROUNDS, EVAL_EVERY, CHECKPOINT_EVERY = 6, 3, 2


def settings(algorithm: str, clients: int) -> dict[str, Any]:
    """The row's config (beyond the data): the same for the simulator and Flower."""
    return {"model": "4convnet", "algorithm": algorithm, "num_clients": clients, "partition": "iid",
            "client_fraction": PER_ROUND / clients, "rounds": ROUNDS, "local_epochs": 1, "batch_size": 50,
            "lr": 0.05, "eval_every": EVAL_EVERY, "checkpoint_every": CHECKPOINT_EVERY, "personalize_clients": 10,
            "finetune": {"epochs": 1}}


class PeakMemory:
    """The largest PSS sum over this process and its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _children() -> dict[int, list[int]]:
        tree: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                tree.setdefault(int(fields[1]), []).append(int(entry))
        return tree

    @staticmethod
    def _pss(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            tree, family, total = self._children(), [os.getpid()], 0
            while family:
                pid = family.pop()
                total += self._pss(pid)
                family += tree.get(pid, [])
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class CheckpointTimer:
    """Times each checkpoint the engine writes and the bytes it puts on disk (new or rewritten files)."""

    def __init__(self, folder: Path) -> None:
        from fedbabu.engine.checkpoint import Checkpointer

        self.folder, self.saves, self.written = folder, [], []
        original = Checkpointer.save

        def save(checkpointer: Any, *args: Any, **kwargs: Any) -> None:
            before = self._files()
            started = time.perf_counter()
            original(checkpointer, *args, **kwargs)
            self.saves.append(time.perf_counter() - started)
            self.written.append(sum(size for path, (size, stamp) in self._files().items()
                                    if before.get(path) != (size, stamp)))

        Checkpointer.save = save

    def _files(self) -> dict[Path, tuple[int, int]]:
        found = {}
        for path in self.folder.rglob("*"):
            if path.is_file():
                info = path.stat()
                found[path] = (info.st_size, info.st_mtime_ns)
        return found


def random_data(clients: int) -> Any:
    from fedbabu.data.custom import from_arrays

    rng = np.random.default_rng(0)
    train, test = clients * TRAIN_PER_CLIENT, clients * TEST_PER_CLIENT
    return from_arrays(rng.integers(0, 256, (train, 32, 32, 3), dtype=np.uint8), np.arange(train) % 10,
                       test_x=rng.integers(0, 256, (test, 32, 32, 3), dtype=np.uint8), test_y=np.arange(test) % 10,
                       num_classes=10, name="random CIFAR-shaped")


def timings(folder: Path) -> dict[str, float]:
    """Round and evaluation seconds from the run's own records."""
    timing = [json.loads(line) for line in (folder / "timing.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    seconds = {t["round"]: t["seconds"] for t in timing}
    evaluated = {r["round"] for r in records if "test_accuracy" in r}
    plain = statistics.median(s for r, s in seconds.items() if r > 1 and r not in evaluated)
    evaluation = statistics.median(seconds[r] for r in evaluated) - plain
    return {"round_s": plain, "evaluation_s": evaluation}


def measure(row: dict[str, Any]) -> dict[str, Any]:
    """One row, in this (fresh) process."""
    import fedbabu
    from fedbabu.config import build_config
    from fedbabu.flower.launch import simulate_on_flower

    engine, clients, algorithm = row["engine"], row["clients"], row["algorithm"]
    ceiling = kernel_ceiling_seconds(20, core_count()) * PER_ROUND * TRAIN_PER_CLIENT / 5000
    values = settings(algorithm, clients)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "run"
        if engine == "simulator":
            data = random_data(clients)
            timer = CheckpointTimer(out)
            with PeakMemory() as memory:
                fedbabu.run(build_config(values), data=data, out=out, progress=False)
        else:
            values.update(dataset="cifar10", data_dir=str(CIFAR_CACHE.parent), samples_per_client=TRAIN_PER_CLIENT)
            timer = None
            with PeakMemory() as memory:
                if engine == "flower":
                    simulate_on_flower(build_config(values), out, echo=False)
                else:
                    fedbabu.run(build_config(values), out=out, progress=False)
        result = {**row, **timings(out), "ceiling_s": ceiling, "peak_memory_bytes": memory.peak}
        if timer is not None:
            personal = out / "personal"
            result.update(checkpoint_s=max(timer.saves), checkpoint_written_bytes=max(timer.written),
                          personal_bytes=sum(p.stat().st_size for p in personal.rglob("*") if p.is_file())
                          if personal.exists() else 0)
    return result


def run_row(row: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--row", json.dumps(row)], capture_output=True, text=True,
                          env={**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{row}: failed\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(value: float | None) -> str:
    return "" if value is None else f"{value / 2**20:,.1f}"


def table(rows: list[dict[str, Any]], first: dict[tuple[str, str], float]) -> str:
    lines = ["| engine | algorithm | clients | s/round | vs first N | x ceiling | s/evaluation (all clients) | "
             "s/checkpoint | MiB written/checkpoint | personal MiB on disk | peak MiB (PSS) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = first[(r["engine"], r["algorithm"])]
        checkpoint = f"{r['checkpoint_s']:.3f}" if "checkpoint_s" in r else ""
        lines.append(
            f"| {r['engine']} | {r['algorithm']} | {r['clients']:,} | {r['round_s']:.2f} | {r['round_s'] / base:.2f} | "
            f"{r['round_s'] / r['ceiling_s']:.2f} | {r['evaluation_s']:.2f} | {checkpoint} | "
            f"{mib(r.get('checkpoint_written_bytes'))} | {mib(r.get('personal_bytes'))} | "
            f"{mib(r['peak_memory_bytes'])} |")
    return "\n".join(lines)


GROWING = (("round_s", "s/round"), ("evaluation_s", "s/evaluation"), ("checkpoint_s", "s/checkpoint"),
           ("checkpoint_written_bytes", "written/checkpoint"), ("personal_bytes", "personal on disk"),
           ("peak_memory_bytes", "peak memory"))


def growth(rows: list[dict[str, Any]]) -> str:
    """Each cost at the largest N over the smallest, and the exponent k of cost ~ N^k between them."""
    lines = ["| engine | algorithm | from N to N | " + " | ".join(label for _, label in GROWING) + " |",
             "|---|---|---|" + "---|" * len(GROWING)]
    for key in sorted({(r["engine"], r["algorithm"]) for r in rows}):
        mine = sorted((r for r in rows if (r["engine"], r["algorithm"]) == key), key=lambda r: r["clients"])
        if len(mine) < 2:
            continue
        low, high = mine[0], mine[-1]
        span = np.log(high["clients"] / low["clients"])
        cells = []
        for column, _ in GROWING:
            if low.get(column) and high.get(column):
                ratio = high[column] / low[column]
                cells.append(f"x{ratio:.2f} (N^{np.log(ratio) / span:.2f})")
            else:
                cells.append("")
        lines.append(f"| {key[0]} | {key[1]} | {low['clients']:,} to {high['clients']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(r["engine"], r["algorithm"]) for r in rows}):
        mine = sorted((r for r in rows if (r["engine"], r["algorithm"]) == key), key=lambda r: r["clients"])
        n = [r["clients"] for r in mine]
        label = f"{key[1]} ({key[0]})"
        left.plot(n, [r["round_s"] for r in mine], marker="o", label=label)
        right.plot(n, [r["evaluation_s"] for r in mine], marker="o", label=label)
    for axis, title in ((left, "seconds per round (10 clients)"), (right, "seconds per evaluation of every client")):
        axis.set_xscale("log")
        axis.set_xlabel("clients in the federation")
        axis.set_title(title)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    left.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


RESULTS = {"full": HERE / "scaling.md", "quick": HERE / "scaling-quick.md"}
"""Each mode's own report: a quick run never replaces the committed full results."""


def results_path(quick: bool, out: Path | None = None) -> Path:
    """Where a run writes its report (the plot beside it): ``--out`` when given, else its mode's own file."""
    return out if out is not None else RESULTS["quick" if quick else "full"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="100,1000,10000")
    parser.add_argument("--flower-clients", default="100,1000")
    parser.add_argument("--algorithms", default="fedbabu,fedper,ditto")
    parser.add_argument("--flower-algorithms", default="fedbabu,fedper,ditto",
                        help="FedBABU (nothing kept per client), FedPer (a head per client) and Ditto (a model per "
                             "client) in each virtual node's state; a Flower evaluation of 1,000 clients takes "
                             "about a minute")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None,
                        help="the Markdown report (default: benchmarks/scaling.md, with --quick "
                             "benchmarks/scaling-quick.md); the plot is written beside it, as a .png of the same name")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = results_path(args.quick, args.out)
    if args.row:
        print(json.dumps(measure(json.loads(args.row))))
        return
    if args.quick:
        args.clients, args.flower_clients, args.algorithms, args.flower_algorithms = "100,1000", "100", "fedbabu", \
            "fedbabu"
    algorithms = args.algorithms.split(",")
    plan = [{"engine": "simulator", "algorithm": a, "clients": int(n)} for n in args.clients.split(",") if n
            for a in algorithms]
    if args.flower_clients and not (CIFAR_CACHE / "test_batch").exists():
        raise SystemExit(f"the Flower rows read CIFAR-10 from {CIFAR_CACHE}; build it first (make test does)")
    for n in filter(None, args.flower_clients.split(",")):
        plan += [{"engine": e, "algorithm": a, "clients": int(n)} for a in args.flower_algorithms.split(",")
                 for e in ("simulator on CIFAR-10", "flower")]
    started, rows = time.strftime("%Y-%m-%d %H:%M"), []
    for row in plan:
        rows.append(run_row(row))
        r = rows[-1]
        print(f"{r['engine']:>22} {r['algorithm']:>8} N={r['clients']:>6,}: {r['round_s']:.2f} s/round, "
              f"{r['evaluation_s']:.2f} s/evaluation, peak {mib(r['peak_memory_bytes'])} MiB", flush=True)
    first = {}
    for r in rows:
        first.setdefault((r["engine"], r["algorithm"]), r["round_s"])
    ratios = [f"{f['algorithm']} at N = {f['clients']:,}: {f['round_s'] / s['round_s']:.2f}x the simulator's "
              f"s/round, {f['evaluation_s'] / max(s['evaluation_s'], 1e-9):.2f}x its s/evaluation"
              for f in rows if f["engine"] == "flower"
              for s in rows if s["engine"] == "simulator on CIFAR-10"
              and (s["algorithm"], s["clients"]) == (f["algorithm"], f["clients"])]
    text = "\n".join([
        "# Scaling with the number of clients", "",
        f"Machine: {machine()}. Run: {started}{' (--quick)' if args.quick else ''}. Written by "
        "`benchmarks/scaling.py`; see its docstring for what each column measures.", "",
        table(rows, first), "",
        "Growth between the smallest and the largest federation (a cost flat in N has an exponent near 0, "
        "one proportional to N near 1):", "",
        growth(rows), "",
        *(["Flower (Ray) against the simulator on the same config, measured side by side:", "",
           *[f"- {line}" for line in ratios], ""] if ratios else []),
    ])
    args.out.write_text(text + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
