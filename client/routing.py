"""Route choice: which peers carry a request through blocks [start, end) of the model.

Pure policy, no network: the inputs are the peers' DHT records (`PeerSpan`) and the
client's ban list, the output is a chain of hops whose block ranges tile [start, end).
Like Petals' sequence manager, this is a shortest path over block boundaries: boundary b
is a vertex, and a peer serving [s, e) gives an edge a -> b for every s <= a < b <= e
(a hop may cover a sub-range of a peer's span). An edge costs one hop's latency plus
the time the peer takes for those blocks of one token step: the peer announces tokens/s
through its whole span (node/throughput.py), so a block costs 1 / (throughput * span
length). Dijkstra picks the cheapest chain.

A client that asks for exact output (`RoutingConfig.exact`, `pollinate generate --exact`)
routes through unquantised peers only (`PeerSpan.quant == "none"`): a quantised span
(node/quant.py) gives different logits than the model.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from pollinate.protocol.relay import is_relayed


class NoRouteError(RuntimeError):
    """No chain of online, unbanned peers covers the requested blocks."""

    def __init__(self, message: str, *, missing_blocks: list[int]):
        super().__init__(message)
        self.missing_blocks = missing_blocks


@dataclass(frozen=True, kw_only=True)
class PeerSpan:
    """One peer's announcement, as read back from the DHT."""

    peer_id: str  # DHT peer id (base58); also the subkey the peer announces under
    address: str  # host:port of the peer's gRPC server, or its relayed address (protocol/relay.py)
    start: int  # first hosted block
    end: int  # one past the last hosted block
    throughput: float  # tokens/s for one-token steps through the whole span [start, end)
    state: str = "online"  # "joining" | "online" | "offline"
    cache_tokens_left: int | None = None  # KV-cache tokens the peer can still reserve
    quant: str = "none"  # the peer's Linear weights: "none", "int8" or "int4" (node/quant.py)


@dataclass(frozen=True, kw_only=True)
class Hop:
    """One link of a route: `peer` runs blocks [start, end)."""

    peer: PeerSpan
    start: int
    end: int

    def __str__(self) -> str:
        return f"{self.peer.address}[{self.start}:{self.end}]"


@dataclass(frozen=True, kw_only=True)
class RoutingConfig:
    hop_latency_s: float = 0.005  # assumed per-hop round trip, seconds; loopback is ~1 ms
    # Added to a hop through a relayed peer (protocol/relay.py), seconds: its bytes cross two
    # links and three pipes (relay, both daemons). Measured in the lab by bench_relay.py
    # (docs/networks.md); like Petals' relay penalty it makes a direct replica win any
    # otherwise even choice, and a relayed one is still used when it is the only or the best.
    relay_penalty_s: float = 0.005
    # Let a hop use only part of a peer's span. Off: nodes serve their whole span only
    # (node/span_server.py check_blocks), so a hop is always one peer's entire span.
    allow_partial_spans: bool = False
    # Exact output: use only peers that hold their weights unquantised (quant "none"); where
    # only quantised peers host a block, find_route fails and names them.
    exact: bool = False

    def __post_init__(self) -> None:
        if not self.hop_latency_s >= 0:
            raise ValueError(f"hop_latency_s must be >= 0, got {self.hop_latency_s}")
        if not self.relay_penalty_s >= 0:
            raise ValueError(f"relay_penalty_s must be >= 0, got {self.relay_penalty_s}")


def hop_cost(peer: PeerSpan, start: int, end: int, config: RoutingConfig) -> float:
    """Expected seconds one token step spends on this hop."""
    blocks_per_s = max(peer.throughput * (peer.end - peer.start), 1e-9)
    penalty = config.relay_penalty_s if is_relayed(peer.address) else 0.0
    return config.hop_latency_s + penalty + (end - start) / blocks_per_s


def missing_blocks(peers: list[PeerSpan], start: int, end: int) -> list[int]:
    """Blocks in [start, end) that no given peer hosts."""
    covered = set()
    for p in peers:
        covered.update(range(max(p.start, start), min(p.end, end)))
    return [b for b in range(start, end) if b not in covered]


def _format_blocks(blocks: list[int]) -> str:
    if len(blocks) > 12:
        return ", ".join(map(str, blocks[:12])) + f", ... ({len(blocks)} blocks)"
    return ", ".join(map(str, blocks))


def find_route(
    peers: list[PeerSpan],
    start: int,
    end: int,
    *,
    config: RoutingConfig,
    banned: frozenset[str] = frozenset(),
) -> list[Hop]:
    """The cheapest chain of hops covering [start, end); raises NoRouteError naming gaps."""
    if not 0 <= start < end:
        raise ValueError(f"bad block range [{start}, {end})")
    usable = [p for p in peers if p.state == "online" and p.peer_id not in banned
              and not (config.exact and p.quant != "none")]
    # vertex b -> list of (next vertex, cost, peer)
    edges: dict[int, list[tuple[int, float, PeerSpan]]] = {}
    for p in usable:
        lo, hi = max(p.start, start), min(p.end, end)
        if lo >= hi:
            continue
        if config.allow_partial_spans:
            entries = range(lo, hi)
        else:
            entries = [p.start] if p.start >= start and p.end <= end else []
        for a in entries:
            exits = range(a + 1, hi + 1) if config.allow_partial_spans else [p.end]
            for b in exits:
                edges.setdefault(a, []).append((b, hop_cost(p, a, b, config), p))

    best: dict[int, float] = {start: 0.0}
    back: dict[int, tuple[int, PeerSpan]] = {}
    # (cost, hop count, vertex): fewer hops breaks cost ties, then the lower vertex.
    heap: list[tuple[float, int, int]] = [(0.0, 0, start)]
    while heap:
        cost, hops, v = heapq.heappop(heap)
        if v == end:
            break
        if cost > best.get(v, math.inf):
            continue
        for b, c, p in sorted(edges.get(v, []), key=lambda e: (e[0], e[2].peer_id)):
            if cost + c < best.get(b, math.inf) - 1e-12:
                best[b] = cost + c
                back[b] = (v, p)
                heapq.heappush(heap, (cost + c, hops + 1, b))

    if end not in best:
        gaps = missing_blocks(usable, start, end)
        if gaps:
            online = [p for p in peers if p.state == "online"]
            all_gaps = missing_blocks(online, start, end)
            quantised = [p for p in online if config.exact and p.quant != "none" and p.peer_id not in banned
                         and any(p.start <= g < p.end for g in gaps)]
            if quantised:
                raise NoRouteError(
                    f"exact output asked for, but only quantised peers host blocks {_format_blocks(gaps)} ("
                    + ", ".join(f"{p.address} [{p.start}:{p.end}] {p.quant}" for p in quantised[:4])
                    + "); drop --exact (exact=False) to use them, or wait for an unquantised node",
                    missing_blocks=gaps)
            why = "no online peer hosts" if gaps == all_gaps else "no usable (unbanned) peer hosts"
            raise NoRouteError(f"{why} blocks {_format_blocks(gaps)}", missing_blocks=gaps)
        raise NoRouteError(
            f"peers cover blocks [{start}, {end}) but not as a chain of whole spans",
            missing_blocks=[],
        )
    route: list[Hop] = []
    v = end
    while v != start:
        a, p = back[v]
        route.append(Hop(peer=p, start=a, end=v))
        v = a
    route.reverse()
    return route


@dataclass(kw_only=True)
class BanList:
    """Peers that failed recently, each banned for base * 2**(failures-1) seconds, capped."""

    base_s: float = 5.0  # first ban, seconds
    max_s: float = 300.0  # longest ban, seconds
    _failures: dict[str, int] = field(default_factory=dict)
    _until: dict[str, float] = field(default_factory=dict)

    def ban(self, peer_id: str, now: float) -> float:
        """Record a failure; returns the ban's length in seconds."""
        n = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = n
        length = min(self.base_s * 2 ** (n - 1), self.max_s)
        self._until[peer_id] = now + length
        return length

    def succeeded(self, peer_id: str) -> None:
        self._failures.pop(peer_id, None)
        self._until.pop(peer_id, None)

    def banned(self, now: float) -> frozenset[str]:
        return frozenset(p for p, t in self._until.items() if t > now)
