"""Membership: who is in the swarm, which blocks each member is assigned, and their leases.

The domain logic behind Join / Heartbeat / Leave. Every change bumps the membership epoch
and is written to the store before the method returns, so an RPC never acknowledges a change
that a crash could lose. Leases are soft state in memory; on restart every restored member
gets a fresh lease plus a grace period. Placement decisions come from `placement` (pure);
this module only applies them.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import re
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

from pollinate.coordinator.config import MembershipConfig
from pollinate.coordinator.placement import (
    Move,
    Placement,
    best_window,
    block_throughputs,
    holes_of,
    plan_moves,
)
from pollinate.coordinator.store import MemberRecord, Store
from pollinate.protocol.relay import is_relayed, parse_relayed
from pollinate.protocol.errors import (
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)
from pollinate.protocol.shared import Span

logger = logging.getLogger(__name__)

# A relayed address lists one circuit per relay (~150 characters each).
MAX_RELAYED_ADDRESS_CHARS = 2048
_RELAY_MADDR = re.compile(r"^/(ip4|ip6|dns|dns4|dns6)/[^/]{1,253}/tcp/\d{1,5}/p2p/[1-9A-HJ-NP-Za-km-z]{20,80}$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def parse_address(address: str) -> tuple[str, int]:
    """host:port (IPv6 as [addr]:port) -> (host, port); InvalidRequest if malformed. A relayed
    address (protocol/relay.py) is checked for form and gives (address, 0): it has no port."""
    if is_relayed(address):
        if len(address) > MAX_RELAYED_ADDRESS_CHARS:
            raise InvalidRequest(f"relayed address of {len(address)} characters; at most "
                                 f"{MAX_RELAYED_ADDRESS_CHARS}")
        try:
            parse_relayed(address)
        except ValueError as e:
            raise InvalidRequest(f"address {address!r}: {e}") from None
        return address, 0
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise InvalidRequest(f"address {address!r} is not host:port")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise InvalidRequest(f"address {address!r}: port {port} is outside 1..65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidRequest(f"address {address!r}: {host} is not an IPv6 address") from None
    elif not _HOSTNAME.match(host):
        raise InvalidRequest(f"address {address!r}: {host!r} is not a hostname or IPv4 address")
    return host, port


@dataclass(frozen=True, kw_only=True)
class JoinParams:
    """A decoded Join request."""

    address: str
    model_id: str  # empty: the swarm's model
    capacity: int  # blocks; 0 allowed only with requested_span
    throughput: float  # tokens/s
    requested_span: Span | None = None  # operator's --blocks: pinned
    current_span: Span | None = None  # held already (re-join): kept if valid, movable
    name: str = ""
    source_host: str = ""  # peer IP as gRPC saw it
    relay_maddr: str = ""  # the node offers its DHT peer as a circuit relay (--relay)
    member_key: str = ""  # the key that signed the Join (protocol/identity.py); unsigned Joins are refused
    quant: str = "none"  # its Linear weights: "none", "int8" or "int4" (node/quant.py)


@dataclass(slots=True)
class Member:
    """A live member: its durable record plus soft state."""

    record: MemberRecord
    name: str
    span: Span  # assigned
    throughput: float
    serving_span: Span | None  # last reported; None until the node says it serves
    lease_deadline: float  # monotonic seconds
    last_heartbeat_at: float  # unix seconds, for status
    move_reason: str = ""  # set while a MOVE instruction is pending
    relay_maddr: str = ""  # offered as a circuit relay; soft state, re-sent at every join
    # Its public key (protocol/identity.py): calls in its name must be signed by it. Stored
    # (record.public_key), so a restarted coordinator still knows it. "" only for a row stored
    # before Joins had to be signed: every call in its name is refused until it joins again.
    member_key: str = ""
    quant: str = "none"  # its Linear weights (node/quant.py); soft state, re-sent at every join
    load: dict | None = None  # batch sizes and queue waits, as its last heartbeat said (soft state)

    @property
    def member_id(self) -> str:
        return self.record.member_id

    @property
    def state(self) -> str:
        return "online" if self.serving_span == self.span else "loading"

    def placement(self) -> Placement:
        return Placement(span=self.span, throughput=self.throughput,
                         capacity=self.record.capacity, pinned=self.record.pinned)


@dataclass(frozen=True, kw_only=True)
class HeartbeatResult:
    epoch: int
    span: Span
    move: Span | None  # an instruction to load this span, or None
    reason: str


class Membership:
    """All members, in memory and in the store. Not thread-safe: one event loop owns it."""

    def __init__(
        self,
        config: MembershipConfig,
        store: Store,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.wall_clock = wall_clock
        self.epoch = 0
        self.members: dict[str, Member] = {}
        self._by_address: dict[str, str] = {}
        self._per_source: dict[str, int] = {}
        # Per-block assigned throughput, kept up to date on every change so a join costs
        # O(num_blocks) instead of a pass over all members; rebuilt by rebalance().
        self._load = [0.0] * config.num_blocks
        # Bumped by every placement change (all go through _add_load). A plan depends on
        # placements alone, so a periodic check with nothing changed since a plan that found
        # no move is skipped: it cost 20-50 ms per 2000 members, a stall every heartbeat
        # arriving meanwhile waited out.
        self._changes = 0
        self._settled_at = -1  # _changes when the last plan found nothing to do
        # joins, heartbeats, leaves, evictions, moves: for /metrics.
        self.counters: Counter[str] = Counter()
        # The last members to leave or be evicted, newest last, for the status page (a killed
        # node must not vanish without a trace): dicts of member_id, address, name, span,
        # at (unix s), why. 50: a screenful; older ones are in the log.
        self.departures: deque[dict] = deque(maxlen=50)

    # ---- lifecycle --------------------------------------------------------------------

    def restore(self) -> int:
        """Load members and epoch from the store; every member gets lease + restart grace."""
        self.store.check_model(self.config.model_id, self.config.num_blocks)
        self.epoch, records = self.store.load_members()
        deadline = self.clock() + self.config.lease_s + self.config.restart_grace_s
        for rec in records:
            self._insert(Member(record=rec, name="", span=rec.span, throughput=rec.throughput,
                                serving_span=None, lease_deadline=deadline,
                                last_heartbeat_at=0.0, member_key=rec.public_key))
        if records:
            logger.info("restored %d members at epoch %d; they have %.1f s to heartbeat",
                        len(records), self.epoch,
                        self.config.lease_s + self.config.restart_grace_s)
        return len(records)

    # ---- RPC-driven changes -----------------------------------------------------------

    def join(self, params: JoinParams) -> Member:
        """A node joins (or re-joins from the same address, replacing its ghost): checked,
        capped per source host, given a span, written to the store, then admitted."""
        capacity = self._check_join(params)
        # The same address joining again is the same node restarted: it replaces its ghost.
        replaced = self._by_address.get(params.address)
        self._check_source_cap(params, replaced)
        old = self.members.get(replaced) if replaced else None
        pinned = params.requested_span is not None
        span = self._span_for(params, capacity, old)
        record = MemberRecord(
            member_id=uuid.uuid4().hex[:16], address=params.address,
            source_host=params.source_host, capacity=capacity,
            throughput=float(params.throughput), span=span, pinned=pinned,
            joined_at=self.wall_clock(), public_key=params.member_key,
        )
        epoch = self.epoch + 1
        self.store.record_change(epoch, added=[record], removed=[replaced] if replaced else [])
        self.epoch = epoch
        if old is not None:
            self._remove(old.member_id)
            logger.info("member %s at %s re-joined as %s", old.member_id, params.address,
                        record.member_id)
        member = Member(record=record, name=params.name, span=span,
                        throughput=record.throughput,
                        serving_span=params.current_span if params.current_span == span else None,
                        lease_deadline=self.clock() + self.config.lease_s,
                        last_heartbeat_at=self.wall_clock(), relay_maddr=params.relay_maddr,
                        member_key=params.member_key,
                        quant=params.quant)
        self._insert(member)
        self.counters["joins"] += 1
        logger.info("member %s (%s%s) joined: blocks %s%s, %.1f tok/s; epoch %d, %d members",
                    record.member_id, params.address, f", {params.name}" if params.name else "",
                    span, " (pinned)" if pinned else "", record.throughput, epoch,
                    len(self.members))
        return member

    def member_at(self, address: str) -> Member | None:
        member_id = self._by_address.get(address)
        return self.members.get(member_id) if member_id else None

    def check_key(self, member_id: str, key: str | None) -> None:
        """Raise Unauthenticated unless a call in `member_id`'s name was signed by its key
        (`key`: the public key that signed it, None if none did).
        Unknown ids pass (the call itself answers NOT_FOUND). A member without a key (a row
        stored before Joins had to be signed) is refused every call: its node joins again, signed."""
        member = self.members.get(member_id)
        if member is None:
            return
        if not member.member_key:
            raise Unauthenticated(f"member {member_id} joined unsigned, before Joins had to be signed; "
                                  f"join again with a signed Join (docs/security.md)")
        if key is None or not hmac.compare_digest(key.encode(), member.member_key.encode()):
            raise Unauthenticated(f"member {member_id}: calls in its name must be signed by its member key "
                                  f"(protocol/identity.py); this one is not")

    def _check_join(self, params: JoinParams) -> int:
        """A Join's values checked against the swarm; returns its capacity in blocks."""
        cfg = self.config
        parse_address(params.address)
        if params.relay_maddr and not _RELAY_MADDR.match(params.relay_maddr):
            raise InvalidRequest(f"relay_maddr {params.relay_maddr[:200]!r} is not /ip4|ip6|dns/HOST/tcp/PORT/p2p/ID")
        if params.quant not in ("none", "int8", "int4"):
            raise InvalidRequest(f"quant must be none, int8 or int4, got {params.quant[:20]!r}")
        if params.model_id and params.model_id != cfg.model_id:
            raise FailedPrecondition(
                f"this swarm serves {cfg.model_id!r}, not {params.model_id!r}"
            )
        if not (math.isfinite(params.throughput) and params.throughput > 0):
            raise InvalidRequest(f"throughput must be a positive number, got {params.throughput!r}")
        capacity = params.capacity
        if capacity == 0 and params.requested_span is not None:
            capacity = params.requested_span.length
        if capacity < 1:
            raise InvalidRequest(f"capacity_blocks must be at least 1, got {params.capacity}")
        capacity = min(capacity, cfg.num_blocks)
        for label, span in (("requested_span", params.requested_span),
                            ("current_span", params.current_span)):
            if span is not None and span.end > cfg.num_blocks:
                raise InvalidRequest(
                    f"{label} {span} is outside the model's blocks 0:{cfg.num_blocks}"
                )
        if params.requested_span is not None and params.requested_span.length > capacity:
            raise InvalidRequest(
                f"requested_span {params.requested_span} needs {params.requested_span.length} "
                f"blocks but capacity_blocks is {capacity}"
            )
        return capacity

    def _check_source_cap(self, params: JoinParams, replaced: str | None) -> None:
        """At most max_members_per_address members per source host (a re-join replaces one)."""
        cap = self.config.max_members_per_address
        if not cap or not params.source_host:
            return
        count = self._per_source.get(params.source_host, 0)
        if replaced is not None and self.members[replaced].record.source_host == params.source_host:
            count -= 1
        if count >= cap:
            raise ResourceExhausted(
                f"{params.source_host} already has {count} members, the cap is "
                f"{cap} (--max-members-per-address)"
            )

    def _span_for(self, params: JoinParams, capacity: int, old: Member | None) -> Span:
        """The requested span (pinned), the one it already serves if it fits, else the
        weakest window of `capacity` blocks (placement.best_window)."""
        if params.requested_span is not None:
            return params.requested_span
        if params.current_span is not None and params.current_span.length <= capacity:
            return params.current_span
        load = list(self._load)
        if old is not None:  # its ghost's blocks are about to be freed
            for i in range(old.span.start, old.span.end):
                load[i] -= old.throughput
        return best_window(load, capacity)

    def heartbeat(self, member_id: str, serving_span: Span | None,
                  throughput: float = 0.0, load: dict | None = None) -> HeartbeatResult:
        member = self.members.get(member_id)
        if member is None:
            raise NotFound(f"unknown member {member_id!r}: join again")
        if throughput and throughput != member.throughput:
            if not (math.isfinite(throughput) and throughput > 0):
                raise InvalidRequest(f"throughput must be a positive number, got {throughput!r}")
            # Written before the reply like every other change (placement after a restart
            # depends on it); only on change, so a steady beat costs no write.
            self.store.update_throughput(member_id, throughput)
            self._add_load(member.span, throughput - member.throughput)
            member.throughput = throughput
        member.lease_deadline = self.clock() + self.config.lease_s
        self.counters["heartbeats"] += 1
        member.last_heartbeat_at = self.wall_clock()
        member.serving_span = serving_span
        if load is not None:
            member.load = load
        if member.move_reason and serving_span == member.span:
            logger.info("member %s now serves blocks %s", member_id, member.span)
            member.move_reason = ""
        move = member.span if member.move_reason else None
        return HeartbeatResult(epoch=self.epoch, span=member.span, move=move,
                               reason=member.move_reason)

    def leave(self, member_id: str) -> int:
        if member_id not in self.members:
            raise NotFound(f"unknown member {member_id!r}")
        self._remove_and_record([member_id], why="left")
        self.counters["leaves"] += 1
        return self.epoch

    # ---- timers -----------------------------------------------------------------------

    def evict_expired(self) -> list[str]:
        """Evict every member whose lease ran out; refill holes that opens. Returns ids."""
        now = self.clock()
        expired = [mid for mid, m in self.members.items() if m.lease_deadline < now]
        if expired:
            self.counters["evictions"] += len(expired)
            self._remove_and_record(expired, why=f"missed their lease ({self.config.lease_s:g} s)")
        return expired

    def rebalance(self, *, holes_only: bool = False) -> list[Move]:
        """Apply the policy's improving moves; with holes_only, act only if a block is bare."""
        cfg = self.config
        if holes_only and not self.holes() or self._settled_at == self._changes:
            return []
        placements = {mid: m.placement() for mid, m in self.members.items()}
        self._load = block_throughputs(placements.values(), cfg.num_blocks)  # drop float drift
        moves = plan_moves(placements, cfg.num_blocks, margin=cfg.rebalance_margin,
                           max_moves=cfg.max_moves_per_check)
        if not moves:
            self._settled_at = self._changes
            return []
        # A member may appear in several moves; its last one wins.
        final = {m.member_id: m.new for m in moves}
        bare = _ranges(self.holes())
        epoch = self.epoch + 1
        self.store.record_change(epoch, moved=list(final.items()))
        self.epoch = epoch
        self.counters["moves"] += len(moves)
        for move in moves:
            member = self.members[move.member_id]
            reason = (f"blocks {bare} lost their last replica" if move.before.holes else
                      f"weakest block {move.before.weakest:.1f} -> {move.after.weakest:.1f} tok/s")
            if member.span != final[move.member_id]:
                self._add_load(member.span, -member.throughput)
                member.span = final[move.member_id]
                self._add_load(member.span, member.throughput)
            member.move_reason = reason
            logger.info("member %s moves %s -> %s: %s; epoch %d", move.member_id, move.old,
                        move.new, reason, epoch)
        return moves

    # ---- views ------------------------------------------------------------------------

    def block_throughputs(self) -> list[float]:
        return [t if t > 1e-9 else 0.0 for t in self._load]

    def block_replicas(self) -> list[int]:
        counts = [0] * self.config.num_blocks
        for m in self.members.values():
            for i in range(m.span.start, m.span.end):
                counts[i] += 1
        return counts

    def holes(self) -> list[int]:
        return holes_of(self.block_throughputs())

    # ---- internals --------------------------------------------------------------------

    def _remove_and_record(self, member_ids: list[str], *, why: str) -> None:
        epoch = self.epoch + 1
        self.store.record_change(epoch, removed=member_ids)
        self.epoch = epoch
        for mid in member_ids:
            m = self._remove(mid)
            self.departures.append({"member_id": mid, "address": m.record.address, "name": m.name,
                                    "span": [m.span.start, m.span.end], "at": self.wall_clock(),
                                    "why": why})
            logger.info("member %s (%s, blocks %s) %s; epoch %d, %d members", mid,
                        m.record.address, m.span, why, epoch, len(self.members))
        bare = self.holes()
        if bare and self.members:
            logger.warning("blocks %s have no replica; rebalancing", _ranges(bare))
            self.rebalance()

    def _add_load(self, span: Span, delta: float) -> None:
        self._changes += 1
        for i in range(span.start, span.end):
            self._load[i] += delta

    def _insert(self, member: Member) -> None:
        self._add_load(member.span, member.throughput)
        self.members[member.member_id] = member
        self._by_address[member.record.address] = member.member_id
        src = member.record.source_host
        self._per_source[src] = self._per_source.get(src, 0) + 1

    def _remove(self, member_id: str) -> Member:
        member = self.members.pop(member_id)
        self._add_load(member.span, -member.throughput)
        if self._by_address.get(member.record.address) == member_id:
            del self._by_address[member.record.address]
        src = member.record.source_host
        self._per_source[src] -= 1
        if not self._per_source[src]:
            del self._per_source[src]
        return member


def _ranges(blocks: list[int]) -> str:
    """[3, 4, 5, 9] -> "3:6,9:10"."""
    out, start = [], None
    for i, b in enumerate(blocks):
        if start is None:
            start = b
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            out.append(f"{start}:{b + 1}")
            start = None
    return ",".join(out)
