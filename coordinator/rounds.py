"""DiLoCo rounds at the coordinator: quorum, shard assignment and commit per (job, span).

BeginRound(job, span, r): the first member to ask opens round r; the round closes when every
live replica of the span has asked, or when ``window_s`` has passed since it opened (a
replica that does not show is left out). The group is the members that asked, sorted by
member id; member j owns shard j. CommitRound: each member reports the checksum of its new
global state; once all have reported, the round commits if the checksums agree (the state
bytes are written to a file in the data directory and the row to ``committed_states``, both
before any reply) and aborts otherwise. A committed round is never deleted.

Round numbers: r must be the last committed round of (job, span) + 1. After an abort the
same number is formed again.
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


@dataclass(frozen=True, kw_only=True)
class Group:
    round: int
    members: tuple[tuple[str, str], ...]  # (member_id, address), in shard order


@dataclass(kw_only=True)
class _Round:
    opened_at: float
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
        if rnd is not None and rnd.group is not None and (
                member_id not in dict(rnd.group.members) or rnd.done.is_set()):
            if rnd.done.is_set():  # an aborted round: form it again
                rnd = None
            else:
                raise FailedPrecondition(f"BeginRound: round {round_index} of job {job!r} span "
                                         f"{span} already formed without {member_id}")
        if rnd is None:
            rnd = self._open[(key, round_index)] = _Round(opened_at=time.monotonic())
        rnd.asked[member_id] = tokens
        replicas = {m.member_id for m in self.membership.members.values() if m.span == span}
        if replicas <= set(rnd.asked):
            self._close(key, round_index, rnd)
        else:
            left = self.config.window_s - (time.monotonic() - rnd.opened_at)
            try:
                await asyncio.wait_for(rnd.closed.wait(), max(left, 0.0))
            except asyncio.TimeoutError:
                if rnd.group is None:
                    self._close(key, round_index, rnd)
        group = rnd.group
        ids = [m for m, _ in group.members]
        if member_id not in ids:
            raise FailedPrecondition(f"BeginRound: round {round_index} formed without {member_id}")
        return group, ids.index(member_id)

    def _close(self, key: Key, round_index: int, rnd: _Round) -> None:
        ids = sorted(rnd.asked)
        members = tuple((m, self.membership.members[m].record.address)
                        for m in ids if m in self.membership.members)
        rnd.group = Group(round=round_index, members=members)
        now = time.time()
        db = self.store.db
        with _transaction(db):
            db.execute("INSERT OR IGNORE INTO jobs VALUES (?,?,?,?,?,?,?,?)",
                       (key[0], "", "", "{}", "{}", "training", now, now))
            db.execute("INSERT INTO rounds VALUES (?,?,?,?,?,?,NULL) ON CONFLICT DO UPDATE SET "
                       "state=excluded.state, created_at=excluded.created_at",
                       (*key, round_index, "exchanging", now))
            db.execute("DELETE FROM round_members WHERE job_name=? AND span_start=? AND span_end=? "
                       "AND round=?", (*key, round_index))
            db.executemany("INSERT INTO round_members VALUES (?,?,?,?,?,?,?,NULL)",
                           [(*key, round_index, m, j, rnd.asked[m]) for j, (m, _) in enumerate(members)])
        rnd.closed.set()
        logger.info("round %d of job %s span %d:%d formed with %d member(s): %s",
                    round_index, key[0], key[1], key[2], len(members), ", ".join(ids))

    # ---- CommitRound ----------------------------------------------------------------

    async def commit(self, job: str, span: Span, round_index: int, member_id: str,
                     checksum: str, state: bytes) -> tuple[bool, str, int]:
        key = (job, span.start, span.end)
        rnd = self._open.get((key, round_index))
        if rnd is None or rnd.group is None:
            raise FailedPrecondition(f"CommitRound: round {round_index} of job {job!r} span {span} "
                                     f"is not in progress")
        ids = [m for m, _ in rnd.group.members]
        if member_id not in ids:
            raise FailedPrecondition(f"CommitRound: {member_id} is not in round {round_index}'s group")
        if not rnd.done.is_set():
            rnd.checksums[member_id] = checksum
            if state and not rnd.state:
                rnd.state = state
            self.store.db.execute(
                "UPDATE round_members SET checksum=? WHERE job_name=? AND span_start=? AND span_end=? "
                "AND round=? AND member_id=?", (checksum, *key, round_index, member_id))
            if set(rnd.checksums) == set(ids):
                self._finish(key, round_index, rnd)
        try:
            await asyncio.wait_for(rnd.done.wait(), self.config.commit_timeout_s)
        except asyncio.TimeoutError:
            if not rnd.done.is_set():
                missing = sorted(set(ids) - set(rnd.checksums))
                self._abort(key, round_index, rnd, f"no checksum from {', '.join(missing)} "
                                                   f"within {self.config.commit_timeout_s:.0f} s")
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
