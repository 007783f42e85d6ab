"""The client's view of the swarm: peers from the DHT, bans, routes, channels.

All methods run on the client's event loop (client/worker.py). DHT lookups are blocking
calls into hivemind's process, so they go through a thread.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc.aio

from pollinate.client.config import ClientConfig
from pollinate.client.dht_lookup import fetch_peers
from pollinate.client.routing import BanList, Hop, NoRouteError, PeerSpan, find_route
from pollinate.client.spot_check import SpotChecker
from pollinate.protocol.channels import ChannelConfig, open_channel, peer_channel_config
from pollinate.protocol.errors import PeerUnavailable, SessionHandedOff, SpanMoved, one_line
from pollinate.protocol.relay import is_relayed
from pollinate.protocol.v1 import node_pb2_grpc

logger = logging.getLogger(__name__)

REPORT_WAIT_S = 3.0  # close() waits this long for liar reports still under way, seconds
# Longest wait for the coordinator's quarantine list on a DHT re-read, seconds: short, since
# routing goes on without the coordinator (the last list stands) and waits for this call.
QUARANTINE_READ_S = 2.0


class Swarm:
    def __init__(self, *, dht, model_id: str, num_blocks: int, config: ClientConfig):
        self.dht = dht
        self.model_id = model_id
        self.num_blocks = num_blocks
        self.config = config
        self.bans = BanList(base_s=config.ban_base_s, max_s=config.ban_max_s)
        self._peers: list[PeerSpan] = []
        self._fetched_at = -float("inf")
        # (peer id, start, end) of records a peer has refuted (SpanMoved) -> ignored until then
        self._stale: dict[tuple[str, int, int], float] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._relay_failures: dict[str, float] = {}  # relayed peer id -> when a call to it last failed
        self.liars: dict[str, str] = {}  # peer id -> why: caught answering wrong, never routed again
        # their addresses too: a liar that restarts its DHT peer under a new id (ids are free)
        # at the same address stays out of routes
        self.liar_addresses: dict[str, str] = {}
        # addresses the coordinator quarantined (coordinator/quarantine.py), left out of routes
        self.quarantined: frozenset[str] = frozenset()
        # the coordinator's members' addresses: routes use only DHT records at these (anyone
        # who reaches the DHT can announce one); None: no list read, every record counts
        self.members: frozenset[str] | None = None
        self._strangers: set[str] = set()  # non-member addresses already logged
        self.reports: list = []  # ReportLiarReply per liar reported, in order (for tests and chaos.py)
        self._reporting: set[asyncio.Task] = set()
        # one report at a time: the coordinator judges one per reporter address at once
        # (coordinator/evidence.py) and would refuse a second with RESOURCE_EXHAUSTED
        self._report_lock = asyncio.Lock()
        self.spot_checks = SpotChecker(self, rate=config.spot_check_rate, tolerance=config.spot_check_tolerance,
                                       grad_tolerance=config.spot_check_grad_tolerance)

    @property
    def keeps_evidence(self) -> bool:
        """Keep what nodes sign (protocol/answers.py), to show the coordinator a liar's answer:
        only a client that checks and has a coordinator to tell."""
        return bool(self.config.coordinator) and self.config.spot_check_rate > 0

    async def peers(self, *, refresh: bool = False) -> list[PeerSpan]:
        if refresh or time.monotonic() - self._fetched_at > self.config.peers_ttl_s:
            self._peers = await asyncio.to_thread(
                fetch_peers, self.dht, self.model_id, self.num_blocks, token=self.config.token,
                timeout_s=self.config.dht_timeout_s
            )
            self._fetched_at = time.monotonic()
            if self.config.coordinator:
                await self._read_quarantine()
            logger.debug("DHT: %d peers: %s", len(self._peers), [f"{p.address}[{p.start}:{p.end}]" for p in self._peers])
        now = time.monotonic()
        self._stale = {k: until for k, until in self._stale.items() if until > now}
        return [p for p in self._peers if (p.peer_id, p.start, p.end) not in self._stale]

    async def route(self, start: int, end: int, *, exclude: frozenset[str] = frozenset()) -> list[Hop]:
        """Cheapest chain for [start, end) among unbanned peers not in `exclude` (peer ids);
        re-reads the DHT once on failure."""
        banned = self.bans.banned(time.monotonic()) | exclude | frozenset(self.liars)
        try:
            return find_route(self._routable(await self.peers()), start, end, config=self.config.routing,
                              banned=banned)
        except NoRouteError:
            peers = self._routable(await self.peers(refresh=True))
            return find_route(peers, start, end, config=self.config.routing, banned=banned)

    def _routable(self, peers: list[PeerSpan]) -> list[PeerSpan]:
        """Peers neither quarantined, nor at a liar's address, nor unknown to the coordinator
        (when it lists members)."""
        kept = [p for p in peers if p.address not in self.quarantined and p.address not in self.liar_addresses]
        if self.members is None:
            return kept
        for p in kept:
            if p.address not in self.members and p.address not in self._strangers:
                self._strangers.add(p.address)
                logger.warning("DHT record of peer %s at %s (blocks %d:%d) names no member of the swarm; "
                               "not routing through it", p.peer_id[-8:], one_line(p.address, 200), p.start, p.end)
        return [p for p in kept if p.address in self.members]

    def ban(self, peer: PeerSpan, reason: BaseException) -> None:
        """Leave a failed peer out of routes for a while (doubling per repeat). A peer that
        answered SpanMoved is alive and serves other blocks now: only that record of it is
        ignored, so it stays routable for the blocks it does serve (it may be their only host).
        So is one that handed a session off (SessionHandedOff): it left those blocks, for
        other blocks (a move) or for good (then its records say offline)."""
        self._fetched_at = -float("inf")  # what failed may be a stale record: re-read the DHT on the next route
        if isinstance(reason, (SpanMoved, SessionHandedOff)):
            self._stale[(peer.peer_id, peer.start, peer.end)] = time.monotonic() + self.config.ban_base_s
            logger.info("peer %s (%s) no longer serves blocks %d:%d (%s); re-reading the DHT",
                        peer.peer_id[-8:], peer.address, peer.start, peer.end, reason)
            return
        if is_relayed(peer.address) and isinstance(reason, PeerUnavailable) and self._first_relay_failure(peer):
            # Most likely the relay died, not the node: the next stream goes through another
            # relay of its address (protocol/relay.py). A second failure soon after bans it.
            logger.warning("relayed peer %s (blocks %d:%d) unreachable: %s; retrying through its other relays",
                           peer.peer_id[-8:], peer.start, peer.end, reason)
            return
        length = self.bans.ban(peer.peer_id, time.monotonic())
        logger.warning("peer %s (%s, blocks %d:%d) failed: %s; banned for %.0f s",
                       peer.peer_id[-8:], peer.address, peer.start, peer.end, reason, length)

    def mark_liar(self, peer: PeerSpan, why: str, *, evidence: dict | None = None) -> None:
        """Never route through `peer` again (client/spot_check.py caught it); with a
        coordinator, report it there (ReportLiar with `evidence`: blocks, distance, tolerance,
        checkers, and "signed": the node's AnswerEvidence or None), in the background."""
        self.liars[peer.peer_id] = why
        self.liar_addresses[peer.address] = why
        logger.warning("peer %s (%s) answered wrong: %s; never routing through it again", peer.peer_id[-8:],
                       peer.address, why)
        if self.config.coordinator and evidence is not None:
            task = asyncio.ensure_future(self._report_liar(peer, evidence))
            self._reporting.add(task)
            task.add_done_callback(self._reporting.discard)

    def _coordinator_stub(self):
        from pollinate.protocol.channels import COORDINATOR_MAX_MESSAGE_BYTES, coordinator_tls
        from pollinate.protocol.v1 import coordinator_pb2_grpc

        address = self.config.coordinator
        channel = self._channels.get(address)
        if channel is None:  # a report's evidence (protocol/answers.py) may exceed a tensor chunk's size
            channel = self._channels[address] = open_channel(
                address, ChannelConfig(token=self.config.token, max_message_bytes=COORDINATOR_MAX_MESSAGE_BYTES,
                                       **coordinator_tls(self.config.coordinator_tls)))
        return coordinator_pb2_grpc.CoordinatorStub(channel)

    async def _report_liar(self, peer: PeerSpan, evidence: dict) -> None:
        from pollinate.protocol.pieces import to_pieces
        from pollinate.protocol.v1 import common_pb2, coordinator_pb2

        start, end = evidence["blocks"]
        request = coordinator_pb2.ReportLiarRequest(
            address=peer.address, peer_id=peer.peer_id, blocks=common_pb2.Span(start=start, end=end),
            distance=evidence["distance"], tolerance=evidence["tolerance"], checkers=evidence["checkers"],
            evidence=evidence.get("signed"))
        try:
            async with self._report_lock:  # the coordinator re-runs the evidence on other members first
                reply = await self._coordinator_stub().ReportLiarInPieces(  # evidence may be many MiB
                    to_pieces(request), timeout=max(60.0, self.config.step_timeout_s))
        except grpc.aio.AioRpcError as e:  # the ban here stands; the coordinator just does not hear of it
            logger.warning("reporting %s to the coordinator failed: %s %s", peer.address, e.code().name, e.details())
            return
        self.reports.append(reply)
        logger.warning("reported %s to the coordinator: %s, %s (%d of %d reporters)", peer.address,
                       reply.verdict or "unverified", "quarantined" if reply.quarantined else "not quarantined yet",
                       reply.reporters, reply.needed)

    async def _read_quarantine(self) -> None:
        """The coordinator's quarantined nodes; on failure the last list stands (serving goes
        on without the coordinator)."""
        from pollinate.protocol.v1 import coordinator_pb2

        try:
            reply = await self._coordinator_stub().ListQuarantined(coordinator_pb2.ListQuarantinedRequest(),
                                                                   timeout=QUARANTINE_READ_S)
        except grpc.aio.AioRpcError as e:
            logger.info("quarantine list not read from the coordinator: %s", e.code().name)
            return
        self.quarantined = frozenset(n.address for n in reply.nodes)
        if reply.lists_members:
            self.members = frozenset(reply.member_addresses)

    def _first_relay_failure(self, peer: PeerSpan) -> bool:
        """True once per ban_base_s for a relayed peer: its first unreachable call is retried."""
        now = time.monotonic()
        if now - self._relay_failures.get(peer.peer_id, -float("inf")) < self.config.ban_base_s:
            return False
        self._relay_failures[peer.peer_id] = now
        return True

    def stub(self, address: str) -> node_pb2_grpc.NodeStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, peer_channel_config(self.config.token))
        return node_pb2_grpc.NodeStub(channel)

    async def close(self) -> None:
        if self._reporting:  # a report under way gets a moment to be answered (ms on a LAN)
            _, late = await asyncio.wait(set(self._reporting), timeout=REPORT_WAIT_S)
            for task in late:
                task.cancel()
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()
