"""Reaching a node that cannot be dialled: gRPC's byte stream carried over libp2p circuit relays.

A node behind a home router accepts no inbound connection. It runs a libp2p daemon (hivemind's
`p2pd`, already a dependency) that holds a reservation at one or more relays, and serves one
stream protocol, RELAY_PROTOCOL, by piping each stream into its own gRPC port on loopback.
Whoever wants to call it opens a channel to its relayed address exactly as to "host:port":
`open_channel` (protocol/channels.py) asks this module for a loopback port whose every TCP
connection becomes one libp2p stream to the node through a relay. gRPC runs end to end over
that pipe, so the swarm token, the message limits, keepalive and every deadline work as on a
direct link; the relay forwards libp2p's end-to-end encrypted connection (Noise or TLS 1.3
between the two peers), so it sees who talks to whom and how much, not what.

    server = RelayedServer(RelayConfig())                   # on the node behind NAT
    address = await server.start(relays, grpc_port)         # "/ip4/R/tcp/P/p2p/Qm../p2p-circuit/p2p/Qm.."
    channel = open_channel(address, ChannelConfig(...))     # anywhere: routed through the relay

A relayed address is a list of circuit multiaddrs joined by "+", one per relay the node
reserved at (not commas: addresses travel in comma-separated lists); it starts with "/" where
a direct address is "host:port". A dial tries every
relay of the list, so a relay that dies costs the streams it carried, not the node.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import weakref
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# The one libp2p protocol a relayed node serves: a raw byte stream into its gRPC port.
RELAY_PROTOCOL = "/pollinate/grpc/1.0.0"
# Between the circuits of one relayed address; never part of a multiaddr.
SEPARATOR = "+"
_CHUNK = 1 << 16


@dataclass(frozen=True, kw_only=True)
class RelayConfig:
    """Timeouts of the libp2p side of a relayed link."""

    # Seconds a libp2p daemon may take to start (it is a Go binary: well under a second).
    start_timeout_s: float = 15.0
    # Seconds one dial through a relay may take (connect to the relay, open the circuit,
    # open the stream); a relay that is gone fails faster (connection refused).
    dial_timeout_s: float = 10.0


def is_relayed(address: str) -> bool:
    """A relayed address (circuit multiaddrs) rather than "host:port"."""
    return address.startswith("/")


def relayed_address(relay_maddrs: list[str], peer_id: str) -> str:
    """The address of peer `peer_id` reached through each relay in relay_maddrs (each
    "/ip4/../tcp/../p2p/<relay id>")."""
    if not relay_maddrs:
        raise ValueError("a relayed address needs at least one relay")
    return SEPARATOR.join(f"{m}/p2p-circuit/p2p/{peer_id}" for m in relay_maddrs)


def parse_relayed(address: str) -> tuple[str, list[str]]:
    """(the node's peer id, its circuit multiaddrs without the trailing /p2p/<id>); ValueError
    if `address` is not a well-formed relayed address."""
    peer_ids, circuits = set(), []
    for part in address.split(SEPARATOR):
        head, sep, peer_id = part.rpartition("/p2p-circuit/p2p/")
        if not sep or not head.startswith("/") or "/p2p/" not in head or not peer_id or "/" in peer_id:
            raise ValueError(f"not a relayed address (…/p2p/RELAY/p2p-circuit/p2p/NODE): {part!r}")
        peer_ids.add(peer_id)
        circuits.append(head + "/p2p-circuit")
    if len(peer_ids) != 1:
        raise ValueError(f"a relayed address names one node, this one names {len(peer_ids)}")
    return peer_ids.pop(), circuits


def relay_hosts(address: str) -> list[str]:
    """The relays' hosts in a relayed address (for logs and status)."""
    from pollinate.protocol.addresses import maddr_host

    return [maddr_host(c) or "?" for c in parse_relayed(address)[1]]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _WireMaddr:
    """A multiaddr as the Go daemon parses it. hivemind's vendored multiaddr encodes a /p2p/
    component as a CID where go-multiaddr expects the bare multihash ("length greater than
    remaining number of bytes" from the daemon), so circuit addresses are encoded here:
    everything before the relay's /p2p/ by hivemind, the /p2p/ and /p2p-circuit parts by hand."""

    _P2P, _CIRCUIT = 0x01A5, 0x0122

    def __init__(self, circuit: str):
        from hivemind.p2p import PeerID
        from hivemind.utils.multiaddr import Multiaddr

        transport, _, rest = circuit.partition("/p2p/")
        relay_id = rest.removesuffix("/p2p-circuit")
        multihash = PeerID.from_base58(relay_id).to_bytes()
        self._bytes = (Multiaddr(transport).to_bytes() + _varint(self._P2P) + _varint(len(multihash))
                       + multihash + _varint(self._CIRCUIT))
        self._text = circuit

    def to_bytes(self) -> bytes:
        return self._bytes

    def __str__(self) -> str:
        return self._text


async def _start_p2p(config: RelayConfig, **kwargs: Any):
    """A hivemind P2P (its own p2pd process, gone with this process: the daemon exits once
    our persistent control connection has been closed for its idle timeout)."""
    from hivemind.p2p import P2P

    class StaticRelayP2P(P2P):
        """p2pd with -autoRelay and -trustedRelays still waits for relay *discovery* (3 minutes
        of boot delay with fewer than 4 candidates) unless -relayDiscovery=0 asks for the
        trusted relays alone; hivemind's P2P.create cannot pass that flag."""

        @staticmethod
        def _make_process_args(*args, **kw):
            if kw.get("autoRelay") and kw.get("trustedRelays"):
                kw["relayDiscovery"] = False
            return P2P._make_process_args(*args, **kw)

    return await StaticRelayP2P.create(startup_timeout=config.start_timeout_s, **kwargs)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, label: str = "") -> None:
    """Copy reader into writer until EOF or an error, then close writer's side."""
    moved = 0
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
            moved += len(data)
        logger.debug("relay pipe %s: EOF after %d B", label, moved)
    except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
        logger.debug("relay pipe %s: %r after %d B", label, e, moved)
    finally:
        try:
            writer.close()
        except (ConnectionError, OSError, RuntimeError):
            pass


async def _splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                  b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """Both directions until either side ends; then both are closed."""
    tasks = [asyncio.create_task(_pipe(a[0], b[1], "a->b")), asyncio.create_task(_pipe(b[0], a[1], "b->a"))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        for _, w in (a, b):
            w.close()


class RelayedServer:
    """The node's side: reservations at the relays, RELAY_PROTOCOL streams into its gRPC port."""

    def __init__(self, config: RelayConfig = RelayConfig()):
        self.config = config
        self.p2p = None
        self.address: str | None = None
        self.streams_served = 0
        self._host, self._port = "127.0.0.1", 0

    async def start(self, relays: list[str], port: int, host: str = "127.0.0.1") -> str:
        """Start the daemon, reserve at every relay, serve streams into host:port; returns
        the relayed address. Whether a reservation is in place yet is only known by dialling
        it (RelayDialer.check, which the coordinator does at the node's request)."""
        if not relays:
            raise ValueError("no relay is known: the coordinator offers none (is it started with --no-relay?)")
        self._host, self._port = host, port
        # No bootstrap peers: autorelay dials the trusted relays itself, and a dead one among
        # them (a list from before it died) must not fail the daemon's start.
        self.p2p = await _start_p2p(
            self.config, trusted_relays=relays, use_auto_relay=True,
            force_reachability="private", host_maddrs=["/ip4/0.0.0.0/tcp/0"],
        )
        await self.p2p.add_binary_stream_handler(RELAY_PROTOCOL, self._handle)
        self.address = relayed_address(relays, self.p2p.peer_id.to_base58())
        return self.address

    async def _handle(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            local = await asyncio.open_connection(self._host, self._port)
        except OSError as e:
            logger.warning("relayed stream from %s: gRPC port %d refused (%s)", stream_info.peer_id, self._port, e)
            writer.close()
            return
        self.streams_served += 1
        await _splice((reader, writer), local)

    async def stop(self) -> None:
        if self.p2p is not None:
            await self.p2p.shutdown()
            self.p2p = None


class RelayDialer:
    """The caller's side, one per event loop: a loopback listener per relayed address, each of
    its connections spliced to a fresh RELAY_PROTOCOL stream to the node."""

    def __init__(self, config: RelayConfig = RelayConfig()):
        self.config = config
        self._p2p = None
        self._p2p_lock = asyncio.Lock()
        self._listeners: dict[str, tuple[socket.socket, asyncio.Task]] = {}

    def local_address(self, address: str) -> str:
        """"127.0.0.1:PORT" whose connections reach the relayed node at `address`. Synchronous
        (channels are opened synchronously): the socket listens at once, its connections are
        accepted as soon as the event loop runs."""
        entry = self._listeners.get(address)
        if entry is None:
            parse_relayed(address)  # ValueError now rather than at the first connection
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(64)
            sock.setblocking(False)

            async def serve() -> None:
                server = await asyncio.start_server(lambda r, w: self._forward(address, r, w), sock=sock)
                async with server:
                    await server.serve_forever()

            entry = self._listeners[address] = (sock, asyncio.get_running_loop().create_task(serve()))
        return f"127.0.0.1:{entry[0].getsockname()[1]}"

    async def _daemon(self):
        async with self._p2p_lock:
            if self._p2p is None:
                self._p2p = await _start_p2p(self.config, host_maddrs=[], no_listen=True)
            return self._p2p

    async def open_stream(self, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A RELAY_PROTOCOL stream to the node at `address`, through the first relay that works."""
        from hivemind.p2p import PeerID

        peer_id, circuits = parse_relayed(address)
        p2p = await self._daemon()
        node = PeerID.from_base58(peer_id)

        async def dial():
            await p2p._client.connect(node, [_WireMaddr(c) for c in circuits])
            _, reader, writer = await p2p.call_binary_stream_handler(node, RELAY_PROTOCOL)
            return reader, writer

        return await asyncio.wait_for(dial(), self.config.dial_timeout_s)

    async def _forward(self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            remote = await self.open_stream(address)
        except Exception as e:  # the caller's gRPC sees the connection close: UNAVAILABLE
            logger.info("cannot reach %s through its relays: %s", address[-16:], e)
            writer.close()
            return
        await _splice((reader, writer), remote)

    async def check(self, address: str) -> str | None:
        """None if a stream to the relayed node opens now, else why not."""
        try:
            _, writer = await self.open_stream(address)
        except Exception as e:
            return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        writer.close()
        return None

    async def close(self) -> None:
        for sock, task in self._listeners.values():
            task.cancel()
            sock.close()
        self._listeners.clear()
        if self._p2p is not None:
            await self._p2p.shutdown()
            self._p2p = None


_dialers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def dialer() -> RelayDialer:
    """This event loop's RelayDialer (created on first use)."""
    loop = asyncio.get_running_loop()
    d = _dialers.get(loop)
    if d is None:
        d = _dialers[loop] = RelayDialer()
    return d
