"""`pollinate node`: load a span, serve it over gRPC, announce it on the DHT.

Start-up order matters: the hivemind DHT forks a process, so it starts first, before any
gRPC object exists. Then the span loads, the server binds (port 0 = any free port), the
node announces "joining", measures its throughput unless given, announces "online" and
writes the ready file (JSON: address, dht_maddrs, peer_id) that scripts and tests wait for.
SIGTERM/SIGINT: announce "offline", stop the server with a grace period, exit 0.

With --coordinator HOST:PORT: a subprocess asks the coordinator for its DHT peers (this
process must stay free of gRPC objects until the DHT has started; coordinator/probe.py),
the DHT starts with them, then the node reserves its port, joins (capacity, throughput,
address), loads the span it is assigned (or its --blocks, pinned), heartbeats, and leaves on
SIGTERM. On a MOVE it loads the new span, switches the servicer to it, re-announces and
frees the old one.

Leaving (SIGTERM) or moving, the node first hands each open session to another node serving
the same blocks (node/handoff.py, --handoff: its span inputs, which the replica prefills, or
its KV cache); its client resumes there. A
session no replica takes fails over on the client side by replay, as before.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pollinate.protocol.channels import add_coordinator_tls_argument

    p.add_argument("--blocks", help="blocks to host, START:END (end exclusive), e.g. 10:20; "
                                    "optional with --coordinator (it assigns a span)")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="join this coordinator: it gives the DHT peers and (without --blocks) the span")
    p.add_argument("--num-blocks", dest="capacity_blocks", type=int, metavar="N",
                   help="with --coordinator: host N blocks wherever it puts them (default: as many "
                        "as fit in free memory); refused if N do not fit")
    p.add_argument("--coordinator-timeout", type=float, default=60.0,
                   help="seconds to wait for the coordinator at start-up (default %(default)s)")
    add_coordinator_tls_argument(p)
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded), a local dir or .gguf, or a hub id")
    p.add_argument("--initial-peers", nargs="*", default=[], help="DHT multiaddrs to join (none: start a new DHT)")
    p.add_argument("--host", default=None,
                   help="interface to bind for gRPC and the DHT (default: 127.0.0.1, or 0.0.0.0 when "
                        "--coordinator is on another machine)")
    p.add_argument("--announce-host", metavar="HOST",
                   help="address other machines reach this node at, told to the coordinator and the DHT "
                        "(default: --host, or with 0.0.0.0 the address of the interface that reaches "
                        "the coordinator); behind a router, its public address (forward the ports)")
    p.add_argument("--dht-port", type=int, default=0,
                   help="TCP port of this node's DHT peer (default 0: any free port; fix it to open "
                        "it in a firewall or forward it)")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0: any free port)")
    p.add_argument("--reachability", choices=("auto", "direct", "relay"), default="auto",
                   help="auto (default): the coordinator tries to connect to this node's announced port "
                        "and, if it cannot (a home router), the node serves through a relay; direct: "
                        "never relay (the port is forwarded); relay: always serve through a relay")
    p.add_argument("--relay-check-period", type=float, default=5.0, metavar="S",
                   help="behind a relay: ask the coordinator to reach this node every S seconds; after two "
                        "misses (its relays died) reserve at the relays on offer and re-join (default 5)")
    p.add_argument("--relay", dest="offer_relay", action="store_true",
                   help="let nodes that cannot be dialled relay their traffic through this node's DHT "
                        "peer (it must be reachable; costs this node the bandwidth it relays)")
    p.add_argument("--ready-file", type=Path, help="write {address, dht_maddrs, peer_id} here once serving")
    p.add_argument("--token-file", type=Path, help="file holding the swarm token (or set $POLLINATE_TOKEN)")
    p.add_argument("--identity-file", type=Path, metavar="PEM",
                   help="this node's key pair, made there on first use: its identity as a member and its TLS "
                        "key (default: <cache-dir>/identity/node-PORT.pem with a fixed --port, else a new "
                        "key per process; docs/security.md)")
    p.add_argument("--cache-dir", type=Path, help="converted-model cache (default ~/.cache/pollinate)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N'")
    p.add_argument("--dtype", default="auto", help="'auto', 'float32', 'bfloat16', 'float16'")
    p.add_argument("--quant", default="none", choices=("none", "int8", "int4", "auto"),
                   help="hold the span's Linear weights quantised (torchao weight-only; docs/models.md); "
                        "auto: int4 on CUDA when the span would not fit otherwise [none]")
    p.add_argument("--throughput", type=parse_throughput, default="auto",
                   help="tokens/s to announce: 'auto' (measured once per model, device, dtype and span "
                        "length, then cached), 'eval' (measure again) or a number")
    p.add_argument("--cache-tokens", type=int, default=8192, help="KV-cache budget in tokens over all sessions")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="close sessions idle this long, seconds")
    from pollinate.node.sessions import SessionConfig  # no torch: cheap to import here

    p.add_argument("--cache-peer-share", type=float, default=SessionConfig().peer_share,
                   help="most of --cache-tokens the sessions of one peer (the caller's IP) may reserve, "
                        "in (0, 1] (default %(default)s; docs/security.md)")
    p.add_argument("--batch-window-ms", type=float, default=50.0,
                   help="longest a session's step waits for other active sessions' steps to share its "
                        "pass of the span, ms (default %(default)s; never longer than the last pass took, "
                        "no wait once every active session has a step pending; 0: take what is pending; "
                        "docs/serving.md)")
    p.add_argument("--max-batch-sessions", type=int, default=16,
                   help="most sessions' steps in one pass (default %(default)s; 1 turns batching off)")
    p.add_argument("--max-batch-tokens", type=int, default=2048,
                   help="most new tokens in one pass, prefills counted whole (default %(default)s)")
    p.add_argument("--kept-inputs-mb", type=float, default=256.0,
                   help="memory for trainers' Forward inputs kept for their Backward, MiB (default 256; "
                        "0 keeps none: every Backward then carries its input again)")
    p.add_argument("--kept-inputs-ttl", type=float, default=300.0,
                   help="longest a kept Forward input waits for its Backward, seconds (default 300)")
    p.add_argument("--max-jobs", type=int, default=16,
                   help="training jobs this node holds at once; more are refused (default 16)")
    p.add_argument("--jobs-memory-mb", type=float, default=2048.0,
                   help="memory the jobs' adapters and optimizer state may take, MiB (default 2048)")
    p.add_argument("--receive-peer-mb", type=float, default=256.0,
                   help="memory the tensors one peer (the caller's IP) is still sending may hold, reserved "
                        "from each tensor's declared size at its first chunk; past it RESOURCE_EXHAUSTED "
                        "(default %(default)s; docs/security.md)")
    p.add_argument("--handoff", choices=("recompute", "lossless", "lossy", "off"), default="recompute",
                   help="on SIGTERM or a move, hand open sessions to a replica of the same blocks: recompute "
                        "(default; sends each session's span inputs, which the replica prefills: exact, ~0.15-0.3 "
                        "of the fp16 cache's bytes), lossless (the KV cache itself, exact; an fp32 cache travels "
                        "at ~1.7x its fp16 size) or lossy (CacheGen-style, --handoff-bits; smaller, may change "
                        "the next tokens): docs/serving.md; off: clients replay their history elsewhere")
    p.add_argument("--handoff-bits", type=int, default=8, help="--handoff lossy: bits per value, 2-8 (default 8)")
    p.add_argument("--handoff-hold", type=float, default=60.0,
                   help="seconds a session handed to this node waits for its client (default 60)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: default)")
    p.add_argument("--announce-expiration", type=float, default=60.0, help="DHT record lifetime, seconds")
    p.add_argument("--round-exchange-timeout", type=float, default=60.0,
                   help="DiLoCo rounds: longest wait for each other replica's shard result, seconds "
                        "(default %(default)s; raise it on a slow link)")
    p.add_argument("--round-contribution-wait", type=float, default=10.0,
                   help="DiLoCo rounds: how long this node, as a shard's owner, waits for the other "
                        "replicas' contributions before averaging those that arrived, seconds "
                        "(default %(default)s; below --round-exchange-timeout)")


def parse_throughput(text: str) -> float | str:
    from pollinate.node.throughput import parse_throughput as parse

    try:
        return parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _initial_throughput(config) -> float:
    """What the node claims before it has measured: the override, or a placeholder of 1."""
    return 1.0 if isinstance(config.throughput, str) else config.throughput


def _coordinator_tls(config) -> dict:
    return {"tls": config.coordinator_tls, "tls_root_cert_file": config.coordinator_tls_root_cert_file}


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--blocks must look like START:END, got {text!r}") from None
    return start, end


def build_config(args: argparse.Namespace):
    from pollinate.node.announce import AnnounceConfig
    from pollinate.compression.kv_codec import KVCodecConfig
    from pollinate.node.batching import BatchingConfig
    from pollinate.node.config import NodeConfig, ServingConfig, default_identity_file
    from pollinate.node.handoff import HandoffConfig
    from pollinate.node.kept_inputs import KeptInputsConfig
    from pollinate.node.rounds import RoundConfig
    from pollinate.node.sessions import SessionConfig
    from pollinate.protocol.auth import TOKEN_ENV, read_token
    from pollinate.protocol.channels import coordinator_tls

    tls = coordinator_tls(args.coordinator_tls)
    start, end = parse_blocks(args.blocks) if args.blocks else (None, None)
    token = read_token(args.token_file, os.environ.get(TOKEN_ENV))
    host, announce = bind_and_announce(args)
    return NodeConfig(
        coordinator=args.coordinator,
        capacity_blocks=args.capacity_blocks,
        coordinator_timeout_s=args.coordinator_timeout,
        coordinator_tls=tls["tls"],
        coordinator_tls_root_cert_file=tls["tls_root_cert_file"],
        model=args.model,
        start=start,
        end=end,
        cache_dir=args.cache_dir,
        host=host,
        announce_host=announce,
        port=args.port,
        dht_port=args.dht_port,
        reachability=args.reachability,
        offer_relay=args.offer_relay,
        relay_check_period_s=args.relay_check_period,
        token=token or None,
        initial_peers=tuple(args.initial_peers),
        ready_file=args.ready_file,
        identity_file=args.identity_file or default_identity_file(args.cache_dir, args.port),
        device=args.device,
        dtype=args.dtype,
        quant=args.quant,
        throughput=args.throughput,
        torch_threads=args.torch_threads,
        sessions=SessionConfig(budget_tokens=args.cache_tokens, idle_timeout_s=args.idle_timeout,
                               peer_share=args.cache_peer_share),
        serving=ServingConfig(kept_inputs=KeptInputsConfig(max_bytes=int(args.kept_inputs_mb * (1 << 20)),
                                                           ttl_s=args.kept_inputs_ttl),
                              max_jobs=args.max_jobs, jobs_memory_bytes=int(args.jobs_memory_mb * (1 << 20)),
                              receive_peer_bytes=int(args.receive_peer_mb * (1 << 20)),
                              batching=BatchingConfig(window_ms=args.batch_window_ms,
                                                      max_sessions=args.max_batch_sessions,
                                                      max_tokens=args.max_batch_tokens)),
        announce=AnnounceConfig(expiration_s=args.announce_expiration),
        handoff=HandoffConfig(enabled=args.handoff != "off", hold_s=args.handoff_hold,
                              recompute=args.handoff == "recompute",
                              codec=KVCodecConfig(mode="lossy" if args.handoff == "lossy" else "lossless",
                                                  bits=args.handoff_bits)),
        rounds=RoundConfig(exchange_timeout_s=args.round_exchange_timeout,
                           contribution_wait_s=args.round_contribution_wait),
    )


def bind_and_announce(args: argparse.Namespace) -> tuple[str, str]:
    """(host to bind, host to announce), logged when they differ. Without --host a node joining
    a coordinator on another machine binds every interface, so that machine can reach it."""
    from pollinate.protocol.addresses import choose_announce_host, is_loopback, split_host_port

    towards = None
    if args.coordinator:
        towards = split_host_port(args.coordinator)[0]
    elif args.initial_peers:
        from pollinate.protocol.addresses import maddr_host

        towards = maddr_host(args.initial_peers[0])
    host = args.host
    if host is None:
        host = "0.0.0.0" if towards is not None and not is_loopback(towards) else "127.0.0.1"
    choice = choose_announce_host(host, args.announce_host, towards=towards)
    if choice.host != host:
        logger.info("binding %s, announcing %s (%s)", host, choice.host, choice.reason)
    return host, choice.host


def run(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except ValueError as e:
        raise SystemExit(f"pollinate node: {e}") from None
    from pollinate.node.announce import start_dht
    from pollinate.node.reachability import Reachability

    peers = list(config.initial_peers)
    reach = Reachability(relayed=False)
    if config.coordinator is not None:
        # The DHT must start before any gRPC object exists here, so the coordinator is asked
        # for its DHT peers (and to dial this node's port back) from a subprocess.
        config, info, reach = _probe(config)
        peers += [p for p in info.dht_initial_peers if p not in peers]
        from pollinate.protocol.data_tls import use_swarm_ca

        use_swarm_ca(info.data_tls_ca_pem)  # --data-tls swarm: dial peers over TLS (no gRPC object yet)
    from pollinate.protocol.addresses import dht_maddrs, free_port

    port = config.dht_port
    if port == 0 and config.announce_host != config.host.strip("[]"):
        port = free_port(config.host)  # an announced multiaddr needs a real port
    host_maddrs, announce_maddrs = dht_maddrs(config.host, config.announce_host, port)
    # before any gRPC object exists; a DHT that cannot bootstrap raises SetupError (one line).
    # Behind NAT the DHT peer only dials out (client mode): nobody could dial it.
    dht = start_dht(peers, host_maddrs=host_maddrs, announce_maddrs=announce_maddrs,
                    client_mode=reach.relayed, relay=config.offer_relay)
    try:
        return asyncio.run(serve(config, dht, reach))
    finally:
        dht.shutdown()


def _probe(config):
    """(config with its gRPC port fixed, SwarmInfo, Reachability): the coordinator's Status and,
    with --reachability auto, its dial-back of this node's port while a socket listens there."""
    import dataclasses

    from pollinate.coordinator.probe import ProbeError, probe_coordinator
    from pollinate.node.reachability import decide
    from pollinate.protocol.addresses import is_loopback, join_host_port

    check_address, listener = None, None
    # An announced loopback or wildcard host is a setting to fix, not a NAT: Join says which.
    if config.reachability == "auto" and not is_loopback(config.announce_host) \
            and config.announce_host not in ("0.0.0.0", "::"):
        listener = _reserve_port(config.host, config.port)
        config = dataclasses.replace(config, port=listener.getsockname()[1])  # served on it later
        check_address = join_host_port(config.announce_host, config.port)
    try:
        info = probe_coordinator(config.coordinator, config.token, timeout_s=config.coordinator_timeout_s,
                                 check_address=check_address, **_coordinator_tls(config))
    except ProbeError as e:
        raise SystemExit(f"pollinate node: {e}") from None
    finally:
        if listener is not None:
            listener.close()  # before the DHT forks, or its process would hold the port
    reach = decide(config.reachability, checked_address=check_address, reachable=info.reachable,
                   detail=info.unreachable_detail, relays=info.relays)
    return config, info, reach


def _write_ready(path: Path, info: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) host:port so the port is ours before the gRPC server exists: a
    coordinator member names its address in Join, before its span (hence its server) loads.
    RpcServer refuses SO_REUSEPORT, so the caller closes this socket just before binding the
    server; in that instant another process could only take the port by asking for exactly it
    or by the kernel's random pick of a free port landing on it."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's own bind does
    sock.bind((host.strip("[]"), port))
    # Listening already: the coordinator's dial-back at Join (coordinator/address_check.py)
    # completes a TCP handshake here before the span has loaded and the server exists.
    sock.listen(8)
    return sock


def _choose_quant(config, files, placement) -> str:
    """--quant, with "auto" resolved for this device and the blocks wanted (node/sizing.py);
    logged with the reason."""
    from pollinate.node.quant import int4_unavailable
    from pollinate.node.sizing import BlockShape, choose_quant, free_memory_bytes

    if config.start is not None:
        wanted = config.end - config.start
    else:
        wanted = min(config.capacity_blocks or files.num_blocks, files.num_blocks)
    auto_cuda = config.quant == "auto" and placement.device.type == "cuda"
    quant, why = choose_quant(config.quant, device_type=placement.device.type,
                              free_bytes=free_memory_bytes(placement.device) if auto_cuda else None,
                              shape=BlockShape.from_config(files.config), dtype=placement.dtype,
                              wanted_blocks=wanted,
                              int4_unavailable=int4_unavailable(placement.device) if auto_cuda else "")
    logger.info("quantisation: %s (%s)", quant, why)
    return quant


def _capacity_blocks(config, files, placement, quant: str) -> int:
    """Blocks to offer the coordinator: --blocks' length, --capacity-blocks, or what fits."""
    if config.start is not None:
        return config.end - config.start
    from pollinate.node.sizing import BlockShape, SizingConfig, choose_num_blocks, free_memory_bytes

    sizing = SizingConfig(session_inputs=config.handoff.enabled and config.handoff.recompute)
    fit, _ = choose_num_blocks(free_memory_bytes(placement.device), BlockShape.from_config(files.config),
                               placement.dtype, sizing, requested=config.capacity_blocks, quant=quant)
    return min(fit, files.num_blocks)


async def serve(config, dht, reach=None) -> int:
    """Join (with a coordinator), load the span, serve and announce it until SIGTERM/SIGINT.
    `reach` (node/reachability.py): relayed, the node serves through relays."""
    import torch

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    node = _Node(config, dht, reach)
    await node.open_model()
    start, end, port, reservation = await node.join()
    await node.start_serving(start, end, port, reservation)
    watchdog = asyncio.create_task(node.keep_relayed(port)) if node.relay is not None else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if watchdog is not None:
        watchdog.cancel()
    await node.stop()
    return 0


class _Node:
    """One `pollinate node` process: its coordinator membership, the span it serves (swapped
    when the coordinator moves it), its gRPC server and its DHT announcements."""

    def __init__(self, config, dht, reach=None) -> None:
        self.config = config
        self.dht = dht
        self.reach = reach  # Reachability decided before the DHT started; None: direct
        self.relay = None  # protocol/relay.py's RelayedServer when this node cannot be dialled
        self.files = None  # ModelFiles, once open_model() ran
        self.placement = None  # device and dtype
        self.quant = "none"  # the span's quantisation: config.quant with "auto" resolved
        self.member = None  # CoordinatorClient with a coordinator
        self.servicer = None
        self.rpc = None
        self.server = None  # the SpanServer being served; replaced by a move
        self.announcer = None  # its Announcer
        self.address = ""  # host:port others dial, or the relayed address
        self.identity = _identity(config)  # its key pair (protocol/identity.py)
        self.tls_chain: bytes | None = None  # --data-tls swarms: the swarm CA's certificate for it
        self.renewal: asyncio.Task | None = None  # --data-tls swarms: keeps tls_chain fresh
        self.lock = asyncio.Lock()  # a move waits for the first span, and for another move

    async def open_model(self) -> None:
        from pollinate.node.device import resolve_placement
        from pollinate.node.model_files import open_model

        self.placement = resolve_placement(self.config.device, self.config.dtype)
        self.files = await asyncio.to_thread(open_model, self.config.model, cache_dir=self.config.cache_dir,
                                             show_progress=False)
        self.quant = _choose_quant(self.config, self.files, self.placement)

    async def load(self, start: int, end: int):
        from pollinate.node.span_server import SpanServer

        span = await asyncio.to_thread(self.files.load_span, start, end, dtype=self.placement.dtype,
                                       device=self.placement.device, quant=self.quant)
        server = SpanServer(span, model_id=self.config.model, num_blocks=self.files.num_blocks,
                            hidden_size=self.files.hidden_size, serving=self.config.serving,
                            sessions=self.config.sessions)
        await server.start_sweeper()
        return server

    def announcer_for(self, server, address: str, throughput: float):
        from pollinate.node.announce import Announcer

        return Announcer(self.dht, model_id=self.config.model, start=server.start, end=server.end,
                         address=address, throughput=throughput,
                         cache_tokens_left=lambda: server.sessions.tokens_left, config=self.config.announce,
                         token=self.config.token, quant=server.span.quant)

    async def measure(self, server) -> float:
        """The throughput to announce for `server`'s span (config.throughput 'auto'/'eval')."""
        from pollinate.node.model_files import DEFAULT_CACHE_DIR
        from pollinate.node.throughput import resolve_throughput

        return await asyncio.to_thread(
            resolve_throughput, self.config.throughput, server.span, model_id=self.config.model,
            cache_dir=self.config.cache_dir or DEFAULT_CACHE_DIR, device_name=self.placement.device_name)

    async def join(self) -> tuple[int, int, int, socket.socket | None]:
        """(start, end, port, reservation): the span to serve (the coordinator's assignment, or
        --blocks without one) and the port, reserved before Join names it."""
        from pollinate.coordinator.client import CoordinatorClient, CoordinatorClientConfig
        from pollinate.protocol.shared import Span
        from pollinate.protocol.addresses import join_host_port

        config = self.config
        if config.coordinator is None:
            return config.start, config.end, config.port, None
        reservation = _reserve_port(config.host, config.port)
        port = reservation.getsockname()[1]
        address = join_host_port(config.announce_host, port)
        if self.reach is not None and self.reach.relayed:  # listening already: streams queue on the port
            from pollinate.node.reachability import coordinator_check, serve_relayed

            self.relay, address = await serve_relayed(
                self.reach, port, host=config.host, timeout_s=config.coordinator_timeout_s,
                check=coordinator_check(config.coordinator, config.token, _coordinator_tls(config)))
        self.address = address
        requested = Span(config.start, config.end) if config.start is not None else None
        self.member = CoordinatorClient(CoordinatorClientConfig(
            coordinator=config.coordinator, token=config.token, address=address,
            capacity_blocks=_capacity_blocks(config, self.files, self.placement, self.quant),
            throughput=_initial_throughput(config), requested_span=requested,
            join_timeout_s=config.coordinator_timeout_s, name=f"node-{port}",
            relay_maddr=_relay_maddr(self.dht) if config.offer_relay else "", quant=self.quant,
            identity=self.identity, **_coordinator_tls(config),
        ), on_move=self.move)
        assignment = await self.member.start()
        if assignment.data_tls_ca_pem:  # the coordinator runs --data-tls: serve with its certificate
            from pollinate.protocol.data_tls import use_swarm_ca

            from pollinate.protocol.errors import PollinateError

            use_swarm_ca(assignment.data_tls_ca_pem)
            try:
                chain, valid_s = await self.member.data_tls_certificate()
            except PollinateError as e:
                await self.member.stop(leave=True)
                raise SystemExit(f"pollinate node: the coordinator runs --data-tls but gave no certificate: "
                                 f"{type(e).__name__}: {e}") from None
            self.tls_chain = chain.encode()
            logger.info("serving TLS with the swarm CA's certificate for %s (identity %s), valid for %.0f s",
                        address, self.identity.fingerprint, valid_s)
            self.renewal = asyncio.create_task(self.keep_certificate(valid_s), name="data-tls-renewal")
        if assignment.num_blocks != self.files.num_blocks:
            await self.member.stop(leave=True)
            raise SystemExit(f"pollinate node: the swarm's model {assignment.model_id!r} has "
                             f"{assignment.num_blocks} blocks, {config.model!r} has {self.files.num_blocks}")
        logger.info("coordinator %s assigned blocks %d:%d (member %s, epoch %d)", config.coordinator,
                    assignment.span.start, assignment.span.end, assignment.member_id, assignment.epoch)
        return assignment.span.start, assignment.span.end, port, reservation

    async def keep_certificate(self, valid_s: float) -> None:
        """Renew the data-TLS certificate at half its lifetime, from now on (while the span
        loads too), into the running server once there is one (node/certificate_renewal.py)."""
        from pollinate.node.certificate_renewal import keep_renewed

        def install(chain: bytes) -> None:
            self.tls_chain = chain  # what the server starts with if it has not yet
            if self.rpc is not None:
                self.rpc.replace_certificate(chain)

        try:
            await keep_renewed(self.member.data_tls_certificate, install, valid_s=valid_s,
                               config=self.config.certificate_renewal)
        except Exception:  # a bug: say so at once rather than when the certificate expires
            logger.exception("renewing the data-TLS certificate stopped; it expires in at most %.0f s", valid_s)

    async def start_serving(self, start: int, end: int, port: int, reservation: socket.socket | None) -> None:
        """Load the span, bind, announce 'joining', measure, announce 'online', write the ready file."""
        from pollinate.protocol.shared import Span
        from pollinate.node.servicer import NodeServicer, add_to_server
        from pollinate.protocol.addresses import join_host_port
        from pollinate.protocol.channels import RpcServer, ServerConfig

        config = self.config
        async with self.lock:  # a MOVE arriving while the first span loads waits for it
            self.server = await self.load(start, end)
            tls = {"tls_cert_pem": self.tls_chain, "tls_key_pem": self.identity.private_pem()} \
                if self.tls_chain else {}
            self.rpc = RpcServer(ServerConfig(host=config.host, port=port, token=config.token, **tls))
            self.servicer = NodeServicer(self.server, throughput=_initial_throughput(config),
                                         identity=self.identity, handoff=config.handoff)
            if self.member is not None:  # DiLoCo rounds need the coordinator (node/rounds.py)
                from pollinate.node.rounds import RoundDriver

                member = self.member
                self.servicer.jobs.rounds = RoundDriver(
                    config.rounds, coordinator_address=config.coordinator, token=config.token,
                    member_id=lambda: member.member_id, identity=self.identity,
                    framing=self.servicer.framing, **_coordinator_tls(config))
                self.servicer.jobs.on_first_step = member.beat_soon
            add_to_server(self.rpc, self.servicer)
            if reservation is not None:
                reservation.close()
            await self.rpc.start()
            if self.relay is None:
                self.address = join_host_port(config.announce_host, self.rpc.port)  # what others dial
            self.announcer = self.announcer_for(self.server, self.address, self.servicer.throughput)
            await asyncio.to_thread(self.announcer.announce, "joining")
            if isinstance(config.throughput, str):
                self.servicer.throughput = self.announcer.throughput = await self.measure(self.server)
            await asyncio.to_thread(self.announcer.start)
            if self.member is not None:
                self.member.set_throughput(self.servicer.throughput)
                # batch sizes and queue waits ride on the heartbeats (`pollinate status`); the
                # servicer's server is the one serving now, also after a MOVE
                self.member.set_load(lambda: self.servicer.server.worker.stats.to_proto())
                self.member.set_trained(lambda: self.servicer.jobs.trained_steps())
                self.member.set_serving(Span(start, end))
        logger.info("serving blocks %d:%d of %s at %s (%.1f tokens/s, %d-token cache budget), peer %s",
                    start, end, config.model, self.address, self.servicer.throughput,
                    config.sessions.budget_tokens, self.announcer.peer_id)
        if config.ready_file is not None:
            _write_ready(config.ready_file, {
                "address": self.address,
                "dht_maddrs": [str(m) for m in self.dht.get_visible_maddrs()],
                "peer_id": self.announcer.peer_id,
                "blocks": [start, end],
                "throughput": self.servicer.throughput,
                "member_id": self.member.member_id if self.member is not None else None,
                "relayed": self.relay is not None,
            })

    async def keep_relayed(self, port: int) -> None:
        """A relayed node whose relays all died reserves at those on offer now and serves at
        its new relayed address: re-joins the coordinator, re-announces its blocks."""
        from pollinate.node.reachability import (Reachability, coordinator_check, coordinator_relays,
                                                 serve_relayed, watch_relays)

        config = self.config
        check = coordinator_check(config.coordinator, config.token, _coordinator_tls(config))
        relays = coordinator_relays(config.coordinator, config.token, _coordinator_tls(config))
        while True:
            offered = await watch_relays(self.address, check=check, relays=relays,
                                         period_s=config.relay_check_period_s)
            try:
                relay, address = await serve_relayed(
                    Reachability(relayed=True, relays=offered, why="its relays are gone"), port,
                    host=config.host, timeout_s=config.coordinator_timeout_s, check=check)
            except SystemExit as exc:  # no reservation yet: try again at the next check
                logger.warning("%s", exc)
                continue
            except Exception as exc:  # the coordinator's check failed: the same; never end the watchdog
                logger.warning("reserving at the relays on offer failed (%s); trying again at the next check",
                               f"{type(exc).__name__}: {exc}")
                continue
            async with self.lock:
                old_relay, old_announcer = self.relay, self.announcer
                self.relay, self.address = relay, address
                await self.member.change_address(address)
                self.announcer = self.announcer_for(self.server, address, self.servicer.throughput)
                await asyncio.to_thread(old_announcer.stop)
                await asyncio.to_thread(self.announcer.start)
                await old_relay.stop()
            logger.info("serving blocks %d:%d at the new relayed address %s", self.server.start, self.server.end,
                        address)

    async def move(self, span, reason: str) -> None:
        """The coordinator moved this node: load the new span, switch the servicer to it,
        'offline' for the old blocks, 'online' for the new, free the old span."""
        async with self.lock:
            old, old_announcer = self.server, self.announcer
            if (old.start, old.end) == (span.start, span.end):
                return
            logger.info("moving from blocks %d:%d to %s (%s): loading", old.start, old.end, span, reason)
            new = await self.load(span.start, span.end)
            if isinstance(self.config.throughput, str):  # measured: the figure is per span length
                self.servicer.throughput = await self.measure(new)
                self.member.set_throughput(self.servicer.throughput)  # sent with the next heartbeat
            announcer = self.announcer_for(new, self.address, self.servicer.throughput)
            self.servicer.server = new  # new calls go to the new span; open sessions on the old
            await self.hand_off(old)  # move to a replica of the old blocks, or fail over by replay
            await asyncio.to_thread(old_announcer.stop)  # "offline" for the old blocks first,
            await asyncio.to_thread(announcer.start)  # then "online" (newer) for the new ones
            await old.shutdown()
            self.server, self.announcer = new, announcer
            logger.info("now serving blocks %d:%d", new.start, new.end)

    async def hand_off(self, server) -> None:
        """Hand `server`'s open sessions to other nodes serving its blocks (node/handoff.py)."""
        from pollinate.node.handoff import find_replicas, hand_off_sessions
        from pollinate.protocol.channels import open_channel, peer_channel_config
        from pollinate.protocol.v1 import node_pb2_grpc

        cfg = self.config.handoff
        if not cfg.enabled or not any(s.handoff is not None for s in server.sessions.all()):
            return
        try:
            replicas = await find_replicas(self.dht, model_id=self.config.model, num_blocks=self.files.num_blocks,
                                           start=server.start, end=server.end, exclude=self.announcer.peer_id,
                                           token=self.config.token, timeout_s=cfg.lookup_timeout_s)
        except Exception as e:  # the DHT is best effort here: without replicas every client replays
            logger.warning("handoff: looking up replicas of blocks %d:%d failed: %s", server.start, server.end, e)
            replicas = []
        channels = {}

        def stub(address: str):
            if address not in channels:
                channels[address] = open_channel(address, peer_channel_config(self.config.token))
            return node_pb2_grpc.NodeStub(channels[address])

        try:
            await hand_off_sessions(server, replicas, stub, cfg)
        except Exception:  # never in the way of leaving or moving: the clients replay
            logger.exception("handing off the sessions of blocks %d:%d failed", server.start, server.end)
        finally:
            for channel in channels.values():
                await channel.close()

    async def stop(self) -> None:
        logger.info("shutting down: leaving the swarm, handing sessions off, announcing offline, draining")
        self.servicer.serving = False  # refuses handoffs from others: this node is going too
        if self.renewal is not None:
            self.renewal.cancel()
        await self.hand_off(self.server)
        if self.member is not None:
            await self.member.stop(leave=True)
        await asyncio.to_thread(self.announcer.stop)
        await self.rpc.stop()
        if self.relay is not None:
            await self.relay.stop()
        await self.server.shutdown()


def _identity(config):
    """The node's key pair: from its identity file (made there on first use), or a new one."""
    from pollinate.protocol.identity import NodeIdentity

    path = config.identity_file
    if path is None:
        return NodeIdentity.generate()
    try:
        identity = NodeIdentity.load_or_create(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"pollinate node: --identity-file: {e}") from None
    logger.info("identity %s (%s)", identity.fingerprint, path)
    return identity


def _relay_maddr(dht) -> str:
    """The multiaddr this node offers as a circuit relay (--relay): its DHT peer's."""
    from pollinate.protocol.addresses import dialable_maddrs

    maddrs = dialable_maddrs(dht.get_visible_maddrs())
    if not maddrs:
        raise SystemExit("pollinate node: --relay needs a DHT peer others can dial; it has none "
                         "(set --announce-host and --dht-port)")
    return maddrs[0]
