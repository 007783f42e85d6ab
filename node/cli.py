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
frees the old one; sessions open on the old span fail over on the client side.
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
    p.add_argument("--relay", dest="offer_relay", action="store_true",
                   help="let nodes that cannot be dialled relay their traffic through this node's DHT "
                        "peer (it must be reachable; costs this node the bandwidth it relays)")
    p.add_argument("--ready-file", type=Path, help="write {address, dht_maddrs, peer_id} here once serving")
    p.add_argument("--token-file", type=Path, help="file holding the swarm token (or set $POLLINATE_TOKEN)")
    p.add_argument("--cache-dir", type=Path, help="converted-model cache (default ~/.cache/pollinate)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N'")
    p.add_argument("--dtype", default="auto", help="'auto', 'float32', 'bfloat16', 'float16'")
    p.add_argument("--quant", default="none", choices=("none", "int8", "int4"),
                   help="hold the span's Linear weights quantised (torchao weight-only; docs/models.md) [none]")
    p.add_argument("--throughput", type=parse_throughput, default="auto",
                   help="tokens/s to announce: 'auto' (measured once per model, device, dtype and span "
                        "length, then cached), 'eval' (measure again) or a number")
    p.add_argument("--cache-tokens", type=int, default=8192, help="KV-cache budget in tokens over all sessions")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="close sessions idle this long, seconds")
    p.add_argument("--kept-inputs-mb", type=float, default=256.0,
                   help="memory for trainers' Forward inputs kept for their Backward, MiB (default 256; "
                        "0 keeps none: every Backward then carries its input again)")
    p.add_argument("--kept-inputs-ttl", type=float, default=300.0,
                   help="longest a kept Forward input waits for its Backward, seconds (default 300)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: default)")
    p.add_argument("--announce-expiration", type=float, default=60.0, help="DHT record lifetime, seconds")


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
    from pollinate.node.config import NodeConfig, ServingConfig
    from pollinate.node.kept_inputs import KeptInputsConfig
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
        token=token or None,
        initial_peers=tuple(args.initial_peers),
        ready_file=args.ready_file,
        device=args.device,
        dtype=args.dtype,
        quant=args.quant,
        throughput=args.throughput,
        torch_threads=args.torch_threads,
        sessions=SessionConfig(budget_tokens=args.cache_tokens, idle_timeout_s=args.idle_timeout),
        serving=ServingConfig(kept_inputs=KeptInputsConfig(max_bytes=int(args.kept_inputs_mb * (1 << 20)),
                                                           ttl_s=args.kept_inputs_ttl)),
        announce=AnnounceConfig(expiration_s=args.announce_expiration),
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


def _capacity_blocks(config, files, placement) -> int:
    """Blocks to offer the coordinator: --blocks' length, --capacity-blocks, or what fits."""
    if config.start is not None:
        return config.end - config.start
    from pollinate.node.sizing import BlockShape, choose_num_blocks, free_memory_bytes

    fit, _ = choose_num_blocks(free_memory_bytes(placement.device), BlockShape.from_config(files.config),
                               placement.dtype, requested=config.capacity_blocks, quant=config.quant)
    return min(fit, files.num_blocks)


async def serve(config, dht, reach=None) -> int:
    import torch

    from pollinate.coordinator.client import CoordinatorClient, CoordinatorClientConfig
    from pollinate.coordinator.placement import Span
    from pollinate.node.announce import Announcer
    from pollinate.node.device import resolve_placement
    from pollinate.node.model_files import DEFAULT_CACHE_DIR, open_model
    from pollinate.node.throughput import resolve_throughput
    from pollinate.node.servicer import NodeServicer, add_to_server
    from pollinate.node.span_server import SpanServer
    from pollinate.protocol.addresses import join_host_port
    from pollinate.protocol.channels import RpcServer, ServerConfig

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    placement = resolve_placement(config.device, config.dtype)
    files = await asyncio.to_thread(open_model, config.model, cache_dir=config.cache_dir, show_progress=False)

    async def load(start: int, end: int) -> SpanServer:
        span = await asyncio.to_thread(
            files.load_span, start, end, dtype=placement.dtype, device=placement.device, quant=config.quant
        )
        server = SpanServer(
            span, model_id=config.model, num_blocks=files.num_blocks, hidden_size=files.hidden_size,
            serving=config.serving, sessions=config.sessions,
        )
        await server.start_sweeper()
        return server

    def announcer_for(server: SpanServer, address: str, throughput: float) -> Announcer:
        return Announcer(
            dht, model_id=config.model, start=server.start, end=server.end, address=address,
            throughput=throughput, cache_tokens_left=lambda: server.sessions.tokens_left,
            config=config.announce,
        )

    # The span being served; swapped under `lock` when the coordinator moves this node.
    current: dict = {}
    lock = asyncio.Lock()

    async def move(span: Span, reason: str) -> None:
        async with lock:
            old, old_announcer = current["server"], current["announcer"]
            if (old.start, old.end) == (span.start, span.end):
                return
            logger.info("moving from blocks %d:%d to %s (%s): loading", old.start, old.end, span, reason)
            new = await load(span.start, span.end)
            if isinstance(config.throughput, str):  # measured: the figure is per span length
                servicer.throughput = await asyncio.to_thread(
                    resolve_throughput, config.throughput, new.span, model_id=config.model,
                    cache_dir=config.cache_dir or DEFAULT_CACHE_DIR, device_name=placement.device_name,
                )
                member.set_throughput(servicer.throughput)  # sent with the next heartbeat
            announcer = announcer_for(new, current["address"], servicer.throughput)
            servicer.server = new  # new calls go to the new span; open sessions on the old fail over
            await asyncio.to_thread(old_announcer.stop)  # "offline" for the old blocks first,
            await asyncio.to_thread(announcer.start)  # then "online" (newer) for the new ones
            await old.shutdown()
            current.update(server=new, announcer=announcer)
            logger.info("now serving blocks %d:%d", new.start, new.end)

    member = None
    reservation = None
    relay = None  # protocol/relay.py's RelayedServer when this node cannot be dialled
    port = config.port
    if config.coordinator is not None:
        reservation = _reserve_port(config.host, config.port)
        port = reservation.getsockname()[1]
        address = join_host_port(config.announce_host, port)
        if reach is not None and reach.relayed:
            from pollinate.node.reachability import coordinator_check, serve_relayed

            relay, address = await serve_relayed(
                reach, port, host=config.host, timeout_s=config.coordinator_timeout_s,
                check=coordinator_check(config.coordinator, config.token, _coordinator_tls(config)))
        requested = Span(config.start, config.end) if config.start is not None else None
        member = CoordinatorClient(CoordinatorClientConfig(
            coordinator=config.coordinator, token=config.token, address=address,
            capacity_blocks=_capacity_blocks(config, files, placement),
            throughput=_initial_throughput(config), requested_span=requested,
            join_timeout_s=config.coordinator_timeout_s, name=f"node-{port}",
            relay_maddr=_relay_maddr(dht) if config.offer_relay else "",
            **_coordinator_tls(config),
        ), on_move=move)
        assignment = await member.start()
        if assignment.num_blocks != files.num_blocks:
            await member.stop(leave=True)
            raise SystemExit(f"pollinate node: the swarm's model {assignment.model_id!r} has "
                             f"{assignment.num_blocks} blocks, {config.model!r} has {files.num_blocks}")
        start, end = assignment.span.start, assignment.span.end
        logger.info("coordinator %s assigned blocks %d:%d (member %s, epoch %d)", config.coordinator,
                    start, end, assignment.member_id, assignment.epoch)
    else:
        start, end = config.start, config.end

    async with lock:  # a MOVE arriving while the first span loads waits for it
        server = await load(start, end)
        rpc = RpcServer(ServerConfig(host=config.host, port=port, token=config.token))
        servicer = NodeServicer(server, throughput=_initial_throughput(config))
        if member is not None:  # DiLoCo rounds need the coordinator (node/rounds.py)
            from pollinate.node.rounds import RoundConfig, RoundDriver
            servicer.jobs.rounds = RoundDriver(RoundConfig(), coordinator_address=config.coordinator,
                                               token=config.token, member_id=lambda: member.member_id,
                                               framing=servicer.framing, **_coordinator_tls(config))
        add_to_server(rpc, servicer)
        if reservation is not None:
            reservation.close()
        await rpc.start()
        if relay is None:
            address = join_host_port(config.announce_host, rpc.port)  # what others dial
        announcer = announcer_for(server, address, servicer.throughput)
        current.update(server=server, announcer=announcer, address=address)
        await asyncio.to_thread(announcer.announce, "joining")
        if isinstance(config.throughput, str):
            servicer.throughput = announcer.throughput = await asyncio.to_thread(
                resolve_throughput, config.throughput, server.span, model_id=config.model,
                cache_dir=config.cache_dir or DEFAULT_CACHE_DIR, device_name=placement.device_name,
            )
        await asyncio.to_thread(announcer.start)
        if member is not None:
            member.set_throughput(servicer.throughput)
            member.set_serving(Span(start, end))
    logger.info(
        "serving blocks %d:%d of %s at %s (%.1f tokens/s, %d-token cache budget), peer %s",
        start, end, config.model, address, servicer.throughput,
        config.sessions.budget_tokens, announcer.peer_id,
    )
    if config.ready_file is not None:
        _write_ready(config.ready_file, {
            "address": address,
            "dht_maddrs": [str(m) for m in dht.get_visible_maddrs()],
            "peer_id": announcer.peer_id,
            "blocks": [start, end],
            "throughput": servicer.throughput,
            "member_id": member.member_id if member is not None else None,
            "relayed": relay is not None,
        })

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("shutting down: leaving the swarm, announcing offline, draining sessions")
    if member is not None:
        await member.stop(leave=True)
    servicer.serving = False
    await asyncio.to_thread(current["announcer"].stop)
    await rpc.stop()
    if relay is not None:
        await relay.stop()
    await current["server"].shutdown()
    return 0


def _relay_maddr(dht) -> str:
    """The multiaddr this node offers as a circuit relay (--relay): its DHT peer's."""
    from pollinate.protocol.addresses import dialable_maddrs

    maddrs = dialable_maddrs(dht.get_visible_maddrs())
    if not maddrs:
        raise SystemExit("pollinate node: --relay needs a DHT peer others can dial; it has none "
                         "(set --announce-host and --dht-port)")
    return maddrs[0]
