"""`pollinate node`: load a span, serve it over gRPC, announce it on the DHT.

Start-up order matters: the hivemind DHT forks a process, so it starts first, before any
gRPC object exists. Then the span loads, the server binds (port 0 = any free port), the
node announces "joining", measures its throughput unless given, announces "online" and
writes the ready file (JSON: address, dht_maddrs, peer_id) that scripts and tests wait for.
SIGTERM/SIGINT: announce "offline", stop the server with a grace period, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blocks", required=True, help="blocks to host, START:END (end exclusive), e.g. 10:20")
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded), a local dir or .gguf, or a hub id")
    p.add_argument("--initial-peers", nargs="*", default=[], help="DHT multiaddrs to join (none: start a new DHT)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind and announce")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0: any free port)")
    p.add_argument("--ready-file", type=Path, help="write {address, dht_maddrs, peer_id} here once serving")
    p.add_argument("--token-file", type=Path, help="file holding the swarm token")
    p.add_argument("--cache-dir", type=Path, help="converted-model cache (default ~/.cache/pollinate)")
    p.add_argument("--device", default="cpu", help="'auto', 'cpu', 'cuda', 'cuda:N'")
    p.add_argument("--dtype", default="auto", help="'auto', 'float32', 'bfloat16', 'float16'")
    p.add_argument("--throughput", type=float, help="announce this many blocks/s instead of measuring")
    p.add_argument("--cache-tokens", type=int, default=8192, help="KV-cache budget in tokens over all sessions")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="close sessions idle this long, seconds")
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: default)")
    p.add_argument("--announce-expiration", type=float, default=60.0, help="DHT record lifetime, seconds")


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--blocks must look like START:END, got {text!r}") from None
    return start, end


def build_config(args: argparse.Namespace):
    from pollinate.node.announce import AnnounceConfig
    from pollinate.node.config import NodeConfig
    from pollinate.node.sessions import SessionConfig

    start, end = parse_blocks(args.blocks)
    token = args.token_file.read_text().strip() if args.token_file else None
    return NodeConfig(
        model=args.model,
        start=start,
        end=end,
        cache_dir=args.cache_dir,
        host=args.host,
        port=args.port,
        token=token or None,
        initial_peers=tuple(args.initial_peers),
        ready_file=args.ready_file,
        device=args.device,
        dtype=args.dtype,
        throughput=args.throughput,
        torch_threads=args.torch_threads,
        sessions=SessionConfig(budget_tokens=args.cache_tokens, idle_timeout_s=args.idle_timeout),
        announce=AnnounceConfig(expiration_s=args.announce_expiration),
    )


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    from pollinate.node.announce import start_dht

    dht = start_dht(config.initial_peers, host=config.host)  # before any gRPC object exists
    try:
        return asyncio.run(serve(config, dht))
    finally:
        dht.shutdown()


def _write_ready(path: Path, info: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)  # atomic: a reader never sees half a file


async def serve(config, dht) -> int:
    import torch

    from pollinate.node.announce import Announcer
    from pollinate.node.device import resolve_placement
    from pollinate.node.model_files import open_model
    from pollinate.node.servicer import NodeServicer, add_to_server
    from pollinate.node.span_server import SpanServer
    from pollinate.protocol.channels import RpcServer, ServerConfig

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    placement = resolve_placement(config.device, config.dtype)
    files = await asyncio.to_thread(open_model, config.model, cache_dir=config.cache_dir, show_progress=False)
    span = await asyncio.to_thread(
        files.load_span, config.start, config.end, dtype=placement.dtype, device=placement.device
    )
    server = SpanServer(
        span, model_id=config.model, num_blocks=files.num_blocks, hidden_size=files.hidden_size,
        serving=config.serving, sessions=config.sessions,
    )
    rpc = RpcServer(ServerConfig(host=config.host, port=config.port, token=config.token))
    servicer = NodeServicer(server, throughput=config.throughput or 1.0)
    add_to_server(rpc, servicer)
    address = await rpc.start()
    await server.start_sweeper()
    announcer = Announcer(
        dht, model_id=config.model, start=config.start, end=config.end, address=address,
        throughput=servicer.throughput, cache_tokens_left=lambda: server.sessions.tokens_left,
        config=config.announce,
    )
    await asyncio.to_thread(announcer.announce, "joining")
    if config.throughput is None:
        servicer.throughput = announcer.throughput = await asyncio.to_thread(server.measure_throughput)
    await asyncio.to_thread(announcer.start)
    logger.info(
        "serving blocks %d:%d of %s at %s (%.1f blocks/s, %d-token cache budget), peer %s",
        config.start, config.end, config.model, address, servicer.throughput,
        config.sessions.budget_tokens, announcer.peer_id,
    )
    if config.ready_file is not None:
        _write_ready(config.ready_file, {
            "address": address,
            "dht_maddrs": [str(m) for m in dht.get_visible_maddrs()],
            "peer_id": announcer.peer_id,
            "blocks": [config.start, config.end],
            "throughput": servicer.throughput,
        })

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("shutting down: announcing offline, draining sessions")
    servicer.serving = False
    await asyncio.to_thread(announcer.stop)
    await rpc.stop()
    await server.shutdown()
    return 0
