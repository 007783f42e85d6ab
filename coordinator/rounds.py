"""DiLoCo rounds at the coordinator: quorum, shard assignment and commit per (job, span).

BeginRound(job, span, r): the first member to ask opens round r; the round closes when every
live replica of the span has asked, or when ``window_s`` has passed since it opened (a
replica that does not show is left out). The group is the members that asked, sorted by
member id; member j owns shard j. CommitRound: each member reports the checksum of its new
global state; once all have reported, the round commits if the checksums agree (the state
bytes are written to a file in the data directory and the row to ``committed_states``, both
before any reply) and aborts otherwise. A committed round is never deleted.

Round numbers: r must be the last committed round of (job, span) + 1. After an abort the
same number is formed again, as a new *attempt* (1, 2, ...; CommitRound names the attempt).

Faults (issue 6). A member whose exchange fails (an owner died, its stream broke, a timeout)
rolls back and asks BeginRound(r) again at once; for a formation still in progress that
means "I abandon this attempt". The group shrinks to the members that report a checksum:
a formation settles as soon as every member has reported, abandoned it, or left the swarm
(lease expired). If at least one member reported and all reported checksums agree, the
round commits for them (they hold every shard's result, so the abandoned members' absence
changed nothing they applied) and an abandoned member is told to fetch the committed state;
if nobody reported, the attempt aborts and the waiting members form the next attempt right
away with the span's live replicas.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pollinate.coordinator.config import RoundsConfig
from pollinate.coordinator.placement import Span
from pollinate.coordinator.store import Store, _transaction
from pollinate.protocol.errors import FailedPrecondition, InvalidRequest, NotFound

logger = logging.getLogger(__name__)

STATES_DIR = "states"
POLL_S = 0.5  # how often a waiting round re-checks leases (a dead member stops being waited for)


@dataclass(frozen=True, kw_only=True)
class Group:
    round: int
    members: tuple[tuple[str, str], ...]  # (member_id, address), in shard order
    attempt: int = 1


@dataclass(kw_only=True)
class _Round:
    opened_at: float
    attempt: int = 1
    abandoned: set[str] = field(default_factory=set)  # members that asked for the round again
    asked: dict[str, int] = field(default_factory=dict)  # member_id -> tokens
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    group: Group | None = None
    checksums: dict[str, str] = field(default_factory=dict)
    state: bytes = b""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: tuple[bool, str] = (False, "")


Key = tuple[str, int, int]  # job, span start, span end


class Rounds:
    """Round bookkeeping on the coordinator's event loop; durable parts in the Store."""

    def __init__(self, config: RoundsConfig, store: Store, membership) -> None:
        self.config = config
        self.store = store
        self.membership = membership
        self._open: dict[tuple[Key, int], _Round] = {}
        self._attempts: dict[tuple[Key, int], int] = {}  # the last attempt formed per round

    # ---- queries --------------------------------------------------------------------

    def committed_round(self, key: Key) -> int:
        row = self.store.db.execute(
            "SELECT MAX(round) FROM committed_states WHERE job_name=? AND span_start=? AND span_end=?",
            key).fetchone()
        return int(row[0] or 0)

    def committed_state(self, job: str, span: Span) -> tuple[int, str, bytes]:
        key = (job, span.start, span.end)
        row = self.store.db.execute(
            "SELECT round, path, checksum FROM committed_states WHERE job_name=? AND span_start=? "
            "AND span_end=? ORDER BY round DESC LIMIT 1", key).fetchone()
        if row is None:
            raise NotFound(f"job {job!r} span {span}: no committed round yet")
        data = (Path(self.store.config.data_dir) / row[1]).read_bytes()
        return int(row[0]), row[2], data

    # ---- BeginRound -----------------------------------------------------------------

    async def begin(self, job: str, span: Span, round_index: int, member_id: str,
                    tokens: int) -> tuple[Group, int]:
        if not job:
            raise InvalidRequest("BeginRound: job is required")
        member = self.membership.members.get(member_id)
        if member is None:
            raise NotFound(f"BeginRound: member {member_id!r} is not in the swarm (join first)")
        key = (job, span.start, span.end)
        expected = self.committed_round(key) + 1
        if round_index != expected:
            raise FailedPrecondition(f"BeginRound: job {job!r} span {span}: round {round_index} "
                                     f"asked, the next round is {expected}")
        rnd = self._open.get((key, round_index))
        if (rnd is not None and rnd.group is not None and not rnd.done.is_set()
                and member_id in dict(rnd.group.members)):
            rnd = await self._abandon(key, round_index, rnd, member_id)
        if rnd is not None and rnd.group is not None and (
                member_id not in dict(rnd.group.members) or rnd.done.is_set()):
            if rnd.done.is_set():  # an aborted round: form it again
                rnd = None
            else:
                raise FailedPrecondition(f"BeginRound: round {round_index} of job {job!r} span "
                                         f"{span} already formed without {member_id}")
        if rnd is None:
            attempt = self._attempts[(key, round_index)] = self._attempts.get((key, round_index), 0) + 1
            rnd = self._open[(key, round_index)] = _Round(opened_at=time.monotonic(), attempt=attempt)
        rnd.asked[member_id] = tokens
        while rnd.group is None:  # re-checked every poll: a replica that dies stops being waited for
            replicas = {m.member_id for m in self.membership.members.values() if m.span == span}
            left = self.config.window_s - (time.monotonic() - rnd.opened_at)
            if replicas <= set(rnd.asked) or left <= 0:
                self._close(key, round_index, rnd)
                break
            try:
                await asyncio.wait_for(rnd.closed.wait(), min(left, POLL_S))
            except asyncio.TimeoutError:
                pass
        group = rnd.group
        ids = [m for m, _ in group.members]
        if member_id not in ids:
            raise FailedPrecondition(f"BeginRound: round {round_index} formed without {member_id}")
        return group, ids.index(member_id)

    def _close(self, key: Key, round_index: int, rnd: _Round) -> None:
        ids = sorted(rnd.asked)
        members = tuple((m, self.membership.members[m].record.address)
                        for m in ids if m in self.membership.members)
        rnd.group = Group(round=round_index, members=members, attempt=rnd.attempt)
        now = time.time()
        db = self.store.db
        with _transaction(db):
            # a registered job turns "training" (updated_at: its last round formed); a job met
            # here first gets a placeholder row that registering fills in
            db.execute("INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
                       "state=excluded.state, updated_at=excluded.updated_at",
                       (key[0], "", "", "{}", "{}", "training", now, now))
            db.execute("INSERT INTO rounds VALUES (?,?,?,?,?,?,NULL) ON CONFLICT DO UPDATE SET "
                       "state=excluded.state, created_at=excluded.created_at",
                       (*key, round_index, "exchanging", now))
            db.execute("DELETE FROM round_members WHERE job_name=? AND span_start=? AND span_end=? "
                       "AND round=?", (*key, round_index))
            db.executemany("INSERT INTO round_members VALUES (?,?,?,?,?,?,?,NULL)",
                           [(*key, round_index, m, j, rnd.asked[m]) for j, (m, _) in enumerate(members)])
        rnd.closed.set()
        logger.info("round %d of job %s span %d:%d formed (attempt %d) with %d member(s): %s",
                    round_index, key[0], key[1], key[2], rnd.attempt, len(members), ", ".join(ids))

    async def _abandon(self, key: Key, round_index: int, rnd: _Round, member_id: str) -> _Round | None:
        """A member of a formation in progress asked again: it gave this attempt up. Wait for
        the formation to settle; committed without it -> FailedPrecondition (fetch the committed
        state); aborted -> None, and the caller forms the next attempt."""
        rnd.abandoned.add(member_id)
        logger.info("round %d of job %s span %d:%d attempt %d: %s gave up on it", round_index,
                    *key, rnd.attempt, member_id)
        await self._settled(key, round_index, rnd)
        if rnd.outcome[0]:
            raise FailedPrecondition(f"BeginRound: round {round_index} of job {key[0]!r} was committed "
                                     f"without {member_id}; fetch it with GetCommittedState")
        current = self._open.get((key, round_index))
        return None if current is rnd else current

    def _settle(self, key: Key, round_index: int, rnd: _Round) -> None:
        """Finish the formation once every member reported, gave up, or left the swarm."""
        if rnd.done.is_set():
            return
        ids = {m for m, _ in rnd.group.members}
        gone = {m for m in ids if m not in self.membership.members}
        if not ids <= set(rnd.checksums) | rnd.abandoned | gone:
            return
        if rnd.checksums:
            self._finish(key, round_index, rnd)
        else:
            self._abort(key, round_index, rnd, f"no member completed attempt {rnd.attempt} "
                                               f"(gave up: {sorted(rnd.abandoned)}, left: {sorted(gone)})")

    async def _settled(self, key: Key, round_index: int, rnd: _Round) -> None:
        """Wait until the formation is done, re-checking leases; abort after commit_timeout_s."""
        deadline = time.monotonic() + self.config.commit_timeout_s
        while not rnd.done.is_set():
            self._settle(key, round_index, rnd)
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted({m for m, _ in rnd.group.members} - set(rnd.checksums) - rnd.abandoned)
                self._abort(key, round_index, rnd, f"no checksum from {', '.join(missing)} "
                                                   f"within {self.config.commit_timeout_s:.0f} s")
                break
            try:
                await asyncio.wait_for(rnd.done.wait(), min(left, POLL_S))
            except asyncio.TimeoutError:
                pass

    # ---- CommitRound ----------------------------------------------------------------

    async def commit(self, job: str, span: Span, round_index: int, member_id: str,
                     checksum: str, state: bytes, attempt: int = 0, *, bytes_sent: int = 0,
                     bytes_received: int = 0) -> tuple[bool, str, int]:
        key = (job, span.start, span.end)
        rnd = self._open.get((key, round_index))
        if rnd is None or rnd.group is None:
            raise FailedPrecondition(f"CommitRound: round {round_index} of job {job!r} span {span} "
                                     f"is not in progress")
        if attempt and attempt != rnd.attempt:
            raise FailedPrecondition(f"CommitRound: attempt {attempt} of round {round_index} is over "
                                     f"(attempt {rnd.attempt} is current)")
        ids = [m for m, _ in rnd.group.members]
        if member_id not in ids or member_id in rnd.abandoned:
            raise FailedPrecondition(f"CommitRound: {member_id} is not in round {round_index}'s group")
        if not rnd.done.is_set():
            rnd.checksums[member_id] = checksum
            if state and not rnd.state:
                rnd.state = state
            db = self.store.db
            with _transaction(db):
                db.execute(
                    "UPDATE round_members SET checksum=? WHERE job_name=? AND span_start=? AND span_end=? "
                    "AND round=? AND member_id=?", (checksum, *key, round_index, member_id))
                db.execute(  # bytes the member moved in this attempt (ExchangeShard, node-counted)
                    "INSERT INTO round_traffic VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                    "attempt=excluded.attempt, bytes_sent=excluded.bytes_sent, "
                    "bytes_received=excluded.bytes_received",
                    (*key, round_index, member_id, rnd.attempt, bytes_sent, bytes_received))
        await self._settled(key, round_index, rnd)
        committed, reason = rnd.outcome
        return committed, reason, self.committed_round(key)

    def _finish(self, key: Key, round_index: int, rnd: _Round) -> None:
        values = set(rnd.checksums.values())
        if len(values) != 1:
            self._abort(key, round_index, rnd, f"checksums disagree: {dict(sorted(rnd.checksums.items()))}")
            return
        if not rnd.state:
            self._abort(key, round_index, rnd, "no member sent the state")
            return
        checksum = values.pop()
        rel = Path(STATES_DIR) / f"{hashlib.sha256(key[0].encode()).hexdigest()[:16]}-{key[1]}-{key[2]}-r{round_index}.safetensors"
        path = Path(self.store.config.data_dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(rnd.state)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        now = time.time()
        db = self.store.db
        with _transaction(db):
            db.execute("INSERT INTO committed_states VALUES (?,?,?,?,?,?,?,?)",
                       (*key, round_index, str(rel), checksum, len(rnd.state), now))
            db.execute("UPDATE rounds SET state='committed', finished_at=? WHERE job_name=? AND "
                       "span_start=? AND span_end=? AND round=?", (now, *key, round_index))
        rnd.outcome = (True, "")
        rnd.done.set()
        self._open.pop((key, round_index), None)
        self._attempts.pop((key, round_index), None)
        logger.info("round %d of job %s span %d:%d committed by %d/%d members, state %.1f kB",
                    round_index, key[0], key[1], key[2], len(rnd.checksums), len(rnd.group.members),
                    len(rnd.state) / 1000)

    def _abort(self, key: Key, round_index: int, rnd: _Round, reason: str) -> None:
        self.store.db.execute(
            "UPDATE rounds SET state='aborted', finished_at=? WHERE job_name=? AND span_start=? "
            "AND span_end=? AND round=?", (time.time(), *key, round_index))
        rnd.outcome = (False, reason)
        rnd.done.set()
        logger.warning("round %d of job %s span %d:%d aborted: %s", round_index, *key, reason)


__all__ = ["Group", "Rounds", "RoundsConfig"]
