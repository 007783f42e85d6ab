"""A stand-in node for coordinator tests: a process that runs only a CoordinatorClient.

    python tests/integration/coordinator_fake_node.py --coordinator HOST:PORT --token-file F \
        --address 127.0.0.1:7001 --capacity 10 --ready-file node.json

Joins, writes {"member_id", "span", "dht_initial_peers"} to the ready file, then heartbeats
until killed. Moves are obeyed at once (there are no blocks to load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path


async def main(args: argparse.Namespace) -> int:
    from pollinate.coordinator.client import CoordinatorClient, CoordinatorClientConfig

    client = CoordinatorClient(CoordinatorClientConfig(
        coordinator=args.coordinator, token=args.token_file.read_text().strip(),
        address=args.address, capacity_blocks=args.capacity, throughput=args.throughput,
        name=args.address, retry_initial_s=0.1, retry_max_s=0.5, rpc_timeout_s=2.0,
        join_timeout_s=30.0))
    assignment = await client.start()
    tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
    tmp.write_text(json.dumps({"member_id": assignment.member_id,
                               "span": [assignment.span.start, assignment.span.end],
                               "dht_initial_peers": list(assignment.dht_initial_peers)}))
    os.replace(tmp, args.ready_file)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await client.stop()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--token-file", type=Path, required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--capacity", type=int, required=True)
    parser.add_argument("--throughput", type=float, default=10.0)
    parser.add_argument("--ready-file", type=Path, required=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(asyncio.run(main(parser.parse_args())))
