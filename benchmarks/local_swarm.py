"""A local swarm for benchmarks and chaos runs: node processes on loopback, torn down after.

    with local_swarm(workdir, model="smollm2", spans=[(0, 10), (10, 20), (20, 30)]) as swarm:
        swarm.maddr          # DHT multiaddr to give a client
        swarm.nodes[1].kill()

The first span's node is the DHT bootstrap; the others start together once it is ready.
Process handling (ready files, SIGTERM then SIGKILL, log tails) is pollinate.procs (cli/procs.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pollinate.procs import Proc, ProcGroup


@dataclass
class LocalSwarm:
    group: ProcGroup
    nodes: list[Proc]

    @property
    def maddr(self) -> str:
        return self.nodes[0].info["dht_maddrs"][0]


@contextlib.contextmanager
def local_swarm(
    workdir: Path,
    *,
    model: str,
    spans: list[tuple[int, int]],
    cache_dir: str | None = None,
    extra: list[str] = (),
    ready_timeout_s: float = 300.0,
) -> Iterator[LocalSwarm]:
    common = ["--model", model, *(["--cache-dir", cache_dir] if cache_dir else []), *extra]
    with ProcGroup(workdir) as group:
        first = group.start("node-0", ["node", "--blocks", f"{spans[0][0]}:{spans[0][1]}", *common])
        group.wait_ready([first], timeout=ready_timeout_s)
        peers = ["--initial-peers", first.info["dht_maddrs"][0]]
        rest = [
            group.start(f"node-{i}", ["node", "--blocks", f"{s}:{e}", *common, *peers])
            for i, (s, e) in enumerate(spans[1:], start=1)
        ]
        group.wait_ready(rest, timeout=ready_timeout_s)
        yield LocalSwarm(group=group, nodes=[first, *rest])
