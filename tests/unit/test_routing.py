"""Route choice over fake peers: coverage, cost preference, bans, errors naming gaps."""

import random

import pytest

from pollinate.client.dht_lookup import peers_from_records
from pollinate.client.routing import BanList, NoRouteError, PeerSpan, RoutingConfig, find_route

CFG = RoutingConfig(hop_latency_s=0.01, allow_partial_spans=True)


def peer(pid, start, end, thr=100.0, state="online"):
    return PeerSpan(peer_id=pid, address=f"h:{pid}", start=start, end=end, throughput=thr, state=state)


def spans(route):
    return [(h.peer.peer_id, h.start, h.end) for h in route]


def test_route_tiles_blocks_in_order():
    peers = [peer("a", 0, 10), peer("b", 10, 20), peer("c", 20, 30)]
    assert spans(find_route(peers, 0, 30, config=CFG)) == [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]


def test_prefers_fast_replica_and_fewer_hops():
    peers = [peer("a", 0, 10), peer("slow", 10, 20, thr=10), peer("fast", 10, 20, thr=1000), peer("c", 20, 30)]
    assert spans(find_route(peers, 0, 30, config=CFG))[1] == ("fast", 10, 20)
    # one peer hosting everything beats three hops at equal throughput
    peers = [peer("a", 0, 10), peer("b", 10, 20), peer("c", 20, 30), peer("all", 0, 30)]
    assert spans(find_route(peers, 0, 30, config=CFG)) == [("all", 0, 30)]


def test_overlapping_spans_use_partial_ranges():
    peers = [peer("a", 0, 6), peer("b", 4, 10)]
    route = find_route(peers, 0, 10, config=CFG)
    assert [h.end - h.start for h in route] == [6, 4] or [h.end - h.start for h in route] == [4, 6]
    assert route[0].start == 0 and route[-1].end == 10 and route[0].end == route[1].start
    with pytest.raises(NoRouteError):
        find_route(peers, 0, 10, config=RoutingConfig(allow_partial_spans=False))


def test_subrange_for_failover():
    peers = [peer("a", 0, 10), peer("b1", 10, 20), peer("b2", 10, 20, thr=50), peer("c", 20, 30)]
    assert spans(find_route(peers, 10, 20, config=CFG, banned=frozenset({"b1"}))) == [("b2", 10, 20)]


def test_missing_blocks_named():
    peers = [peer("a", 0, 10), peer("c", 12, 30), peer("off", 10, 12, state="offline")]
    with pytest.raises(NoRouteError, match="no online peer hosts blocks 10, 11") as e:
        find_route(peers, 0, 30, config=CFG)
    assert e.value.missing_blocks == [10, 11]


def test_banned_peers_named_differently():
    peers = [peer("a", 0, 10), peer("b", 10, 20)]
    with pytest.raises(NoRouteError, match="unbanned") as e:
        find_route(peers, 0, 20, config=CFG, banned=frozenset({"b"}))
    assert e.value.missing_blocks == list(range(10, 20))


def test_ban_backoff_doubles_and_resets():
    bans = BanList(base_s=1.0, max_s=5.0)
    assert [bans.ban("x", now=0.0) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert bans.banned(now=4.9) == {"x"}
    assert bans.banned(now=5.1) == frozenset()
    bans.succeeded("x")
    assert bans.ban("x", now=10.0) == 1.0


def test_many_random_peers_route_is_a_valid_cheapest_tiling():
    rng = random.Random(0)
    peers = [peer("full", 0, 30, thr=1.0)]
    for i in range(2000):
        s = rng.randrange(30)
        peers.append(peer(f"p{i}", s, rng.randrange(s + 1, 31), thr=rng.uniform(1, 1000)))
    route = find_route(peers, 0, 30, config=CFG)
    assert route[0].start == 0 and route[-1].end == 30
    assert all(a.end == b.start for a, b in zip(route, route[1:]))
    assert all(h.peer.start <= h.start < h.end <= h.peer.end for h in route)
    cost = sum(CFG.hop_latency_s + (h.end - h.start) / h.peer.throughput for h in route)
    assert cost < 30 / 1.0  # far cheaper than the slow single peer


def test_records_one_peer_each_malformed_and_out_of_range_dropped():
    rec = {"state": "online", "address": "h:1", "start": 0, "end": 2, "throughput": 5.0, "cache_tokens_left": 10}
    peers = peers_from_records({"p": rec, "bad": {"state": "online"}, "far": dict(rec, start=3, end=9),
                                "empty": dict(rec, end=0)}, num_blocks=4)
    assert peers == [PeerSpan(peer_id="p", address="h:1", start=0, end=2, throughput=5.0, cache_tokens_left=10)]


async def test_a_moved_peer_stays_routable_for_the_blocks_it_serves_now(monkeypatch):
    """SpanMoved from a peer reached through a stale record: that record is ignored and the DHT
    re-read, but the peer is not banned, since it may be the only host of its new blocks."""
    import pollinate.client.swarm as swarm_module
    from pollinate.client.config import ClientConfig
    from pollinate.client.swarm import Swarm
    from pollinate.protocol.errors import PeerUnavailable, SpanMoved

    stale = PeerSpan(peer_id="m", address="m:1", start=0, end=2, throughput=50.0)
    moved = PeerSpan(peer_id="m", address="m:1", start=2, end=4, throughput=50.0)
    other = PeerSpan(peer_id="a", address="a:1", start=0, end=2, throughput=10.0)
    dht = {"records": [stale, other], "reads": 0}

    def fetch(_dht, _model, _num_blocks, *, token, timeout_s):
        dht["reads"] += 1
        return list(dht["records"])

    monkeypatch.setattr(swarm_module, "fetch_peers", fetch)
    swarm = Swarm(dht=None, model_id="m", num_blocks=4, config=ClientConfig())
    assert [h.peer for h in await swarm.route(0, 2)] == [stale]  # the faster one, by its old record
    swarm.ban(stale, SpanMoved("this node serves blocks 2:4, the request asked for 0:2"))
    # the DHT has not caught up yet: the refuted record is left out, the other replica used
    assert [h.peer for h in await swarm.route(0, 2)] == [other] and dht["reads"] == 2
    dht["records"] = [moved, other]  # the mover's new record arrives
    assert [h.peer for h in await swarm.route(2, 4)] == [moved]
    # a real failure still bans the peer itself, for all its blocks
    swarm.ban(moved, PeerUnavailable("connection refused"))
    with pytest.raises(NoRouteError, match="unbanned"):
        await swarm.route(2, 4)


def qpeer(pid, start, end, quant, thr=100.0):
    return PeerSpan(peer_id=pid, address=f"h:{pid}", start=start, end=end, throughput=thr, quant=quant)


def test_exact_routes_around_quantised_peers():
    """--exact (issue 19): a faster int4 replica is used normally, never under exact."""
    peers = [qpeer("a", 0, 10, "none"), qpeer("q", 10, 20, "int4", thr=1000), qpeer("b", 10, 20, "none", thr=10)]
    assert spans(find_route(peers, 0, 20, config=CFG))[1] == ("q", 10, 20)
    exact = RoutingConfig(hop_latency_s=0.01, allow_partial_spans=True, exact=True)
    assert spans(find_route(peers, 0, 20, config=exact)) == [("a", 0, 10), ("b", 10, 20)]


def test_exact_without_an_unquantised_replica_names_the_quantised_ones():
    peers = [qpeer("a", 0, 10, "none"), qpeer("q", 10, 20, "int8")]
    exact = RoutingConfig(exact=True)
    with pytest.raises(NoRouteError, match=r"exact output asked for, but only quantised peers host blocks "
                                           r"10, 11, .*h:q \[10:20\] int8.*drop --exact") as e:
        find_route(peers, 0, 20, config=exact)
    assert e.value.missing_blocks == list(range(10, 20))
    # a block nobody hosts is not blamed on quantisation
    with pytest.raises(NoRouteError, match="no online peer hosts blocks 20"):
        find_route(peers, 0, 21, config=RoutingConfig(exact=False, allow_partial_spans=True))
    assert len(find_route(peers, 0, 20, config=RoutingConfig())) == 2


def test_records_carry_the_quantisation():
    from pollinate.node.announce import record_value

    value = record_value(state="online", address="h:1", start=0, end=4, throughput=1.0, cache_tokens_left=8,
                         quant="int4")
    legacy = {k: v for k, v in value.items() if k != "quant"}
    (p,) = peers_from_records({"p": value}, num_blocks=4)
    (old,) = peers_from_records({"p": legacy}, num_blocks=4)
    assert p.quant == "int4" and old.quant == "none"


async def test_a_liar_stays_out_of_routes_under_a_new_peer_id(monkeypatch):
    """A peer caught lying (Swarm.mark_liar) is never routed through again, also when it comes
    back at the same address under another DHT peer id (a new id costs nothing)."""
    import pollinate.client.swarm as swarm_module
    from pollinate.client.config import ClientConfig
    from pollinate.client.swarm import Swarm

    liar = PeerSpan(peer_id="liar", address="l:1", start=0, end=4, throughput=90.0)
    honest = PeerSpan(peer_id="a", address="a:1", start=0, end=4, throughput=10.0)
    records = [liar, honest]
    monkeypatch.setattr(swarm_module, "fetch_peers", lambda *_a, **_k: list(records))
    swarm = Swarm(dht=None, model_id="m", num_blocks=4, config=ClientConfig())
    assert [h.peer for h in await swarm.route(0, 4)] == [liar]  # the fastest
    swarm.mark_liar(liar, "answered 0.5 away from two others")
    records[0] = PeerSpan(peer_id="reborn", address="l:1", start=0, end=4, throughput=99.0)
    await swarm.peers(refresh=True)  # the reborn record is read
    assert [h.peer for h in await swarm.route(0, 4)] == [honest]
