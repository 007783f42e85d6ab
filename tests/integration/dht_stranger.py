"""A stranger in the swarm's DHT: a process that joins the DHT (which needs no token) and
announces block records at an address of its choosing, as a node would, without ever joining
the coordinator. With --token it tags them as a node with the token does (a token holder that
is no member); without, its records carry no tag. Writes {"peer_id"} to the ready file once
the records are stored, then re-announces until killed.

    python tests/integration/dht_stranger.py --initial-peers MADDR --model M --blocks 0:4 \
        --address 127.0.0.1:7001 [--token T] --ready-file stranger.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path


def main(args: argparse.Namespace) -> int:
    from pollinate.node.announce import AnnounceConfig, Announcer, start_dht

    start, end = (int(b) for b in args.blocks.split(":"))
    dht = start_dht(args.initial_peers)
    announcer = Announcer(dht, model_id=args.model, start=start, end=end, address=args.address,
                          throughput=args.throughput, cache_tokens_left=lambda: 1 << 20, config=AnnounceConfig(),
                          token=args.token)
    if not announcer.announce("online"):
        print("the stranger's records were not stored", file=sys.stderr)
        return 1
    tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
    tmp.write_text(json.dumps({"peer_id": announcer.peer_id}))
    os.replace(tmp, args.ready_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(AnnounceConfig().expiration_s / 2):
        announcer.announce("online")
    dht.shutdown()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--blocks", required=True, help="START:END")
    parser.add_argument("--address", required=True, help="where the records send clients")
    parser.add_argument("--throughput", type=float, default=1e6, help="high: routes prefer it")
    parser.add_argument("--token", help="the swarm token, to tag the records with; default: none")
    parser.add_argument("--ready-file", type=Path, required=True)
    sys.exit(main(parser.parse_args()))
