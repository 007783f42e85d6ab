"""Read the swarm's per-block records from the hivemind DHT into routing's `PeerSpan`s."""

from __future__ import annotations

import logging
from typing import Any

from pollinate.client.routing import PeerSpan
from pollinate.node.announce import block_key

logger = logging.getLogger(__name__)


def parse_record(peer_id: str, value: Any) -> PeerSpan | None:
    """One DHT record -> PeerSpan, or None (logged) if it is malformed."""
    try:
        return PeerSpan(
            peer_id=str(peer_id),
            address=str(value["address"]),
            start=int(value["start"]),
            end=int(value["end"]),
            throughput=float(value["throughput"]),
            state=str(value["state"]),
            cache_tokens_left=int(value.get("cache_tokens_left", 0)),
            # a record without the field comes from a node older than the field: unquantised
            quant=str(value.get("quant", "none")),
        )
    except (KeyError, TypeError, ValueError) as e:
        logger.warning("ignoring malformed DHT record from %s: %r (%s)", peer_id, value, e)
        return None


def merge_records(per_block: dict[int, dict[str, tuple[Any, float]]]) -> list[PeerSpan]:
    """Records of every block, each (value, expiration) -> one PeerSpan per peer.

    A peer serves one span at a time, but after it moves (or leaves) its older records may
    still be on the DHT under other blocks: the record that expires last is its newest
    announcement, so that one wins."""
    peers: dict[str, tuple[float, PeerSpan]] = {}
    for block in sorted(per_block):
        for peer_id, (value, expiration) in per_block[block].items():
            p = parse_record(peer_id, value)
            if p is None or not p.start <= block < p.end:
                continue
            if p.peer_id not in peers or expiration > peers[p.peer_id][0]:
                peers[p.peer_id] = (expiration, p)
    return sorted((p for _, p in peers.values()), key=lambda p: (p.start, p.peer_id))


def fetch_peers(dht, model_id: str, num_blocks: int, *, timeout_s: float) -> list[PeerSpan]:
    """Every peer announcing any block of the model (all states; routing filters)."""
    futures = {b: dht.get(block_key(model_id, b), latest=True, return_future=True) for b in range(num_blocks)}
    per_block: dict[int, dict[str, tuple[Any, float]]] = {}
    for b, f in futures.items():
        try:
            found = f.result(timeout=timeout_s)
        except Exception as e:
            logger.warning("DHT lookup of block %d failed: %s", b, e)
            continue
        if found is None or not isinstance(found.value, dict):
            continue
        per_block[b] = {str(k): (v.value, float(v.expiration_time)) for k, v in found.value.items()}
    return merge_records(per_block)
