"""Arguments shared by `pollinate generate` and `pollinate chat`, and the model they build."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    """How every client command (generate, chat, train, export) finds the swarm."""
    from pollinate.protocol.channels import add_coordinator_tls_argument

    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded), a local dir or .gguf, or a hub id")
    p.add_argument("--initial-peers", nargs="*", default=[], help="DHT multiaddrs of any swarm member")
    p.add_argument("--coordinator", help="HOST:PORT of the coordinator (gives the DHT peers; needs the token)")
    add_coordinator_tls_argument(p)
    p.add_argument("--swarm-ca", type=Path, metavar="PEM",
                   help="a --data-tls swarm's CA certificate (the coordinator's DATA_DIR/swarm-ca.pem), for a "
                        "client that bootstraps from --initial-peers alone: nodes are dialled over TLS and "
                        "verified, so a DHT record at a non-member's address gets no call (with --coordinator "
                        "the CA comes from the coordinator)")
    p.add_argument("--token-file", type=Path, help="file holding the swarm token (or set $POLLINATE_TOKEN)")
    p.add_argument("--cache-dir", type=Path, help="converted-model cache (default ~/.cache/pollinate)")
    add_torch_threads_argument(p)


def add_torch_threads_argument(p: argparse.ArgumentParser) -> None:
    """`--torch-threads N` for every command that runs torch; cli/main.py applies it before
    the command runs (several processes sharing a machine each want fewer threads)."""
    p.add_argument("--torch-threads", type=int, default=0, metavar="N",
                   help="torch intra-op threads (0: torch's default, one per core)")


def add_swarm_arguments(p: argparse.ArgumentParser) -> None:
    """generate and chat: the connection plus sampling settings."""
    add_connection_arguments(p)
    p.add_argument("--codec", default="fp16",
                   help="hidden states on the wire: fp16 (default; greedy tokens identical to the local model "
                        "on the benchmark prompts), none (fp32, exact), int8row (8 bits + one scale per token: "
                        "about half fp16's bytes, tokens may differ from the local model's, see "
                        "docs/compression.md: 2 of 5 benchmark prompts identical, 76%% of tokens agree), int4row (4 bits: "
                        "0 of 5, 18%%)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; >0: sample")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling when --temperature > 0")
    p.add_argument("--verbose", dest="show_route", action="store_true", help="print the route used")
    p.add_argument("--spot-check", type=float, default=0.0, metavar="RATE",
                   help="check this share of each hop's steps on other replicas and never use a node again whose "
                        "answer two others contradict (docs/security.md; each check costs a Forward of the history)")
    p.add_argument("--exact", action="store_true",
                   help="route only through nodes holding unquantised weights (a node's --quant int8/int4 changes "
                        "the logits); fails naming the quantised nodes where no other hosts a block. With "
                        "--codec none the output is the local model's")


def swarm_token(args: argparse.Namespace) -> str | None:
    """--token-file, else $POLLINATE_TOKEN."""
    from pollinate.protocol.auth import TOKEN_ENV, read_token

    return read_token(args.token_file, os.environ.get(TOKEN_ENV))


def swarm_peers(args: argparse.Namespace, token: str | None) -> list[str]:
    """DHT multiaddrs to bootstrap from: --initial-peers and the coordinator's (asked in a
    subprocess, so this process holds no gRPC object before its DHT forks), as
    RemoteModelForCausalLM.from_pretrained takes them (remote_model.bootstrap_peers). Sets the
    swarm CA nodes are verified against: the coordinator's, or --swarm-ca."""
    from pollinate.client.remote_model import bootstrap_peers

    if not (args.initial_peers or args.coordinator):
        raise ValueError("give --coordinator HOST:PORT (with --token-file) or --initial-peers")
    return bootstrap_peers(args.initial_peers, args.coordinator or None, token, args.coordinator_tls, args.swarm_ca)


def join_dht(args: argparse.Namespace):
    """(token, a client-mode DHT peer) for a command that talks to nodes directly. Call it
    before creating any gRPC object: the DHT forks. ValueError says what to pass."""
    from pollinate.node.announce import start_dht

    token = swarm_token(args)
    return token, start_dht(swarm_peers(args, token), client_mode=True)


def load_model(args: argparse.Namespace):
    """The remote model for generate and chat; a bad setting or an unreachable coordinator
    exits with the reason (no traceback)."""
    from pollinate.client.remote_model import RemoteModelForCausalLM
    from pollinate.coordinator.probe import ProbeError

    try:
        token = swarm_token(args)
        return RemoteModelForCausalLM.from_pretrained(
            args.model, initial_peers=args.initial_peers, coordinator=args.coordinator, token=token,
            coordinator_tls=args.coordinator_tls, swarm_ca=args.swarm_ca,
            cache_dir=args.cache_dir, wire_codec=args.codec, job=getattr(args, "job", None),
            exact=args.exact, spot_check_rate=args.spot_check,
        )
    except (ValueError, ProbeError) as e:
        raise SystemExit(f"pollinate {args.command}: {e}") from None


def sampling_kwargs(args: argparse.Namespace) -> dict:
    if args.temperature > 0:
        return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    return {"do_sample": False}


def print_route(session) -> None:
    hops = " -> ".join(str(h) for h in session.route)
    extra = f", {session.failovers} failover(s), {session.recovery_seconds:.2f} s recovering" if session.failovers else ""
    print(f"[route: {hops}{extra}]", file=sys.stderr, flush=True)
