"""DHT records tagged with the swarm token (node/announce.py: record_tag; client/dht_lookup.py):
a reader with the token keeps a record only if a token holder wrote it as it is, for that
model, under that peer id, to expire no later than it signed; a reader without one keeps all."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

import pollinate.client.dht_lookup as dht_lookup
from pollinate.client.dht_lookup import fetch_peers, tagged_records
from pollinate.node.announce import (EXPIRATION_FIELD, TAG_FIELD, AnnounceConfig, Announcer, record_tag, record_value,
                                     spans_key)
from pollinate.protocol.errors import RateLimitedLog

TOKEN = "swarm-secret"
KEY = spans_key("tiny")
EXPIRES = 1_000.0


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    """Each test sees its own warnings (the log is rate limited per peer id, module-wide)."""
    monkeypatch.setattr(dht_lookup, "_untagged_log", RateLimitedLog(period_s=600.0))


def tagged(*, token=TOKEN, key=KEY, peer="peer-a", expiration=EXPIRES, address="10.0.0.1:7000"):
    value = record_value(state="online", address=address, start=0, end=4, throughput=50.0, cache_tokens_left=8)
    value[EXPIRATION_FIELD] = expiration
    value[TAG_FIELD] = record_tag(token, key=key, subkey=peer, value=value)
    return value


def kept(records, token=TOKEN) -> list[str]:
    return sorted(tagged_records(records, key=KEY, token=token))


def test_a_token_holders_record_is_kept():
    assert kept({"peer-a": (tagged(), EXPIRES)}) == ["peer-a"]
    assert kept({"peer-a": (tagged(), EXPIRES - 30)}) == ["peer-a"]  # DHT expiration earlier than signed: fine


def test_records_a_token_holder_did_not_write_as_they_are_are_dropped():
    untagged = tagged()
    del untagged[TAG_FIELD]
    changed = dict(tagged(), address="10.6.6.6:7000")  # a trap's address under a real node's tag
    faster = dict(tagged(), throughput=1e9)
    later = dict(tagged(), **{EXPIRATION_FIELD: EXPIRES + 3600})
    records = {
        "wrong-token": (tagged(token="another-swarm", peer="wrong-token"), EXPIRES),
        "untagged": (untagged, EXPIRES),
        "changed-address": (changed, EXPIRES),
        "changed-throughput": (faster, EXPIRES),
        "other-peer": (tagged(peer="peer-a"), EXPIRES),  # peer-a's record re-stored under another id
        "other-model": (tagged(key=spans_key("other"), peer="other-model"), EXPIRES),
        "re-stored-later": (tagged(peer="re-stored-later"), EXPIRES + 3600),  # outlives what it signs
        "expiration-edited": (dict(later), EXPIRES + 3600),
        "str-tag": (dict(tagged(peer="str-tag"), tag="x" * 32), EXPIRES),
        "not-json": (dict(tagged(peer="not-json"), extra=b"\x00"), EXPIRES),
        "not-a-dict": ([1, 2], EXPIRES),
        "good": (tagged(peer="good"), EXPIRES),
    }
    assert kept(records) == ["good"]


def test_without_a_token_every_record_is_kept():
    untagged = tagged()
    del untagged[TAG_FIELD]
    records = {"untagged": (untagged, EXPIRES), "other-token": (tagged(token="x", peer="other-token"), EXPIRES),
               "later": (tagged(peer="later"), EXPIRES + 3600)}
    assert kept(records, token=None) == ["later", "other-token", "untagged"]


def test_one_warning_per_peer_id_never_the_token(caplog):
    untagged = tagged()
    del untagged[TAG_FIELD]
    records = {"stranger": (untagged, EXPIRES), "forger": (tagged(token="guess", peer="forger"), EXPIRES)}
    with caplog.at_level(logging.WARNING, logger="pollinate.client.dht_lookup"):
        for _ in range(5):  # five lookups
            assert kept(records) == []
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert any("stranger" in line and "no token tag" in line for line in lines), lines
    assert any("forger" in line and "wrong token tag" in line for line in lines), lines
    assert not any(TOKEN in line for line in lines)


class FakeDHT:
    """Stores like hivemind: per subkey, the value that expires last; `get` returns them all."""

    def __init__(self, peer_id="node-1"):
        self.peer_id = SimpleNamespace(to_base58=lambda: peer_id)
        self.stored: dict[str, dict[str, SimpleNamespace]] = {}

    def store(self, key, value, expiration, *, subkey, return_future):
        old = self.stored.setdefault(key, {}).get(subkey)
        ok = old is None or expiration > old.expiration_time
        if ok:
            self.stored[key][subkey] = SimpleNamespace(value=value, expiration_time=expiration)
        return done(ok)

    def get(self, key, *, latest, return_future):
        return done(SimpleNamespace(value=dict(self.stored[key])) if key in self.stored else None)


def done(result) -> Future:
    f = Future()
    f.set_result(result)
    return f


def announcer(dht, token):
    return Announcer(dht, model_id="tiny", start=0, end=4, address="10.0.0.1:7000", throughput=5.0,
                     cache_tokens_left=lambda: 8, config=AnnounceConfig(), token=token)


def test_an_announcers_record_is_tagged_and_read_back_with_the_token():
    dht = FakeDHT()
    assert announcer(dht, TOKEN).announce("online")
    (stored,) = dht.stored[KEY].values()
    assert stored.value[EXPIRATION_FIELD] == stored.expiration_time
    assert TOKEN.encode() not in repr(stored.value).encode() and TOKEN not in repr(stored.value)
    # a stranger's untagged record beside it, at a trap's address, with a throughput routes prefer
    dht.store(KEY, record_value(state="online", address="10.6.6.6:1", start=0, end=4, throughput=1e9,
                                cache_tokens_left=8), stored.expiration_time, subkey="stranger", return_future=True)
    assert [p.peer_id for p in fetch_peers(dht, "tiny", 4, token=TOKEN, timeout_s=1)] == ["node-1"]
    assert [p.peer_id for p in fetch_peers(dht, "tiny", 4, token="other", timeout_s=1)] == []
    assert sorted(p.peer_id for p in fetch_peers(dht, "tiny", 4, token=None, timeout_s=1)) == ["node-1", "stranger"]


def test_an_announcer_without_a_token_stores_no_tag():
    dht = FakeDHT()
    assert announcer(dht, None).announce("online")
    (stored,) = dht.stored[KEY].values()
    assert TAG_FIELD not in stored.value and EXPIRATION_FIELD not in stored.value
    assert fetch_peers(dht, "tiny", 4, token=TOKEN, timeout_s=1) == []  # a tokened reader drops it


async def test_a_client_with_the_token_routes_only_through_tagged_records():
    """The client's Swarm passes its token to the lookup: a stranger's untagged record, faster
    than the node's, is never in a route; without the token it would be."""
    from pollinate.client.config import ClientConfig
    from pollinate.client.swarm import Swarm

    dht = FakeDHT()
    assert announcer(dht, TOKEN).announce("online")
    dht.store(KEY, record_value(state="online", address="10.6.6.6:1", start=0, end=4, throughput=1e9,
                                cache_tokens_left=8), EXPIRES, subkey="stranger", return_future=True)
    member = Swarm(dht=dht, model_id="tiny", num_blocks=4, config=ClientConfig(token=TOKEN))
    assert [h.peer.address for h in await member.route(0, 4)] == ["10.0.0.1:7000"]
    open_swarm = Swarm(dht=dht, model_id="tiny", num_blocks=4, config=ClientConfig())
    assert [h.peer.address for h in await open_swarm.route(0, 4)] == ["10.6.6.6:1"]
