"""Read the swarm's span records from the hivemind DHT into routing's `PeerSpan`s."""

from __future__ import annotations

import hmac
import logging
from typing import Any

from pollinate.client.routing import PeerSpan
from pollinate.node.announce import EXPIRATION_FIELD, TAG_FIELD, record_tag, spans_key
from pollinate.protocol.errors import RateLimitedLog, one_line

logger = logging.getLogger(__name__)
# One line per peer id per 10 minutes: a stranger's records are met again on every lookup
# (every peers_ttl_s, 30 s, and after each failure)
_untagged_log = RateLimitedLog(period_s=600.0)


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


def tag_problem(token: str, *, key: str, subkey: str, value: Any, expiration: float) -> str | None:
    """Why the record `value`, stored under `key` and `subkey` to expire at DHT time
    `expiration`, does not prove a token holder wrote it as it is (node/announce.py:
    record_tag), or None when it does."""
    if not isinstance(value, dict) or TAG_FIELD not in value:
        return "no token tag (its writer lacks the swarm token, or is older than tags)"
    tag = value[TAG_FIELD]
    try:
        valid = isinstance(tag, bytes) and hmac.compare_digest(tag, record_tag(token, key=key, subkey=subkey,
                                                                                value=value))
    except (TypeError, ValueError):  # a field JSON cannot encode: no token holder wrote that
        valid = False
    if not valid:
        return "wrong token tag (not written by a holder of the swarm token, or altered)"
    signed = value.get(EXPIRATION_FIELD)
    if not isinstance(signed, (int, float)) or expiration > signed:
        return "stored to expire later than its tag says (an old record stored again)"
    return None


def tagged_records(records: dict[str, tuple[Any, float]], *, key: str, token: str | None) -> dict[str, Any]:
    """{peer id: (value, DHT expiration)} under `key` -> {peer id: value} of the records a
    holder of `token` wrote; the others are dropped, logged once per peer id per 10 minutes.
    Without a token (an open swarm) every record is kept."""
    if token is None:
        return {peer_id: value for peer_id, (value, _) in records.items()}
    kept = {}
    for peer_id, (value, expiration) in records.items():
        problem = tag_problem(token, key=key, subkey=peer_id, value=value, expiration=expiration)
        if problem is None:
            kept[peer_id] = value
            continue
        address = value.get("address", "?") if isinstance(value, dict) else "?"
        _untagged_log(logger.warning, peer_id, "ignoring DHT record of peer %s at %s: %s", one_line(peer_id, 80),
                      one_line(str(address), 200), problem)
    return kept


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


def fetch_peers(dht, model_id: str, num_blocks: int, *, token: str | None, timeout_s: float) -> list[PeerSpan]:
    """Every peer announcing a span of the model (all states; routing filters). One DHT key
    holds every node's record (node/announce.py), the newest per peer. With the swarm `token`,
    only records a token holder wrote count (`tagged_records`)."""
    key = spans_key(model_id)
    try:
        found = dht.get(key, latest=True, return_future=True).result(timeout=timeout_s)
    except Exception as e:
        logger.warning("DHT lookup of the model's spans failed: %s", e)
        return []
    if found is None or not isinstance(found.value, dict):
        return []
    records = {str(k): (v.value, v.expiration_time) for k, v in found.value.items()}
    return peers_from_records(tagged_records(records, key=key, token=token), num_blocks)
