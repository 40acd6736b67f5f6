"""The ``fedbabu`` command line: ``run`` one experiment, ``compare`` several on one partition,
``resume`` an interrupted run, ``report`` on finished or interrupted runs."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from rich.console import Console

from fedbabu.config import Config, load_config, merge_dicts
from fedbabu.engine.faults import TrainingDiverged
from fedbabu.engine.pool import WorkerError
from fedbabu.errors import UserError
from fedbabu.flower.commands import add_flower_parser, run_flower_command

if TYPE_CHECKING:
    from fedbabu.progress import PartitionSummary


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes in one line with exit code 2, like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _experiment_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file (default: the embedded digits experiment)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, dotted keys allowed (finetune.epochs=3); repeatable")
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<time>-<name>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out folder")
    parser.add_argument("--seed", type=int, help="seed for the model, partition and sampling (config key seed)")
    _machine_options(parser)


def _machine_options(parser: argparse.ArgumentParser) -> None:
    """Where a run's data and compute are and how it reports, rather than what it computes: shared by
    every command that trains."""
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], help="compute device (config key device)")
    parser.add_argument("--workers", help="worker processes: auto (one per core) or a number")
    parser.add_argument("--data-dir", type=Path, help="folder holding the dataset (then $FEDBABU_DATA, then cache)")
    parser.add_argument("--download", action="store_true", help="download the dataset if absent (md5-verified)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _reliability_options(parser: argparse.ArgumentParser, resume_option: bool) -> None:
    """Options of checkpoints and monitoring: resuming a stopped run, and per-round scalars for TensorBoard."""
    if resume_option:
        parser.add_argument("--resume", type=Path, metavar="DIR",
                            help="continue the run in DIR from its latest checkpoint (same config required)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="log per-round scalars to <run folder>/tensorboard (needs the tensorboard extra)")


def _clients_option(parser: argparse.ArgumentParser) -> None:
    """Which of a finished run's clients a command works on: a run with held-out clients has two groups."""
    parser.add_argument("--clients", choices=["all", "seen", "unseen"], default="all",
                        help="all clients (default), those the federation could train (seen), or its held-out "
                             "ones (unseen, config key holdout_clients)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedbabu", description="FedBABU and baselines for personalized federated learning.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser("run", help="run one experiment")
    _experiment_options(run)
    _reliability_options(run, resume_option=True)
    compare = commands.add_parser("compare", help="run several algorithms on the same partition and seeds")
    compare.add_argument("--algorithms", default="fedavg,fedbabu",
                         help="comma-separated algorithm names; an entry may carry its own settings, "
                              "e.g. fedavg:update_part=head or perfedavg:variant=hf")
    compare.add_argument("--seeds", help="comma-separated seeds (default: the config's seed)")
    _experiment_options(compare)
    reproduce = commands.add_parser("reproduce", help="list or run the paper's experiments (configs/paper/)")
    reproduce.add_argument("name", help="an experiment name, or LIST to show them all")
    reproduce.add_argument("--scale", choices=["full", "quick"], default="full",
                           help="full: the paper's budget; quick: fewer rounds and clients")
    reproduce.add_argument("--seeds", help="comma-separated seeds (default: the preset's)")
    reproduce.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config value in every cell (e.g. data_dir=/data)")
    reproduce.add_argument("--only", action="append", default=[], metavar="KEY=VALUE[,VALUE]",
                           help="run only the cells with these grid values (e.g. local_epochs=1,10), or only "
                                "these algorithms (algorithm=fedavg,fedbabu); repeatable")
    reproduce.add_argument("--out", type=Path, help="output folder (default: runs/reproduce/<name>-<scale>)")
    reproduce.add_argument("--personalize-only", action="store_true",
                           help="train nothing: personalize every finished run in the folder again (the cells' "
                                "fine-tuning settings, changed by --set finetune.*) and rebuild results.md")
    _machine_options(reproduce)
    resume = commands.add_parser("resume", help="continue an interrupted run from its latest checkpoint")
    resume.add_argument("folder", type=Path, metavar="DIR", help="the run folder")
    resume.add_argument("--workers", help="worker processes: auto (one per core) or a number")
    resume.add_argument("--data-dir", type=Path, help="folder holding the dataset, if it moved")
    resume.add_argument("--quiet", action="store_true", help="no progress bars")
    _reliability_options(resume, resume_option=False)
    personalize = commands.add_parser("personalize", help="personalize a finished run again with other fine-tuning "
                                                          "settings, without training it again")
    personalize.add_argument("folder", type=Path, metavar="RUN_DIR", help="a finished run folder")
    personalize.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="a fine-tuning setting (finetune.part=head, finetune.epochs=20); repeatable")
    personalize.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/personalize/<settings>)")
    personalize.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    _clients_option(personalize)
    personalize.add_argument("--model", choices=["final", "initial"], default="final",
                             help="start the clients from the run's final global model (default) or from its "
                                  "initial one, before any round: fine-tuning without the federation, for reference")
    personalize.add_argument("--device", choices=["cpu", "cuda", "auto"], help="compute device")
    personalize.add_argument("--workers", help="worker processes: auto (one per core) or a number")
    personalize.add_argument("--data-dir", type=Path, help="folder holding the dataset, if it moved")
    personalize.add_argument("--quiet", action="store_true", help="no progress bars")
    analyze = commands.add_parser("analyze", help="measure the bodies and heads of finished runs (probe, nearest "
                                                  "class mean, CKA, head geometry, spectrum)")
    analyze.add_argument("folders", type=Path, nargs="+", metavar="RUN_DIR", help="finished run folders")
    analyze.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/analysis for one run, else "
                                                  "analysis/ in the folder that holds them all)")
    analyze.add_argument("--probe-size", type=int, default=1000, metavar="N",
                         help="test images every body is read on for CKA and the spectrum (default 1000)")
    analyze.add_argument("--pair-clients", type=int, default=20, metavar="N",
                         help="clients whose personalized bodies are compared pairwise by CKA (default 20)")
    analyze.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    _clients_option(analyze)
    analyze.add_argument("--device", choices=["cpu", "cuda", "auto"], help="compute device")
    analyze.add_argument("--workers", help="worker processes: auto (one per core) or a number")
    analyze.add_argument("--data-dir", type=Path, help="folder holding the dataset, if it moved")
    analyze.add_argument("--quiet", action="store_true", help="no progress bars")
    report = commands.add_parser("report", help="rebuild report.md and plots of runs; compare several in one table")
    report.add_argument("folders", type=Path, nargs="+", metavar="DIR", help="run folders (finished or interrupted)")
    report.add_argument("--out", type=Path, help="also write the comparison table as Markdown to this file")
    add_flower_parser(commands, _experiment_options)
    return parser


def _workers_option(raw: str | None) -> int | str | None:
    if raw is None or raw == "auto":
        return raw
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"--workers: expected 'auto' or an integer >= 1, got {raw!r}") from None


def _extra_from(args: argparse.Namespace) -> dict[str, Any]:
    """The config values given as options (``--seed``, ``--device`` ...) rather than with ``--set``."""
    extra: dict[str, Any] = {}
    for key, value in (("device", args.device), ("seed", getattr(args, "seed", None)),
                       ("data_dir", args.data_dir), ("workers", _workers_option(args.workers))):
        if value is not None:
            extra[key] = str(value) if isinstance(value, Path) else value
    if getattr(args, "download", False):
        extra["download"] = True
    return extra


def _config_from(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides, _extra_from(args))


def _resume_config(args: argparse.Namespace) -> Config | None:
    """The config the user asks a resumed run to have: the saved one, changed by any options given."""
    from fedbabu.config import build_config, parse_overrides
    from fedbabu.runner import open_checkpoint

    if args.config is not None:
        return _config_from(args)
    if not (args.overrides or args.seed is not None or args.device):
        return None
    values = open_checkpoint(args.resume).config.to_plain()
    for extra in (_extra_from(args), parse_overrides(args.overrides)):
        values = merge_dicts(values, extra)
    return build_config(values, f"--resume {args.resume} (with options)")


def _parse_list(raw: str, option: str, cast: type = str) -> list:
    items = [item.strip() for item in raw.split(",") if item.strip()]
    if not items:
        raise UserError(f"{option}: expected a comma-separated list, got {raw!r}")
    try:
        return [cast(item) for item in items]
    except ValueError:
        raise UserError(f"{option}: expected comma-separated {cast.__name__}s, got {raw!r}") from None


def _progress(label: str, quiet: bool) -> PartitionSummary:
    """Progress on stderr (bars in a terminal, one line per evaluation round in a pipe or log), or with
    ``--quiet`` the partition summary line alone.

    A quiet run prints that line on stdout, with the results table, so its stderr holds only
    warnings and errors.
    """
    from fedbabu.progress import PartitionSummary, progress_display

    if quiet:
        return PartitionSummary(label)
    return progress_display(label, Console(stderr=True), lambda line: print(line, file=sys.stderr, flush=True))


def _observers(args: argparse.Namespace, label: str, folder: Path) -> Any:
    from fedbabu.results.live import ObserverGroup, TensorBoardObserver

    return ObserverGroup(_progress(label, args.quiet), TensorBoardObserver(folder) if args.tensorboard else None)


def _show_run(experiment: Any, config: Config, console: Console) -> None:
    from fedbabu.tables import print_results, summary_row

    print_results(console, f"{config.dataset} {config.resolved_model()}: {config.num_clients} clients",
                  [summary_row(experiment.summary)])
    console.print(f"run folder: {experiment.folder}")


def _cmd_run(args: argparse.Namespace, console: Console) -> None:
    from fedbabu.runner import default_out_dir, run_experiment

    if args.resume is not None:
        if args.overwrite:
            raise UserError("--resume and --overwrite contradict each other: resume continues the run in DIR, "
                            "overwrite would start it over")
        if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
            raise UserError(f"--out {args.out}: differs from --resume {args.resume}; a run resumes in its own folder")
        _resume(args, _resume_config(args), console)
        return
    config = _config_from(args)
    out = args.out or default_out_dir(config.algorithm)
    args.interrupted_folder = out
    experiment = run_experiment(config, out, _observers(args, config.algorithm, out), overwrite=args.overwrite)
    _show_run(experiment, config, console)


def _resume(args: argparse.Namespace, given: Config | None, console: Console) -> None:
    from fedbabu.runner import resume_experiment

    folder = args.resume
    args.interrupted_folder = folder
    overrides = {"workers": _workers_option(args.workers),
                 "data_dir": str(args.data_dir) if args.data_dir is not None else None}
    experiment = resume_experiment(folder, given, _observers(args, f"resume {folder}", folder), overrides)
    _show_run(experiment, experiment.result.config, console)


def _cmd_resume(args: argparse.Namespace, console: Console) -> None:
    args.resume = args.folder
    _resume(args, None, console)


def _cmd_personalize(args: argparse.Namespace, console: Console) -> None:
    from fedbabu.config import parse_overrides
    from fedbabu.personalization import personalize_run

    overrides = merge_dicts(parse_overrides(args.overrides), _extra_from(args))
    experiment, _ = personalize_run(args.folder, overrides, args.out, args.overwrite,
                                    _progress(f"personalize {args.folder}", args.quiet), group=args.clients,
                                    model=args.model)
    _show_run(experiment, experiment.result.config, console)


def _print_analysis(console: Console, runs: list[dict[str, Any]]) -> None:
    """The analyses side by side, one measure per row, so several runs still fit 80 columns."""
    from fedbabu.results.analysis_report import comparison_rows
    from fedbabu.tables import Column, print_table

    header, rows = comparison_rows(runs)
    columns = [Column("measure")] + [Column(row[0], "number") for row in rows]
    print_table(console, "inside the representation", columns,
                [[measure, *(row[index] for row in rows)] for index, measure in enumerate(header[1:], start=1)],
                caption="NCM: nearest class mean; head columns: the global head's")


def _cmd_analyze(args: argparse.Namespace, console: Console) -> None:
    from fedbabu.analysis import analyze

    result = analyze(args.folders, args.out, args.probe_size, args.pair_clients, _extra_from(args), args.overwrite,
                     lambda label: _progress(f"analyze {label}", args.quiet), group=args.clients)
    _print_analysis(console, result.runs)
    console.print(f"analysis folder: {result.folder}")


def _cmd_report(args: argparse.Namespace, console: Console) -> None:
    from fedbabu.results.rebuild import report_runs
    from fedbabu.tables import Column, print_table

    rows = report_runs(args.folders, args.out)
    columns = [Column("run"), Column("algorithm"), Column("dataset"), Column("rounds", "number"),
               Column("global\nacc (%)", "number"), Column("initial\nacc (%)", "number"),
               Column("personalized\nacc (%)", "number")]
    print_table(console, "runs", columns, [
        [r["run"], r["algorithm"], r["dataset"], r["rounds"], r["global"], r["initial"], r["personalized"]]
        for r in rows])
    if args.out is not None:
        console.print(f"comparison: {args.out}")


def _cmd_compare(args: argparse.Namespace, console: Console) -> None:
    from fedbabu.runner import default_out_dir, run_comparison
    from fedbabu.tables import print_results

    config = _config_from(args)
    algorithms = _parse_list(args.algorithms, "--algorithms")
    seeds = _parse_list(args.seeds, "--seeds", int) if args.seeds else None
    out = args.out or default_out_dir("compare")

    def observer_for(algorithm: str, seed: int) -> PartitionSummary:
        return _progress(f"{algorithm} seed {seed}", args.quiet)

    comparison = run_comparison(config, algorithms, out, seeds, observer_for, overwrite=args.overwrite)
    title = (f"{config.dataset} {config.resolved_model()}: {config.num_clients} clients, {config.rounds} rounds, "
             f"{config.finetune.part} fine-tuning x{config.finetune.epochs}")
    print_results(console, title, comparison.rows)
    console.print(f"comparison: {comparison.folder / 'comparison.md'}")
    for line in real_data_hint(args.config, config):
        console.print(line, highlight=False, markup=False)


REAL_DATA_COMMAND = ("fedbabu reproduce cifar10-4convnet-offline --scale quick --seeds 0 "
                     "--only shards_per_client=10 --only local_epochs=1")
"""FedAvg against FedBABU on one cell of CIFAR-10 at the quick scale: minutes on two cores."""
REPOSITORY_DATA = Path(".cache") / "datasets"
"""Where this repository's scripts build the offline CIFAR-10 copy (``--data-dir .cache/datasets``)."""


def real_data_hint(config_file: Path | None, config: Config) -> list[str]:
    """After ``compare`` on the embedded digits default (``make run``), the command that shows FedBABU's
    effect on real data: with the CIFAR-10 copy where the data module finds it, else with ``--download``.

    Nothing for a config file, or a default changed to another dataset: the digits, where both
    algorithms score 99-100%, show nothing of the paper, and the hint says so.
    """
    if config_file is not None or config.dataset != "digits":
        return []
    from fedbabu.data.datasets import ARCHIVES, FOLDERS, search_roots

    archive = ARCHIVES["cifar10"][0].rsplit("/", 1)[1]
    defaults = search_roots(None)
    option = " --download"
    for root in [*search_roots(config.data_dir), REPOSITORY_DATA]:
        if (root / FOLDERS["cifar10"]).is_dir() or (root / archive).is_file():
            option = "" if root in defaults else f" --data-dir {root}"
            break
    needs = " (downloads CIFAR-10, about 170 MB)" if option == " --download" else ""
    return ["These digits are too easy to show the paper (both score 99-100%). FedBABU's lead on real data, "
            f"CIFAR-10 at a quick scale (minutes){needs}:",
            *shell_lines(f".venv/bin/{REAL_DATA_COMMAND}{option}")]


def shell_lines(command: str, width: int = 76) -> list[str]:
    """A command as indented shell lines of at most ``width`` columns, continued with a backslash, an
    option never parted from its value: it fits an 80-column terminal and still pastes as one command."""
    words = command.split(" ")
    pieces: list[str] = []
    for word in words:
        if pieces and pieces[-1].startswith("--") and " " not in pieces[-1] and not word.startswith("--"):
            pieces[-1] += f" {word}"
        else:
            pieces.append(word)
    lines, current = [], "  " + pieces[0]
    for piece in pieces[1:]:
        if len(current) + 1 + len(piece) + 2 > width:
            lines.append(current + " \\")
            current = "      " + piece
        else:
            current += f" {piece}"
    return [*lines, current]


def _cmd_reproduce(args: argparse.Namespace, console: Console) -> None:
    from fedbabu.config import parse_overrides
    from fedbabu.reproduce import cells, list_presets, personalize_preset, run_preset

    if args.name.lower() == "list":
        from fedbabu.tables import Column, print_table

        columns = [Column("name"), Column("experiment", "text"), Column("cells", "number"),
                   Column("algorithms", "keys"), Column("seeds")]
        print_table(console, "the paper's experiments (fedbabu reproduce NAME)", columns, [
            [name, preset.title, str(len(cells(preset))), list(preset.algorithms), ",".join(map(str, preset.seeds))]
            for name, preset in list_presets().items()])
        return
    seeds = _parse_list(args.seeds, "--seeds", int) if args.seeds else None
    out = args.out or Path("runs") / "reproduce" / f"{args.name}-{args.scale}"
    settings = merge_dicts(parse_overrides(args.overrides), _extra_from(args))
    run = personalize_preset if args.personalize_only else run_preset
    run(args.name, out, args.scale, seeds, settings, args.only,
        observer_for=lambda label: _progress(label, args.quiet),
        log=lambda line: console.print(line, soft_wrap=True, highlight=False))
    console.print(f"results: {out / 'results.md'}")


def _cmd_flower(args: argparse.Namespace, console: Console) -> None:
    run_flower_command(args, console, lambda: _config_from(args))


COMMANDS = {"run": _cmd_run, "compare": _cmd_compare, "resume": _cmd_resume, "report": _cmd_report,
            "personalize": _cmd_personalize, "analyze": _cmd_analyze,
            "reproduce": _cmd_reproduce, "flower": _cmd_flower}


def _checkpoint_note(args: argparse.Namespace, action: str) -> str:
    """What the run folder still holds after a stop, for the one-line message."""
    from fedbabu.engine.checkpoint import CHECKPOINT, load_checkpoint

    folder = getattr(args, "interrupted_folder", None)
    if folder is None or not (Path(folder) / CHECKPOINT).exists():
        return ""
    try:
        rounds = load_checkpoint(Path(folder) / CHECKPOINT).rounds_done
    except UserError:
        return ""
    return f"; {folder} keeps its last good checkpoint (round {rounds}){action.format(folder=folder)}"


RESUME = ": continue with `fedbabu resume {folder}`"


def _log_to_stderr() -> None:
    """Warnings of the run (rejected updates, rounds without clients) as one line each."""
    logger = logging.getLogger("fedbabu")
    for old in [h for h in logger.handlers if getattr(h, "fedbabu_cli", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    handler.fedbabu_cli = True
    logger.addHandler(handler)
    logger.propagate = False


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's time limit, ``kill``) stops a run as cleanly as Ctrl-C does."""


def _terminate(signum: int, frame: Any) -> NoReturn:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = " ".join(filter(None, ("fedbabu", args.command, getattr(args, "flower_command", None))))
        print(f"error: unrecognized arguments: {' '.join(unknown)} (see {command} --help)", file=sys.stderr)
        return 2
    console = Console()
    _log_to_stderr()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _dispatch(args, console)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    """Run the command; every expected way for it to stop becomes one line on stderr and an exit code."""
    try:
        COMMANDS[args.command](args, console)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}{_checkpoint_note(args, '')}", file=sys.stderr)
        return 1
    except WorkerError as err:
        print(f"error: {err}{_checkpoint_note(args, RESUME)}", file=sys.stderr)
        return 1
    except (MemoryError, torch.OutOfMemoryError):
        print(f"error: out of memory (lower batch_size, eval_batch_size or workers)"
              f"{_checkpoint_note(args, RESUME)}", file=sys.stderr)
        return 1
    except Terminated:
        print(f"terminated{_checkpoint_note(args, RESUME)}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"interrupted{_checkpoint_note(args, RESUME)}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
