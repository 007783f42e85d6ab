"""The `pollinate` command: one subcommand per thing a user does.

Each subcommand lives beside the code it drives, in a module that exposes
`add_arguments(parser)` and `run(args) -> int`. Those modules import torch, grpc and
hivemind lazily inside `run`, so `pollinate --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (name, module, one-line help). A module that does not exist yet makes the subcommand
# answer "not yet available" instead of failing.
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("node", "pollinate.node.cli", "run a volunteer node that hosts a span of blocks"),
    ("coordinator", "pollinate.coordinator.cli", "run the swarm's control plane"),
    ("generate", "pollinate.client.cli_generate", "generate text through the swarm"),
    ("chat", "pollinate.client.cli_chat", "chat with the model through the swarm"),
    ("train", "pollinate.client.cli_train", "fine-tune a job's adapters over the swarm"),
    ("export", "pollinate.client.cli_export", "write a job's adapters as a PEFT adapter"),
    ("job", "pollinate.client.cli_job", "create or inspect training jobs (show, record)"),
    ("analyze", "pollinate.client.cli_analyze", "memorisation across a job's checkpoints (loss, verbatim recall)"),
    ("status", "pollinate.client.cli_status", "show the swarm at a glance"),
    ("convert", "pollinate.node.cli_convert", "convert a model into per-block shards"),
    ("demo", "pollinate.demo", "run a whole swarm on this machine on the embedded model"),
]


# Loggers of libraries whose import-time warnings tell a user nothing they can act on:
# transformers imports torchao when installed (node/quant.py uses it), and torchao warns of
# CUDA kernels a CPU build lacks and registers pytree constants torch calls deprecated. Shown
# with -v.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pollinate",
        description="Pollinate: volunteers serve and fine-tune transformer language models together.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in SUBCOMMANDS:
        mod = _load(module)
        if mod is None:
            help_text += " (not yet available)"
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if mod is not None:
            mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    mod = _load(args._module)
    if mod is None:
        print(f"pollinate {args.command}: not yet available in this version", file=sys.stderr)
        return 2
    threads = getattr(args, "torch_threads", 0)
    if threads:  # before any torch work; every command that runs torch has the flag
        import torch

        torch.set_num_threads(threads)
    setup_errors = _setup_errors()
    try:
        return int(mod.run(args) or 0)
    except setup_errors as e:
        # A set-up problem (an address, a firewall, an unreachable coordinator): one line that
        # says what to change, not a traceback. -v shows the traceback.
        if args.verbose:
            raise
        print(f"pollinate {args.command}: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    from pollinate.protocol.errors import SetupError

    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, SetupError) else f"{type(exc).__name__}: {text}"


def _setup_errors() -> tuple[type[BaseException], ...]:
    """What a user's set-up causes, as opposed to a bug: the DHT cannot bootstrap, the
    coordinator is unreachable or refuses us, no node can be routed to. (Imported after
    argument parsing, so `pollinate --help` stays fast; none of these imports torch.)"""
    from pollinate.client.routing import NoRouteError
    from pollinate.coordinator.probe import ProbeError
    from pollinate.protocol.errors import (FailedPrecondition, PeerUnavailable, RpcTimeout, SetupError,
                                           Unauthenticated)

    # OSError: a port already taken ("cannot listen on HOST:PORT"), a file that is not there.
    return (SetupError, ProbeError, NoRouteError, PeerUnavailable, RpcTimeout, FailedPrecondition,
            Unauthenticated, OSError)


if __name__ == "__main__":
    sys.exit(main())
