"""Relayed addresses (protocol/relay.py), how Join, routing and the node's start-up treat them.
The relay itself runs with real daemons in tests/integration/test_relay.py."""

from __future__ import annotations

import pytest

from pollinate.client.routing import PeerSpan, RoutingConfig, find_route, hop_cost
from pollinate.coordinator.membership import parse_address
from pollinate.node.reachability import decide
from pollinate.protocol.errors import InvalidRequest
from pollinate.protocol.relay import _WireMaddr, is_relayed, parse_relayed, relay_hosts, relayed_address

NODE = "12D3KooWGyejzsBW7LEJXL5Wg1mEj7MRWjhvxUJuyL6TAp6bWCxP"
R1 = "/ip4/10.77.0.2/tcp/7100/p2p/12D3KooW9qte4WnnePzKjGuPe7Wc6cocjpoEjVx9mQM9qLN9sQBb"
R2 = "/ip4/10.77.0.3/tcp/7100/p2p/12D3KooWNZjR2K9fagxyypayQFezyNhxdf5835A72cE4XcZ4J6Bt"


def test_a_relayed_address_names_one_node_through_each_relay():
    address = relayed_address([R1, R2], NODE)
    assert is_relayed(address) and not is_relayed("10.0.0.7:7100") and "," not in address
    peer, circuits = parse_relayed(address)
    assert peer == NODE and circuits == [R1 + "/p2p-circuit", R2 + "/p2p-circuit"]
    assert relay_hosts(address) == ["10.77.0.2", "10.77.0.3"]
    with pytest.raises(ValueError, match="at least one relay"):
        relayed_address([], NODE)


@pytest.mark.parametrize("bad", [
    f"{R1}/p2p/{NODE}",  # no circuit
    f"/p2p-circuit/p2p/{NODE}",  # no relay
    f"{R1}/p2p-circuit/p2p/",  # no node
    f"{R1}/p2p-circuit/p2p/{NODE}+{R2}/p2p-circuit/p2p/12D3KooWother",  # two nodes
])
def test_malformed_relayed_addresses_are_refused(bad):
    with pytest.raises(ValueError):
        parse_relayed(bad)
    with pytest.raises(InvalidRequest):
        parse_address(bad)


def test_join_accepts_a_relayed_address_and_caps_its_length():
    address = relayed_address([R1, R2], NODE)
    assert parse_address(address) == (address, 0)
    with pytest.raises(InvalidRequest, match="at most"):
        parse_address(relayed_address([R1] * 20, NODE))


def test_circuits_are_encoded_as_the_go_daemon_reads_them():
    from hivemind.p2p import PeerID

    wire = _WireMaddr(R1 + "/p2p-circuit").to_bytes()
    relay = PeerID.from_base58(R1.rsplit("/", 1)[1]).to_bytes()  # a bare multihash, not a CID
    # /ip4 (04) 10.77.0.2, /tcp (06) 7100, /p2p (a5 03) <len> <multihash>, /p2p-circuit (a2 02)
    assert wire == bytes([0x04, 10, 77, 0, 2, 0x06]) + (7100).to_bytes(2, "big") + bytes([0xA5, 0x03, len(relay)]) \
        + relay + bytes([0xA2, 0x02])


def test_routing_prefers_the_direct_replica_and_still_uses_a_relayed_one():
    cfg = RoutingConfig()
    direct = PeerSpan(peer_id="d", address="10.0.0.7:7100", start=0, end=4, throughput=10.0)
    relayed = PeerSpan(peer_id="r", address=relayed_address([R1], NODE), start=0, end=4, throughput=10.0)
    assert hop_cost(relayed, 0, 4, cfg) == pytest.approx(hop_cost(direct, 0, 4, cfg) + cfg.relay_penalty_s)
    assert [h.peer.peer_id for h in find_route([relayed, direct], 0, 4, config=cfg)] == ["d"]
    assert [h.peer.peer_id for h in find_route([relayed], 0, 4, config=cfg)] == ["r"]
    faster = PeerSpan(peer_id="r", address=relayed.address, start=0, end=4, throughput=100.0)
    assert [h.peer.peer_id for h in find_route([faster, direct], 0, 4, config=cfg)] == ["r"]


def test_the_node_relays_only_when_the_coordinator_cannot_reach_it_or_it_is_told_to():
    relays = (R1,)
    assert not decide("auto", checked_address="1.2.3.4:7", reachable=True, detail="", relays=relays).relayed
    reach = decide("auto", checked_address="1.2.3.4:7", reachable=False, detail="timed out", relays=relays)
    assert reach.relayed and reach.relays == relays and "cannot connect to 1.2.3.4:7 (timed out)" in reach.why
    assert decide("relay", checked_address=None, reachable=None, detail="", relays=relays).relayed
    assert not decide("direct", checked_address=None, reachable=None, detail="", relays=relays).relayed
    with pytest.raises(SystemExit, match="offers no relay"):
        decide("auto", checked_address="1.2.3.4:7", reachable=False, detail="", relays=())


def test_a_relay_that_does_not_answer_is_left_out_of_the_reservation():
    """A SIGKILLed relay can still be on offer (its lease runs on); given it beside a live one,
    p2pd did not reserve at the live one for a whole minute (test_relay), so it is left out.
    With none answering, all stay: the daemon's own error then says what went wrong."""
    import asyncio
    import socket

    from pollinate.node.reachability import answering_relays
    from pollinate.protocol.addresses import maddr_tcp_address

    assert maddr_tcp_address(R1) == "10.77.0.2:7100"
    assert maddr_tcp_address("/ip6/::1/tcp/80/p2p/X") == "[::1]:80"
    assert maddr_tcp_address("/ip4/10.0.0.1/udp/80") is None
    with socket.socket() as live, socket.socket() as dead:
        live.bind(("127.0.0.1", 0))
        live.listen()
        dead.bind(("127.0.0.1", 0))  # bound, not listening: the connection is refused
        up, down = (f"/ip4/127.0.0.1/tcp/{s.getsockname()[1]}/p2p/{NODE}" for s in (live, dead))
        assert asyncio.run(answering_relays([down, up])) == [up]
        assert asyncio.run(answering_relays([down])) == [down]


def test_the_relay_watchdog_outlives_a_failing_coordinator():
    """A check or a relay list that raises (the coordinator slow or away) is a skipped check,
    never the end of the watchdog: once the coordinator answers again and the address keeps
    failing, the relays on offer come back. (An exception that ended keep_relayed left a node
    whose relays had died unmoved for good.)"""
    import asyncio

    from pollinate.node.reachability import watch_relays

    checks = iter([TimeoutError("check"), (False, "gone"), TimeoutError("check"), (False, "gone"),
                   (False, "gone"), (False, "gone")])
    lists = iter([TimeoutError("status"), (R1,)])

    def answer(it):
        value = next(it)
        if isinstance(value, Exception):
            raise value
        return value

    async def check(address):
        return answer(checks)

    async def relays():
        return answer(lists)

    assert asyncio.run(watch_relays("addr", check=check, relays=relays, period_s=0.001)) == (R1,)
    assert next(checks) == (False, "gone")  # the relay list failed once: one more failed check, then asked again
