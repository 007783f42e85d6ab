"""Read the swarm's span records from the hivemind DHT into routing's `PeerSpan`s."""

from __future__ import annotations

import logging
from typing import Any

from pollinate.client.routing import PeerSpan
from pollinate.node.announce import spans_key

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


def peers_from_records(records: dict[str, Any], num_blocks: int) -> list[PeerSpan]:
    """The model's records, {peer id: value} -> one PeerSpan per well-formed record whose
    span lies within the model's blocks (others logged and dropped)."""
    peers = []
    for peer_id, value in records.items():
        p = parse_record(peer_id, value)
        if p is None:
            continue
        if not 0 <= p.start < p.end <= num_blocks:
            logger.warning("ignoring DHT record from %s: blocks %d:%d outside the model's 0:%d", peer_id,
                           p.start, p.end, num_blocks)
            continue
        peers.append(p)
    return sorted(peers, key=lambda p: (p.start, p.peer_id))


def fetch_peers(dht, model_id: str, num_blocks: int, *, timeout_s: float) -> list[PeerSpan]:
    """Every peer announcing a span of the model (all states; routing filters). One DHT key
    holds every node's record (node/announce.py), the newest per peer."""
    try:
        found = dht.get(spans_key(model_id), latest=True, return_future=True).result(timeout=timeout_s)
    except Exception as e:
        logger.warning("DHT lookup of the model's spans failed: %s", e)
        return []
    if found is None or not isinstance(found.value, dict):
        return []
    return peers_from_records({str(k): v.value for k, v in found.value.items()}, num_blocks)
