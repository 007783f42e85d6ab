"""Bind versus announce: which address a process listens on and which one it tells others.

A process binds an interface (`--host`, e.g. 0.0.0.0 for all of them) and announces the
address other machines dial (`--announce-host`): to the coordinator in Join, on the DHT in
its block records, and as the multiaddr of its DHT peer. The two differ whenever a process
binds 0.0.0.0 (no one can dial "0.0.0.0") or sits behind a router (it announces the public
address the router forwards). The rules, as pure functions so they are unit-tested:

    choose_announce_host("0.0.0.0", None, towards="10.0.0.1")   # the interface that reaches 10.0.0.1
    announced_address_problem("127.0.0.1:7100", peer_host="10.0.0.7")   # a reason to refuse

The only functions here that touch the system are `outbound_host` (a UDP socket's
`connect`, which sends no packet: it only asks the kernel which local address routes to
a target) and `interface_hosts` (this machine's IPv4 addresses, for "is this joiner local?").
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# Where `outbound_host` asks the kernel to route when there is no better target (a
# coordinator that does not yet know its peers). TEST-NET-3 (RFC 5737): never a real host,
# and a UDP connect sends nothing, so no traffic leaves the machine.
ROUTE_PROBE_TARGET = "203.0.113.1"


def split_host_port(address: str) -> tuple[str, int]:
    """'10.0.0.1:7070' -> ('10.0.0.1', 7070); '[::1]:7070' -> ('::1', 7070). ValueError otherwise."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"address {address!r} is not HOST:PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"address {address!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"address {address!r}: port {port} is outside 0..65535")
    return host.strip("[]"), port


def join_host_port(host: str, port: int) -> str:
    """('::1', 7070) -> '[::1]:7070'; ('10.0.0.1', 7070) -> '10.0.0.1:7070'."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None  # a hostname


def peer_host(peer: str) -> str:
    """The caller's IP from a gRPC context's peer(): 'ipv4:127.0.0.1:5000' -> '127.0.0.1';
    'ipv6:[::1]:5000' -> '::1'; an IPv4 caller of a dual-stack server ('ipv6:[::ffff:10.0.0.7]:5000')
    -> '10.0.0.7'; gRPC's percent-encoded brackets ('ipv6:%5B::1%5D:5000') decoded; else as is."""
    kind, _, rest = peer.partition(":")
    rest = urllib.parse.unquote(rest)
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]")
        ip = _ip(host)
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        return str(mapped) if mapped is not None else host
    return peer


def is_unspecified(host: str) -> bool:
    """0.0.0.0 or :: (bind to every interface; meaningless as a destination), or empty."""
    ip = _ip(host)
    return not host or (ip is not None and ip.is_unspecified)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or 'localhost': reachable from this machine only."""
    if host.strip().lower() == "localhost":
        return True
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def outbound_host(target: str | None = None) -> str | None:
    """The local address the kernel would use to reach `target` (default: its default
    route), or None when there is no route. A UDP connect sends no packet."""
    target = target or ROUTE_PROBE_TARGET
    ip = _ip(target)
    family = socket.AF_INET6 if ip is not None and ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((target.strip("[]"), 9))
            host = sock.getsockname()[0]
    except OSError:
        return None
    return None if is_unspecified(host) else host


def interface_hosts() -> frozenset[str]:
    """This machine's (this network namespace's) interface addresses, loopback included:
    IPv4 from the kernel's table of local addresses, IPv6 from /proc/net/if_inet6 (link-local
    ones left out: they need a scope to be dialed). Just loopback if /proc is unreadable."""
    hosts = {"127.0.0.1", "::1"}
    try:
        with open("/proc/net/fib_trie") as f:
            lines = f.read().splitlines()
        for i, line in enumerate(lines[1:], start=1):
            # "|-- 10.77.0.2" followed by "/32 host LOCAL": a local address of this namespace
            if "/32 host LOCAL" in line:
                candidate = lines[i - 1].split()[-1]
                if _ip(candidate) is not None:
                    hosts.add(candidate)
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                raw = line.split()[0]
                ip = ipaddress.IPv6Address(int(raw, 16))
                if not ip.is_link_local:
                    hosts.add(str(ip))
    except (OSError, ValueError, IndexError):
        pass
    return frozenset(hosts)


def routed_host(towards: str | None = None) -> str | None:
    """The address to announce for a wildcard bind: the interface that routes to `towards`
    (or the default route); failing a route, this machine's one non-loopback IPv4 address.
    None when there is none, or several and no route to choose between them."""
    found = outbound_host(towards)
    if found is not None:
        return found
    candidates = sorted(h for h in interface_hosts() if not is_loopback(h) and _ip(h).version == 4)
    return candidates[0] if len(candidates) == 1 else None


@dataclass(frozen=True)
class AnnounceChoice:
    host: str  # what to announce
    reason: str  # how it was chosen, for the log ("--announce-host", "bound address", ...)


def choose_announce_host(bind_host: str, announce_host: str | None, *, towards: str | None = None,
                         resolve: Callable[[str | None], str | None] = routed_host) -> AnnounceChoice:
    """What a process bound to `bind_host` announces. An explicit announce host wins; a
    specific bind address is announced as is; a wildcard bind (0.0.0.0, ::) announces the
    address of the interface that routes to `towards` (the coordinator, when known; else
    the default route). ValueError says what to pass when nothing dialable is found."""
    if announce_host:
        if is_unspecified(announce_host):
            raise ValueError(f"--announce-host {announce_host} is not an address others can dial; "
                             "give this machine's LAN or public address")
        return AnnounceChoice(announce_host.strip("[]"), "--announce-host")
    if not is_unspecified(bind_host):
        return AnnounceChoice(bind_host.strip("[]"), "the bound address")
    found = resolve(towards)
    if found is None:
        why = f"no interface routes to {towards}" if towards else "there is no default route"
        raise ValueError(f"bound to {bind_host} but {why} and not exactly one non-loopback "
                         "address to announce instead; pass "
                         "--announce-host with the address other machines reach this one at")
    where = f"the interface that reaches {towards}" if towards else "the default route's interface"
    return AnnounceChoice(found, f"{where} (bound to {bind_host}; --announce-host overrides)")


def announced_address_problem(address: str, *, peer_host: str,
                              local_hosts: Iterable[str] = ()) -> str | None:
    """Why a member that joined from `peer_host` (its IP as the coordinator saw the call)
    must not announce `address`, or None if it may. `local_hosts` are the coordinator's own
    addresses: a joiner calling from one of them is on the same machine, where loopback
    works. Unspecified (0.0.0.0) is never dialable; loopback only by a local joiner."""
    try:
        host, port = split_host_port(address)
    except ValueError as e:
        return str(e)
    if is_unspecified(host):
        return (f"announced address {address} cannot be dialed (it means 'every interface'); "
                f"start the node with --announce-host set to the address other machines reach it at")
    local = is_loopback(peer_host) or peer_host in set(local_hosts)
    if is_loopback(host) and not local:
        return (f"announced address {address} is loopback but the node joined from {peer_host}: "
                f"no other machine can dial it; start the node with --host 0.0.0.0 (or {peer_host}) "
                f"and, behind a router, --announce-host with its public address")
    return None


def dht_maddrs(bind_host: str, announce_host: str, port: int) -> tuple[list[str], list[str]]:
    """(host_maddrs, announce_maddrs) for a hivemind DHT peer listening on bind_host:port and
    reachable at announce_host:port. Announcing needs a real port (libp2p cannot announce
    port 0), so when the two hosts differ the caller passes a concrete port (`free_port`)."""
    def maddr(host: str) -> str:
        host = host.strip("[]")
        ip = _ip(host)
        proto = "ip6" if ip is not None and ip.version == 6 else ("ip4" if ip is not None else "dns")
        return f"/{proto}/{host}/tcp/{port}"

    if announce_host.strip("[]") == bind_host.strip("[]"):
        return [maddr(bind_host)], []
    if port == 0:
        raise ValueError("a DHT peer that announces another address than it binds needs a fixed port")
    return [maddr(bind_host)], [maddr(announce_host)]


def maddr_host(maddr: str) -> str | None:
    """'/ip4/10.0.0.1/tcp/31337/p2p/Qm..' -> '10.0.0.1'; None if it names no host."""
    parts = maddr.strip("/").split("/")
    return parts[1] if len(parts) > 1 and parts[0] in ("ip4", "ip6", "dns", "dns4", "dns6") else None


def maddr_tcp_address(maddr: str) -> str | None:
    """'/ip4/10.0.0.1/tcp/31337/p2p/Qm..' -> '10.0.0.1:31337'; None if it names no host and TCP port."""
    parts = maddr.strip("/").split("/")
    host = maddr_host(maddr)
    if host is None or len(parts) < 4 or parts[2] != "tcp" or not parts[3].isdigit():
        return None
    return join_host_port(host, int(parts[3]))


def dialable_maddrs(maddrs: Iterable[str]) -> list[str]:
    """What to hand to other machines out of a DHT peer's visible multiaddrs: a peer that
    listens on 0.0.0.0 sees every interface, loopback too; loopback ones are dropped when
    any other is left (a remote peer would only dial itself)."""
    maddrs = [str(m) for m in maddrs]
    others = [m for m in maddrs if not is_loopback(maddr_host(m) or "")]
    return others or maddrs


def free_port(host: str) -> int:
    """A TCP port free on `host` right now (the OS's pick). Another process could take it
    before it is bound again; used only for the DHT, whose announced port must be known
    before its daemon starts."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host.strip("[]"), 0))
        return sock.getsockname()[1]


def probe_tcp(address: str, timeout_s: float) -> str | None:
    """Open (and close) a TCP connection to host:port within timeout_s: None if it
    connected, else what went wrong. Blocking: run it in a thread from async code."""
    try:
        host, port = split_host_port(address)
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
