"""A node's presence on the hivemind DHT: one record per node, re-announced.

Key `"<model>.spans"`, subkey = the node's DHT peer id, value = a small dict (state, address,
span, throughput, free cache, quantisation), with an expiration time. A node announces
"joining" while it loads, "online" once its server is up, re-announces before the record
expires, and "offline" when it shuts down gracefully or moves to other blocks. A killed node's
record simply expires; clients also ban a peer that fails them, so they never wait for that.

Petals stores one record per hosted block (`"<model>.<block>"`), and so did Pollinate until
issue 12 measured what it costs a volunteer: re-storing 10 block records every 20 s was ~2.5
kB/s per idle node (~5 GB a month), and a client read 30 keys per lookup. The record already
names the span, so one key per model says the same in one store and one read
(docs/architecture.md, "One DHT record per node").

The DHT takes records from anyone, token or not. A node with the swarm token tags its record
(`record_tag`: an HMAC under a key derived from the token over the key, its peer id, the
fields and the expiration it signs), and readers with the token drop records without a valid
tag (client/dht_lookup.py), so a peer without the token cannot draw a client's calls (and read
the token from them) by announcing blocks (docs/architecture.md, "DHT records carry a token tag").

The DHT runs in a forked process: create it before any gRPC object exists in this process
(see `start_dht`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pollinate.protocol.auth import token_key

logger = logging.getLogger(__name__)

STATES = ("joining", "online", "offline")

# The fields a token holder's record adds: the DHT expiration time it signs, and the tag
TAG_FIELD = "tag"
EXPIRATION_FIELD = "expiration"
# Names the token's use in the tag's key (protocol/auth.py: token_key), so a record's tag is
# a MAC nothing else in the swarm makes or accepts
RECORD_TAG_LABEL = "dht-record-v1"


@dataclass(frozen=True, kw_only=True)
class AnnounceConfig:
    # Lifetime of each record, seconds; a killed node disappears from routes at most this
    # late (clients ban failing peers at once, so this bounds only new clients' first try).
    expiration_s: float = 60.0
    # Re-announce after this fraction of the lifetime, so records never lapse while alive.
    refresh_fraction: float = 0.33
    # Lifetime of the "offline" record written on graceful shutdown, seconds.
    offline_expiration_s: float = 15.0
    # Longest wait for one DHT store round, seconds.
    store_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.expiration_s > 0:
            raise ValueError(f"expiration_s must be > 0, got {self.expiration_s}")
        if not 0 < self.refresh_fraction < 1:
            raise ValueError(f"refresh_fraction must be in (0, 1), got {self.refresh_fraction}")
        if not self.offline_expiration_s > 0:
            raise ValueError(f"offline_expiration_s must be > 0, got {self.offline_expiration_s}")
        if not self.store_timeout_s > 0:
            raise ValueError(f"store_timeout_s must be > 0, got {self.store_timeout_s}")


def spans_key(model_id: str) -> str:
    """DHT key under which every node of a model announces its span (subkey: its peer id)."""
    return f"{dht_prefix(model_id)}.spans"


# DHT time the newest record stored by each peer id (in this process) expires: an Announcer
# that replaces another (a move, a new relay) must not store an earlier-expiring record under
# the same subkey, or the DHT keeps the old one (see Announcer.announce)
_last_expiration: dict[str, float] = {}
_last_expiration_lock = threading.Lock()


def dht_prefix(model_id: str) -> str:
    """A model's name in DHT keys: the last path component, lowercased, without dots."""
    name = model_id.rstrip("/").split("/")[-1].lower()
    return name.replace(".", "-") or "model"


def record_value(
    *, state: str, address: str, start: int, end: int, throughput: float, cache_tokens_left: int,
    quant: str = "none",
) -> dict[str, Any]:
    """One block record. `quant`: the span's Linear weights, "none", "int8" or "int4"
    (node/quant.py); a client asking for exact output routes around quantised peers."""
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")
    return {
        "state": state,
        "address": address,
        "start": int(start),
        "end": int(end),
        "throughput": float(throughput),
        "cache_tokens_left": int(cache_tokens_left),
        "quant": str(quant),
    }


def record_tag(token: str, *, key: str, subkey: str, value: dict[str, Any]) -> bytes:
    """HMAC-SHA256, under a key derived from the swarm token, of the DHT key, the subkey (the
    writer's peer id) and every field of `value` but the tag, the signed expiration included,
    as canonical JSON (sorted keys, no spaces; msgpack carries ints, floats and strings
    exactly, so a reader encodes the same bytes). So a tag does not pass under another model,
    another peer id, a changed field or a later expiration. Raises TypeError or ValueError for
    a value JSON cannot encode."""
    fields = {k: v for k, v in value.items() if k != TAG_FIELD}
    message = json.dumps([key, subkey, fields], sort_keys=True, separators=(",", ":"))
    return hmac.new(token_key(token, RECORD_TAG_LABEL), message.encode("utf-8"), hashlib.sha256).digest()


def start_dht(initial_peers: Sequence[str], *, host: str = "127.0.0.1", client_mode: bool = False,
              host_maddrs: Sequence[str] | None = None, announce_maddrs: Sequence[str] = (),
              relay: bool = False):
    """Start a hivemind DHT peer (forks a process: call before creating gRPC objects).

    It listens on `host_maddrs` (default: `host`, any free port) and advertises
    `announce_maddrs` instead when given (protocol/addresses.py: bind vs announce). With
    `relay` it serves as a libp2p circuit relay for nodes that cannot be dialled (told it is
    reachable, or libp2p waits for AutoNAT to say so). A peer that cannot reach any of
    `initial_peers` raises SetupError saying what to check."""
    import hivemind

    from pollinate.protocol.errors import SetupError

    kwargs: dict[str, Any] = {"initial_peers": list(initial_peers), "start": True, "client_mode": client_mode}
    if not client_mode:
        kwargs["host_maddrs"] = list(host_maddrs or [f"/ip4/{host}/tcp/0"])
        if announce_maddrs:
            kwargs["announce_maddrs"] = list(announce_maddrs)
        if relay:
            kwargs["force_reachability"] = "public"
    try:
        return hivemind.DHT(**kwargs)
    except Exception as e:  # hivemind raises P2PDaemonError / RuntimeError with a daemon log line
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        if initial_peers:
            raise SetupError(
                f"cannot join the swarm's DHT at {', '.join(initial_peers)} ({detail}); check that "
                "this machine can reach that address and port (firewall, router), and that the "
                "coordinator announces an address others can dial (--announce-host)") from None
        raise SetupError(f"the DHT peer did not start on {kwargs.get('host_maddrs')} ({detail}); "
                         "check --host / --dht-port") from None


class Announcer:
    """Keeps this node's record fresh on the DHT from a background thread."""

    def __init__(
        self,
        dht,
        *,
        model_id: str,
        start: int,
        end: int,
        address: str,
        throughput: float,
        cache_tokens_left: Callable[[], int],
        config: AnnounceConfig,
        token: str | None,
        quant: str = "none",
    ):
        self.dht = dht
        self.model_id = model_id
        self.start_block, self.end_block = start, end
        self.address = address
        self.throughput = throughput
        self.cache_tokens_left = cache_tokens_left
        self.config = config
        self.quant = quant  # the span's quantisation, announced in every record
        self.token = token  # the swarm token, which tags every record (record_tag); None: untagged
        self.state = "joining"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peer_id(self) -> str:
        return self.dht.peer_id.to_base58()

    def announce(self, state: str, lifetime_s: float | None = None) -> bool:
        """Store this node's record; True if the store succeeded."""
        from hivemind.utils import get_dht_time

        self.state = state
        lifetime = self.config.expiration_s if lifetime_s is None else lifetime_s
        # hivemind keeps, per key and subkey, the value that expires last and drops a store
        # that expires earlier: a short-lived "offline" written soon after a refresh would be
        # ignored and clients would keep routing here. So a record never expires before the
        # one it replaces, also one an earlier Announcer of this peer stored.
        with _last_expiration_lock:
            expiration = max(get_dht_time() + lifetime, _last_expiration.get(self.peer_id, 0.0) + 1e-3)
            _last_expiration[self.peer_id] = expiration
        key = spans_key(self.model_id)
        value = record_value(
            state=state,
            address=self.address,
            start=self.start_block,
            end=self.end_block,
            throughput=self.throughput,
            cache_tokens_left=self.cache_tokens_left(),
            quant=self.quant,
        )
        if self.token is not None:
            value[EXPIRATION_FIELD] = expiration
            value[TAG_FIELD] = record_tag(self.token, key=key, subkey=self.peer_id, value=value)
        try:
            ok = bool(self.dht.store(key, value, expiration, subkey=self.peer_id,
                                     return_future=True).result(timeout=self.config.store_timeout_s))
        except Exception as e:  # a DHT hiccup is retried on the next refresh
            logger.warning("DHT store failed: %s", e)
            ok = False
        if ok:
            logger.debug("announced %s for blocks %d:%d", state, self.start_block, self.end_block)
        else:
            logger.warning("announcing %s for blocks %d:%d was not stored", state, self.start_block, self.end_block)
        return ok

    def start(self) -> None:
        """Announce online now and keep re-announcing until `stop()`."""
        self.announce("online")
        self._thread = threading.Thread(target=self._refresh_loop, name="announcer", daemon=True)
        self._thread.start()

    def _refresh_loop(self) -> None:
        period = self.config.expiration_s * self.config.refresh_fraction
        while not self._stop.wait(period):
            self.announce(self.state)

    def stop(self) -> None:
        """Stop refreshing and announce offline (short-lived record)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.store_timeout_s)
        self.announce("offline", lifetime_s=self.config.offline_expiration_s)
        logger.info("announced offline for blocks %d:%d", self.start_block, self.end_block)
