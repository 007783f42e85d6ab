"""`pollinate coordinator`: run the swarm's control plane.

    pollinate coordinator --data-dir DIR --port 7070 --http-port 7071 --token-file F

Builds the config dataclasses from flags (nothing else reads argv), starts the bootstrap
DHT before any gRPC object exists, then serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
from pathlib import Path

from pollinate.coordinator.config import (
    ADDRESS_CHECK_MODES,
    DEFAULT_MODEL_ID,
    AddressCheckConfig,
    KNOWN_MODELS,
    CoordinatorConfig,
    DhtConfig,
    MembershipConfig,
    QuarantineConfig,
    RoundsConfig,
    StoreConfig,
)
from pollinate.protocol.auth import TOKEN_ENV, read_token

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = MembershipConfig()
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="directory for the SQLite state (created if missing)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind for gRPC, HTTP and the DHT (default 127.0.0.1; 0.0.0.0 "
                             "for all)")
    parser.add_argument("--announce-host", metavar="HOST",
                        help="address other machines reach this one at (default: --host, or with "
                             "0.0.0.0 the default route's interface address); given to every joiner "
                             "in the DHT multiaddrs")
    parser.add_argument("--dht-port", type=int, default=0,
                        help="TCP port of the bootstrap DHT peer (default 0: any free port; fix it "
                             "to open it in a firewall)")
    check = AddressCheckConfig()
    parser.add_argument("--check-addresses", choices=ADDRESS_CHECK_MODES, default=check.undialable,
                        help="a joiner announcing 0.0.0.0, or loopback from another machine: refuse "
                             "it, warn, or off (default %(default)s)")
    parser.add_argument("--dial-back", choices=ADDRESS_CHECK_MODES, default=check.dial_back,
                        help="connect back to a remote joiner's announced address and refuse it, "
                             "warn, or skip when that fails (default %(default)s)")
    parser.add_argument("--dial-timeout", type=float, default=check.dial_timeout_s, metavar="S",
                        help="seconds the dial-back may take (default %(default)s)")
    parser.add_argument("--port", type=int, default=7070, help="gRPC port (0: any free port)")
    parser.add_argument("--http-port", type=int, default=7071,
                        help="HTTP status port (0: any free port, -1: off)")
    parser.add_argument("--token-file", type=Path,
                        help=f"file holding the swarm token (or set ${TOKEN_ENV})")
    parser.add_argument("--model", default=DEFAULT_MODEL_ID,
                        help=f"model id the swarm serves (default {DEFAULT_MODEL_ID})")
    parser.add_argument("--num-blocks", type=int,
                        help="decoder blocks of the model (needed for models not built in: "
                             f"{', '.join(sorted(KNOWN_MODELS))})")
    parser.add_argument("--heartbeat-period", type=float, default=defaults.heartbeat_period_s,
                        metavar="S", help="seconds between a member's heartbeats (default %(default)s)")
    parser.add_argument("--lease", type=float, default=defaults.lease_s, metavar="S",
                        help="evict a member after this many seconds without a heartbeat "
                             "(default %(default)s)")
    parser.add_argument("--restart-grace", type=float, default=defaults.restart_grace_s,
                        metavar="S", help="extra lease for restored members after a restart "
                                          "(default %(default)s)")
    parser.add_argument("--round-window", type=float, default=RoundsConfig().window_s, metavar="S",
                        help="how long a DiLoCo round waits for a span's replicas to ask "
                             "(default %(default)s)")
    parser.add_argument("--round-standing", type=float, default=RoundsConfig().standing_s, metavar="S",
                        help="a replica whose checksum is in a committed round of a job counts towards "
                             "that job's commit majority until it has not asked for a round for this "
                             "long (docs/security.md; default %(default)s)")
    parser.add_argument("--round-trained", type=float, default=RoundsConfig().trained_s, metavar="S",
                        help="where no replica has standing for a job (its round 1), a replica whose "
                             "heartbeat reported a new training step of it in the last S seconds counts "
                             "towards the commit majority (docs/security.md; default %(default)s)")
    parser.add_argument("--quarantine-reporters", type=int, default=QuarantineConfig().reporters, metavar="N",
                        help="distinct reporters (client IPs) whose unverified liar reports quarantine a "
                             "node; one report whose signed evidence other members confirm is enough "
                             "(default %(default)s; docs/security.md)")
    parser.add_argument("--quarantine-period", type=float, default=QuarantineConfig().period_s, metavar="S",
                        help="how long a liar report counts, seconds (default %(default)s)")
    parser.add_argument("--quarantine-unverified", action="store_true",
                        help="count liar reports that carry no signed answer (clients older than signed "
                             "answers) towards --quarantine-reporters; by default they are refused, since "
                             "anyone with the token can make one (docs/security.md)")
    parser.add_argument("--quarantine-tolerance", type=float, default=QuarantineConfig().tolerance, metavar="T",
                        help="relative distance above which a reported node's signed answer is wrong when "
                             "other members re-run it (default %(default)s: the clients' spot-check tolerance)")
    parser.add_argument("--quarantine-verify-timeout", type=float, default=QuarantineConfig().verify_timeout_s,
                        metavar="S", help="seconds for one member to re-run a liar report's evidence "
                                          "(default %(default)s)")
    parser.add_argument("--quarantine-refuted-backoff", type=float, default=QuarantineConfig().refuted_backoff_s,
                        metavar="S", help="seconds a client address whose liar report other members refuted "
                                          "may not report again (each report costs two members a re-run; "
                                          "default %(default)s)")
    parser.add_argument("--checkpoint-max-bytes", type=int, default=RoundsConfig().checkpoint_max_bytes,
                        metavar="BYTES", help="cap on the committed round states (every job's checkpoints) "
                                              "kept in --data-dir; the oldest are pruned beyond it, never a "
                                              "span's last round; 0: no cap (default %(default)s)")
    parser.add_argument("--max-members-per-address", type=int,
                        default=defaults.max_members_per_address, metavar="N",
                        help="live members allowed per source IP, 0: no cap (default %(default)s)")
    parser.add_argument("--rebalance-margin", type=float, default=defaults.rebalance_margin,
                        help="move a node only if the weakest block gains this fraction "
                             "(default %(default)s)")
    parser.add_argument("--rebalance-interval", type=float,
                        default=defaults.rebalance_interval_s, metavar="S",
                        help="seconds between periodic rebalance checks (default %(default)s)")
    parser.add_argument("--dht-host-maddr", action="append", metavar="MADDR",
                        help="listen multiaddr of the bootstrap DHT peer (repeatable; default: "
                             "--host and --dht-port)")
    parser.add_argument("--dht-announce-maddr", action="append", metavar="MADDR",
                        help="multiaddr to advertise for the DHT peer (repeatable; default: "
                             "--announce-host and the DHT port when it differs from --host)")
    parser.add_argument("--no-dht", action="store_true",
                        help="do not run a bootstrap DHT peer (joins get no initial peers)")
    parser.add_argument("--no-relay", action="store_true",
                        help="do not let nodes that cannot be dialled (behind NAT) relay their traffic "
                             "through this coordinator's DHT peer; they then need a member started "
                             "with `pollinate node --relay` (docs/deploy.md)")
    parser.add_argument("--sqlite-synchronous", default="NORMAL",
                        choices=("OFF", "NORMAL", "FULL", "EXTRA"),
                        help="SQLite durability: NORMAL survives a killed process, FULL also "
                             "power loss (default %(default)s)")
    parser.add_argument("--tls-cert", type=Path, metavar="PEM",
                        help="serve gRPC over TLS with this certificate chain (needs --tls-key); "
                             "nodes and clients then connect with TLS, trusting it")
    parser.add_argument("--tls-key", type=Path, metavar="PEM",
                        help="private key of --tls-cert")
    parser.add_argument("--data-tls", action="store_true",
                        help="TLS between nodes and clients too: this coordinator becomes the swarm's CA "
                             "(key and certificate in --data-dir), certifies each node's address and key "
                             "at join, and tells nodes and clients to use TLS (docs/security.md)")
    parser.add_argument("--data-tls-cert-validity", type=float, default=3600.0, metavar="SECONDS",
                        help="lifetime of each node's data-TLS certificate; nodes renew at half of it, and a "
                             "node that left or was quarantined loses its place on the data plane within it "
                             "(default %(default)g)")
    parser.add_argument("--ready-file", type=Path,
                        help="write the bound addresses as JSON here once serving")
    from pollinate.client.cli_args import add_torch_threads_argument

    add_torch_threads_argument(parser)


def required_token(token_file: Path | None) -> str:
    try:
        token = read_token(token_file, os.environ.get(TOKEN_ENV))
    except ValueError as e:
        raise SystemExit(f"pollinate coordinator: {e}") from None
    if not token:
        raise SystemExit(
            f"pollinate coordinator: no swarm token; pass --token-file or set ${TOKEN_ENV}"
        )
    return token


def build_config(args: argparse.Namespace) -> CoordinatorConfig:
    num_blocks = args.num_blocks or KNOWN_MODELS.get(args.model)
    if num_blocks is None:
        raise SystemExit(f"pollinate coordinator: unknown model {args.model!r}; pass --num-blocks")
    return CoordinatorConfig(
        membership=MembershipConfig(
            model_id=args.model, num_blocks=num_blocks,
            heartbeat_period_s=args.heartbeat_period, lease_s=args.lease,
            restart_grace_s=args.restart_grace,
            max_members_per_address=args.max_members_per_address,
            rebalance_margin=args.rebalance_margin,
            rebalance_interval_s=args.rebalance_interval,
        ),
        store=StoreConfig(data_dir=args.data_dir, synchronous=args.sqlite_synchronous),
        rounds=RoundsConfig(window_s=args.round_window, standing_s=args.round_standing,
                            trained_s=args.round_trained, checkpoint_max_bytes=args.checkpoint_max_bytes),
        dht=dht_config(args),
        host=args.host, announce_host=args.announce_host,
        quarantine=QuarantineConfig(reporters=args.quarantine_reporters, period_s=args.quarantine_period,
                                    unverified=args.quarantine_unverified, tolerance=args.quarantine_tolerance,
                                    verify_timeout_s=args.quarantine_verify_timeout,
                                    refuted_backoff_s=args.quarantine_refuted_backoff),
        addresses=AddressCheckConfig(undialable=args.check_addresses, dial_back=args.dial_back,
                                     dial_timeout_s=args.dial_timeout),
        port=args.port, http_port=args.http_port,
        token=required_token(args.token_file), ready_file=args.ready_file,
        tls_cert_file=args.tls_cert, tls_key_file=args.tls_key, data_tls=args.data_tls,
        data_tls_cert_validity_s=args.data_tls_cert_validity,
    )


def dht_config(args: argparse.Namespace) -> DhtConfig:
    """The bootstrap DHT peer listens where gRPC does (--host) and advertises what joiners
    can dial (--announce-host, or the interface address chosen for 0.0.0.0); explicit
    --dht-host-maddr / --dht-announce-maddr replace either."""
    from pollinate.protocol.addresses import choose_announce_host, dht_maddrs, free_port

    if args.no_dht:
        return DhtConfig(enabled=False)
    if not 0 <= args.dht_port <= 65535:
        raise ValueError(f"--dht-port must be in 0..65535, got {args.dht_port}")
    announce = choose_announce_host(args.host, args.announce_host).host
    port = args.dht_port
    if port == 0 and announce != args.host.strip("[]") and not args.dht_announce_maddr:
        port = free_port(args.host)  # an announced multiaddr needs a real port
    host_maddrs, announce_maddrs = dht_maddrs(args.host, announce, port)
    return DhtConfig(host_maddrs=tuple(args.dht_host_maddr or host_maddrs),
                     announce_maddrs=tuple(args.dht_announce_maddr or announce_maddrs),
                     relay=not args.no_relay)


async def serve(config: CoordinatorConfig, dht) -> None:
    import asyncio
    import signal

    from pollinate.coordinator.server import CoordinatorServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = CoordinatorServer(config, dht=dht)
    try:
        await server.start()
        # Everything loaded so far (hivemind pulls in torch: ~200k objects) lives as long as
        # the process; frozen, the collector stops rescanning it, which otherwise stalled the
        # loop 0.1-0.4 s per full collection and was the heartbeats' p99 (issue 4 benchmark).
        gc.freeze()
        await stop.wait()
        logger.info("shutting down")
    finally:
        await server.stop()


def run(args: argparse.Namespace) -> int:
    import asyncio

    from pollinate.coordinator.server import start_bootstrap_dht

    try:
        config = build_config(args)
    except ValueError as e:
        raise SystemExit(f"pollinate coordinator: {e}") from None
    dht = start_bootstrap_dht(config.dht)  # before any gRPC object: it forks (SetupError: one line)
    try:
        asyncio.run(serve(config, dht))
    finally:
        if dht is not None:
            dht.shutdown()
    return 0
