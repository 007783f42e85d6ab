"""Bind vs announce (protocol/addresses.py) and Join's address check (coordinator/address_check.py)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from pollinate.coordinator.address_check import AddressCheck
from pollinate.coordinator.config import AddressCheckConfig
from pollinate.protocol.addresses import (
    announced_address_problem,
    choose_announce_host,
    dht_maddrs,
    dialable_maddrs,
    interface_hosts,
    is_loopback,
    is_unspecified,
    join_host_port,
    maddr_host,
    outbound_host,
    probe_tcp,
    split_host_port,
)
from pollinate.protocol.errors import FailedPrecondition


@pytest.mark.parametrize("address,expected", [
    ("10.0.0.1:7070", ("10.0.0.1", 7070)),
    ("[::1]:7070", ("::1", 7070)),
    ("node.example:1", ("node.example", 1)),
])
def test_split_and_join_round_trip(address, expected):
    assert split_host_port(address) == expected
    assert join_host_port(*expected) == address


@pytest.mark.parametrize("bad", ["7070", ":7070", "host:port", "host:70000"])
def test_split_refuses_what_is_not_host_port(bad):
    with pytest.raises(ValueError, match="address"):
        split_host_port(bad)


@pytest.mark.parametrize("host,unspecified,loopback", [
    ("0.0.0.0", True, False), ("::", True, False), ("[::]", True, False), ("", True, False),
    ("127.0.0.1", False, True), ("127.3.2.1", False, True), ("::1", False, True), ("localhost", False, True),
    ("10.77.0.2", False, False), ("node.example", False, False),
])
def test_unspecified_and_loopback(host, unspecified, loopback):
    assert is_unspecified(host) is unspecified
    assert is_loopback(host) is loopback


def never(_):
    raise AssertionError("resolve must not be called")


def test_an_explicit_announce_host_wins_and_must_be_dialable():
    assert choose_announce_host("0.0.0.0", "203.0.113.9", resolve=never).host == "203.0.113.9"
    assert choose_announce_host("10.0.0.5", "203.0.113.9", resolve=never).reason == "--announce-host"
    with pytest.raises(ValueError, match="--announce-host 0.0.0.0 is not an address others can dial"):
        choose_announce_host("0.0.0.0", "0.0.0.0", resolve=never)


def test_a_specific_bind_is_announced_as_is():
    assert choose_announce_host("10.0.0.5", None, resolve=never).host == "10.0.0.5"
    assert choose_announce_host("[::1]", None, resolve=never).host == "::1"


def test_a_wildcard_bind_announces_the_interface_towards_the_coordinator():
    asked = []

    def resolve(towards):
        asked.append(towards)
        return "10.77.0.3"

    choice = choose_announce_host("0.0.0.0", None, towards="10.77.0.1", resolve=resolve)
    assert (choice.host, asked) == ("10.77.0.3", ["10.77.0.1"])
    assert "reaches 10.77.0.1" in choice.reason and "--announce-host" in choice.reason
    with pytest.raises(ValueError, match="pass --announce-host"):
        choose_announce_host("0.0.0.0", None, towards="10.77.0.1", resolve=lambda _: None)


def test_outbound_host_is_the_local_end_of_a_route():
    assert outbound_host("127.0.0.1") == "127.0.0.1"  # loopback routes through lo
    assert "127.0.0.1" in interface_hosts()


@pytest.mark.parametrize("address,peer,local,problem", [
    ("0.0.0.0:7100", "127.0.0.1", (), "cannot be dialed"),  # never dialable, even locally
    ("[::]:7100", "10.0.0.7", (), "cannot be dialed"),
    ("127.0.0.1:7100", "10.0.0.7", (), "is loopback but the node joined from 10.0.0.7"),
    ("localhost:7100", "10.0.0.7", (), "is loopback"),
    ("127.0.0.1:7100", "127.0.0.1", (), None),  # same machine: loopback works
    ("127.0.0.1:7100", "10.0.0.2", ("10.0.0.2",), None),  # joined over the LAN from the coordinator's own host
    ("10.0.0.7:7100", "10.0.0.7", (), None),
    ("203.0.113.9:7100", "10.0.0.7", (), None),  # announces its public address from behind NAT: allowed
])
def test_announced_address_problem(address, peer, local, problem):
    got = announced_address_problem(address, peer_host=peer, local_hosts=local)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got and ("--announce-host" in got or "--host" in got)


def test_dht_maddrs_announce_only_when_bind_and_announce_differ():
    assert dht_maddrs("127.0.0.1", "127.0.0.1", 0) == (["/ip4/127.0.0.1/tcp/0"], [])
    assert dht_maddrs("0.0.0.0", "10.77.0.3", 4000) == (["/ip4/0.0.0.0/tcp/4000"], ["/ip4/10.77.0.3/tcp/4000"])
    assert dht_maddrs("::", "2001:db8::1", 4000) == (["/ip6/::/tcp/4000"], ["/ip6/2001:db8::1/tcp/4000"])
    assert dht_maddrs("0.0.0.0", "node.example", 4000)[1] == ["/dns/node.example/tcp/4000"]
    with pytest.raises(ValueError, match="fixed port"):
        dht_maddrs("0.0.0.0", "10.77.0.3", 0)


def test_dialable_maddrs_drop_loopback_when_another_is_left():
    lo, lan = "/ip4/127.0.0.1/tcp/5/p2p/Qm", "/ip4/10.77.0.1/tcp/5/p2p/Qm"
    assert maddr_host(lan) == "10.77.0.1" and maddr_host("/p2p/Qm") is None
    assert dialable_maddrs([lo, lan]) == [lan]
    assert dialable_maddrs([lo]) == [lo]  # a loopback-only coordinator still hands out what it has


def test_probe_tcp_connects_or_says_why():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert probe_tcp(f"127.0.0.1:{server.getsockname()[1]}", 2.0) is None
        port = server.getsockname()[1]
    error = probe_tcp(f"127.0.0.1:{port}", 2.0)  # closed now
    assert error is not None and "ConnectionRefusedError" in error


def run(coro):
    return asyncio.run(coro)


def test_address_check_refuses_warns_or_ignores_per_config(caplog):
    refuse = AddressCheck(AddressCheckConfig(dial_back="off"), local_hosts={"10.0.0.2"})
    with pytest.raises(FailedPrecondition, match="loopback but the node joined from 10.0.0.7"):
        run(refuse.joining("127.0.0.1:7100", peer_host="10.0.0.7"))
    run(refuse.joining("127.0.0.1:7100", peer_host="10.0.0.2"))  # the coordinator's own address
    run(refuse.joining("not an address", peer_host="10.0.0.7"))  # left to Membership (INVALID_ARGUMENT)
    warn = AddressCheck(AddressCheckConfig(undialable="warn", dial_back="off"))
    run(warn.joining("0.0.0.0:7100", peer_host="10.0.0.7"))
    assert warn.counters["warned"] == 1 and "doubtful address" in caplog.text
    public = AddressCheck(AddressCheckConfig(dial_back="off"), serves_others=True)
    run(public.joining("127.0.0.1:7100", peer_host="127.0.0.1"))  # admitted: a local joiner
    assert public.counters["warned"] == 1 and "only clients on this machine can reach it" in caplog.text
    off = AddressCheck(AddressCheckConfig(undialable="off", dial_back="off"))
    run(off.joining("0.0.0.0:7100", peer_host="10.0.0.7"))
    assert off.counters == {"refused": 0, "warned": 0, "dialed_back": 0}


def test_address_check_dials_remote_joiners_back_only():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        open_port = server.getsockname()[1]
        check = AddressCheck(AddressCheckConfig(dial_timeout_s=2.0))
        # A "remote" joiner (as gRPC saw it) announcing a listening address: admitted after a dial.
        run(check.joining(f"127.0.0.2:{open_port}", peer_host="127.0.0.2"))
        assert check.counters["dialed_back"] == 0  # loopback peers are local: no dial
        run(check.joining(f"127.0.0.1:{open_port}", peer_host=""))  # in-process call: no peer
    remote = AddressCheck(AddressCheckConfig(dial_timeout_s=2.0, undialable="off"))
    with pytest.raises(FailedPrecondition, match=rf"cannot connect to the announced address 127.0.0.1:{open_port}"):
        run(remote.joining(f"127.0.0.1:{open_port}", peer_host="10.9.9.9"))
    assert remote.counters["dialed_back"] == 1
    with pytest.raises(ValueError, match="dial_back"):
        AddressCheckConfig(dial_back="maybe")


def test_a_node_without_host_binds_everything_only_for_a_remote_coordinator():
    from argparse import Namespace

    from pollinate.node.cli import bind_and_announce

    def args(**kw):
        return Namespace(**{"coordinator": None, "initial_peers": [], "host": None, "announce_host": None, **kw})

    assert bind_and_announce(args(coordinator="127.0.0.1:7070")) == ("127.0.0.1", "127.0.0.1")
    assert bind_and_announce(args(initial_peers=["/ip4/127.0.0.1/tcp/5/p2p/Qm"])) == ("127.0.0.1", "127.0.0.1")
    route = outbound_host("192.0.2.77")
    if route is not None:  # a machine with a route to TEST-NET-1 (a default route)
        assert bind_and_announce(args(coordinator="192.0.2.77:7070")) == ("0.0.0.0", route)
    assert bind_and_announce(args(coordinator="192.0.2.77:7070", host="0.0.0.0",
                                  announce_host="203.0.113.9")) == ("0.0.0.0", "203.0.113.9")
    assert bind_and_announce(args(coordinator="192.0.2.77:7070", host="10.1.2.3")) == ("10.1.2.3", "10.1.2.3")


class FakeContext:
    def __init__(self, peer: str, metadata=()):
        self._peer = peer
        self._metadata = metadata

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self):
        return self._metadata  # the joiner's signature (protocol/identity.py)


def test_join_from_another_machine_announcing_loopback_is_refused_and_changes_nothing(tmp_path):
    from pollinate.coordinator.config import MembershipConfig, StoreConfig
    from pollinate.coordinator.membership import Membership
    from pollinate.coordinator.service import CoordinatorServicer
    from pollinate.coordinator.store import Store
    from pollinate.protocol.identity import NodeIdentity
    from pollinate.protocol.v1 import coordinator_pb2

    store = Store(StoreConfig(data_dir=tmp_path))
    store.open()
    membership = Membership(MembershipConfig(), store)
    servicer = CoordinatorServicer(membership, dht_initial_peers=list, status=dict,
                                   address_check=AddressCheck(AddressCheckConfig(dial_back="off")))
    join = coordinator_pb2.JoinRequest(address="127.0.0.1:7100", capacity_blocks=10, throughput=1.0)
    identity = NodeIdentity.generate()

    def signed_from(peer: str) -> FakeContext:  # a Join is signed by the node's key, each signature used once
        return FakeContext(peer, identity.call_metadata("/pollinate.v1.Coordinator/Join", join))

    with pytest.raises(FailedPrecondition, match="loopback but the node joined from 10.0.0.7"):
        run(servicer.Join(join, signed_from("ipv4:10.0.0.7:51234")))
    assert (membership.epoch, len(membership.members)) == (0, 0)
    reply = run(servicer.Join(join, signed_from("ipv4:127.0.0.1:51234")))  # the same from this machine
    assert reply.epoch == 1 and len(membership.members) == 1
    store.close()


def test_peer_host_is_the_callers_ip_with_ipv4_unmapped():
    from pollinate.protocol.addresses import peer_host

    assert peer_host("ipv4:10.0.0.7:5000") == "10.0.0.7"
    assert peer_host("ipv6:[::1]:5000") == "::1"
    assert peer_host("ipv6:%5B::1%5D:5000") == "::1"  # as grpc.aio's context.peer() gives it
    assert peer_host("ipv6:[::ffff:127.0.0.1]:5000") == "127.0.0.1"  # an IPv4 caller of a dual-stack server
    assert peer_host("unix:/tmp/s") == "unix:/tmp/s"
