"""The ``fedbabu flower`` subcommands: ``sim`` (Ray simulation) and ``certs`` (deployment credentials).

This module imports Flower only when a subcommand runs, so ``fedbabu --help`` works without it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from fedbabu.config import Config


def add_flower_parser(commands: argparse._SubParsersAction,
                      experiment_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``fedbabu flower sim`` and ``fedbabu flower certs``."""
    flower = commands.add_parser("flower", help="run on Flower: Ray simulation, or credentials for real nodes")
    sub = flower.add_subparsers(dest="flower_command", required=True, parser_class=type(flower))
    sim = sub.add_parser("sim", help="run one experiment on Flower's simulation engine, one virtual client each")
    experiment_options(sim)
    sim.add_argument("--cpus-per-client", type=int, default=1,
                     help="CPU cores Ray reserves per virtual client (default 1)")
    sim.add_argument("--round-timeout", type=float, default=600.0,
                     help="seconds a round waits for client replies (default 600)")
    certs = sub.add_parser("certs", help="write a CA, a SuperLink certificate and SuperNode key pairs to DIR")
    certs.add_argument("dir", type=Path, help="folder for ca.crt, server.pem, server.key and keys/node-I[.pub]")
    certs.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs to make (default 3)")
    certs.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                       help="extra name or IP the SuperLink is reached at (127.0.0.1 and localhost always); "
                            "repeatable")
    certs.add_argument("--overwrite", action="store_true", help="replace credentials already in DIR")


def run_flower_command(args: argparse.Namespace, console: Console, config_from: Callable[[], Config]) -> None:
    if args.flower_command == "certs":
        from fedbabu.flower.certs import make_credentials

        made = make_credentials(args.dir, args.nodes, args.host, args.overwrite)
        console.print(f"CA {made.ca_cert}, SuperLink certificate {made.server_cert} (key {made.server_key}), "
                      f"{len(made.node_keys)} SuperNode key pairs in {args.dir / 'keys'}")
        return
    from fedbabu.flower.launch import FlowerRunError, simulate_on_flower
    from fedbabu.runner import default_out_dir

    config = config_from()
    out = args.out or default_out_dir(f"flower-{config.algorithm}")
    try:
        summary = simulate_on_flower(config, out, args.cpus_per_client, args.overwrite, echo=not args.quiet,
                                     round_timeout=args.round_timeout)
    except FlowerRunError as err:
        console.print(f"error: {err}")
        raise SystemExit(1) from None
    from fedbabu.tables import print_results, summary_row

    print_results(console, f"{config.dataset} {config.resolved_model()} on Flower: {config.num_clients} virtual "
                           "clients", [summary_row(summary)])
    console.print(f"run folder: {out}")
