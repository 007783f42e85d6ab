"""DiLoCo rounds at the coordinator: quorum, shard assignment and commit per (job, span).

BeginRound(job, span, r): the first member to ask opens round r; the round closes when every
live replica of the span has asked, or when ``window_s`` has passed since it opened (a
replica that does not show is left out). The group is the members that asked, sorted by
member id; member j owns shard j. CommitRound: each member reports the checksum of its new
global state and the result frames of the shards it owns; once all have reported, the round
commits if the checksums agree, or if more than half of the group agree (the others are
outvoted: told to fetch the committed state, no standing from it; ``majority_checksum``), and
the coordinator holds the new state (written to a file in the data directory and the row to
``committed_states``, both before any reply), and aborts otherwise. A committed round's row
is never deleted; its state's file may be pruned by the job's retention
(coordinator/checkpoints.py, applied after each commit), never the last one.

The state (issue 12). Members do not send the new state whole: every member applied the same
result frames to the same θ_global, so the coordinator applies them too, with the same code
(compression/outer.py), to its copy of the previous committed state, and commits what it
gets only if its checksum is the one the members agreed on. Where it holds no previous state
(round 1, or its file is unreadable) BeginRound tells shard 0's member to send the state the
round *started* from (``base_state``: zstd, so round 1's initialisation, half zeros, costs a
fraction of the new state's fp32) and the rebuild starts there. Where it still cannot rebuild
(a result frame missing because its owner gave the attempt up; a rebuild that disagrees) it
asks one member that reported for the whole state (CommitRoundReply.send_state) and checks
that state against the checksum instead. Either way a round's traffic is the exchange plus
one copy of the result frames, not N copies of the fp32 state.

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

The majority (issue 18, item 4). A member has *standing* for (job, span) once its checksum is
in a committed round of it (the store's round_members). The *voters* of a round are the live
members serving the span with standing that asked for a round of (job, span) in the last
``standing_s`` (members with standing count as having asked when the coordinator started).
A round commits only if its agreeing members include more than half of the voters. Where
no member is a voter that way (round 1, or every replica with standing gone or idle), the
voters are the live members serving the span whose heartbeats reported a new optimizer step
of the job in the last ``trained_s`` (HeartbeatRequest.trained_steps, ``note_trained``): the
replicas that are training it. Only with neither does the group decide alone. So a newcomer
that is the whole group after the window cannot commit over a replica that trains the job,
round 1 included; it gains standing by committing a round together with the others. A voter
that asks after the group formed without it waits for that formation to settle (it cannot
commit without the voter's majority) and joins the next attempt, instead of being refused.
Votes are per source host (the IP a member's Join came from), each host's one vote shared by
its voters (``majority_lacking``): on one machine this is the per-member majority, across
machines Sybils on one address count as one. Limits (docs/security.md): Sybils with standing
on as many addresses as the honest replicas can outvote them; a newcomer that asks before any
replica took a step of the job decides round 1 alone (a node reports its first step of a job
at once: node/training.py on_first_step, CoordinatorClient.beat_soon), and step reports are
the nodes' own word.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from pollinate.coordinator.config import RoundsConfig
from pollinate.coordinator.store import RoundKey, Store
from pollinate.protocol.channels import COORDINATOR_STATE_BYTES
from pollinate.protocol.errors import FailedPrecondition, InvalidRequest, NotFound
from pollinate.protocol.shared import Span

if TYPE_CHECKING:  # compression/outer.py imports torch: loaded on the first round's commit only
    from pollinate.compression.outer import OuterStep
    from pollinate.coordinator.checkpoints import Checkpoints

logger = logging.getLogger(__name__)

STATES_DIR = "states"
BASE_HEADER_BYTES = 4096  # a base state's safetensors header (two tensors) beyond their fp32 bytes
POLL_S = 0.5  # how often a waiting round re-checks leases (a dead member stops being waited for)
MAX_TRAINED_JOBS = 64  # jobs one heartbeat may report steps of (HeartbeatRequest.trained_steps)
MAX_JOB_NAME = 256  # characters of a job name there


@dataclass(frozen=True, kw_only=True)
class Group:
    round: int
    members: tuple[tuple[str, str], ...]  # (member_id, address), in shard order
    attempt: int = 1
    # the member that sends the round's base state with its CommitRound ("": the coordinator
    # rebuilds from its own copy of the previous state)
    state_member: str = ""


@dataclass(kw_only=True)
class _Round:
    opened_at: float
    attempt: int = 1
    abandoned: set[str] = field(default_factory=set)  # members that asked for the round again
    asked: dict[str, int] = field(default_factory=dict)  # member_id -> tokens
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    group: Group | None = None
    checksums: dict[str, str] = field(default_factory=dict)
    agreed: str = ""  # the checksum the round commits (majority_checksum), once all reported
    state: bytes = b""
    state_sender: str = ""  # who sent ``state``: used only if it holds the agreed checksum
    base: bytes = b""  # the state the round started from (CommitRoundRequest.base_state), zstd
    results: dict[int, bytes] = field(default_factory=dict)  # shard -> its owner's result frame
    outer: OuterStep | None = None  # the outer step the results make, as the members sent it
    state_from: str = ""  # the member asked for the whole state (CommitRoundReply.send_state)
    state_asked: asyncio.Event = field(default_factory=asyncio.Event)
    finishing: asyncio.Task | None = None  # rebuilding/checking and writing the new state
    done: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: tuple[bool, str] = (False, "")

    @property
    def agreeing(self) -> set[str]:
        """The members that reported the agreed checksum (the others are outvoted)."""
        return {m for m, c in self.checksums.items() if c == self.agreed}


@dataclass(frozen=True, kw_only=True)
class CommitOutcome:
    committed: bool
    reason: str  # why not, when not committed
    committed_round: int  # the last committed round of (job, span) after the call
    send_state: bool = False  # this member is to call again with the whole state


Key = RoundKey  # job, span start, span end


class Rounds:
    """Round bookkeeping on the coordinator's event loop; durable parts in the Store."""

    def __init__(self, config: RoundsConfig, store: Store, membership, checkpoints: Checkpoints | None = None) -> None:
        self.config = config
        self.store = store
        self.membership = membership
        # retention applied after each commit (issue 15); None: every state is kept
        self.checkpoints = checkpoints
        self._open: dict[tuple[Key, int], _Round] = {}
        self._attempts: dict[tuple[Key, int], int] = {}  # the last attempt formed per round
        # the last committed state per (job, span), decoded: (round, θ_global, momentum); the
        # next round is rebuilt from it (read back from its file after a restart)
        self._last: dict[Key, tuple] = {}
        self._last_outer: dict[Key, OuterStep] = {}  # the outer step of the last committed round
        self._tasks: set[asyncio.Task] = set()  # running _finish and mask-drawing tasks (a reference each)
        self._standing: dict[Key, set[str]] = {}  # members with standing, loaded from the store
        self._asked_at: dict[tuple[Key, str], float] = {}  # (key, member) -> its last BeginRound
        self._started = time.monotonic()  # a member with standing has "asked" at start (restart)
        # member -> {job: (optimizer steps it last reported, when that count last rose)}
        self._trained: dict[str, dict[str, tuple[int, float]]] = {}

    # ---- queries --------------------------------------------------------------------

    def committed_round(self, key: Key) -> int:
        return self.store.committed_round(key)

    def committed_state(self, job: str, span: Span, round_index: int = 0) -> tuple[int, str, bytes]:
        """(round, checksum, state bytes): the last committed state, or with round_index the
        latest kept one at or before it (an intermediate checkpoint)."""
        round_index, checksum, path = self.committed_state_file(job, span, round_index)
        return round_index, checksum, path.read_bytes()

    def committed_state_file(self, job: str, span: Span, round_index: int = 0) -> tuple[int, str, Path]:
        """committed_state's (round, checksum, the file that holds the state)."""
        key = (job, span.start, span.end)
        stored = (self.store.committed_state_file(key) if not round_index
                  else self.store.kept_state_at_or_before(key, round_index))
        if stored is None:
            raise NotFound(f"job {job!r} span {span}: no committed round yet" if not round_index else
                           f"job {job!r} span {span}: no kept checkpoint at or before round {round_index}")
        round_index, path, checksum = stored
        return round_index, checksum, path

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
        self._asked_at[(key, member_id)] = time.monotonic()
        rnd = self._open.get((key, round_index))
        if (rnd is not None and rnd.group is not None and not rnd.done.is_set()
                and member_id not in dict(rnd.group.members) and member_id in self.voters(key)):
            rnd = await self._wait_out(key, round_index, rnd, member_id)
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
        # nothing to rebuild from: shard 0's member sends the round's base state with its commit
        state_member = members[0][0] if members and not self._has_state(key, round_index - 1) else ""
        rnd.group = Group(round=round_index, members=members, attempt=rnd.attempt,
                          state_member=state_member)
        self.store.form_round(key, round_index, [(m, rnd.asked[m]) for m, _ in members], time.time())
        rnd.closed.set()
        self._prefetch_masks(key, round_index, len(members))
        logger.info("round %d of job %s span %d:%d formed (attempt %d) with %d member(s): %s",
                    round_index, key[0], key[1], key[2], rnd.attempt, len(members), ", ".join(ids))

    def _prefetch_masks(self, key: Key, round_index: int, group_size: int) -> None:
        """Draw the round's cocktail masks in a worker thread while the members exchange, as
        the last committed round's codec would (the rebuild after the last commit then finds
        them cached: drawing them was ~0.13 s of it at 8M elements). Only a guess: a round whose
        codec differs draws its own masks at the rebuild, as before."""
        from pollinate.compression.cocktail import CocktailCodec
        from pollinate.compression.outer import mask_seed, shard_bounds

        last, outer = self._last.get(key), self._last_outer.get(key)
        if last is None or outer is None or last[0] != round_index - 1 or group_size < 2:
            return
        try:
            codec = outer.make_codec()
        except Exception:  # a setting the members sent that does not make a codec: no guess
            return
        if not isinstance(codec, CocktailCodec):
            return
        numel = last[1].numel()

        def draw() -> None:
            try:
                for start, stop in shard_bounds(numel, group_size):
                    codec.mask(stop - start, mask_seed(round_index, start))
            except Exception as exc:  # housekeeping: the rebuild draws what is missing
                logger.debug("round %d masks not drawn ahead: %s", round_index, exc)

        task = asyncio.ensure_future(asyncio.to_thread(draw))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _abandon(self, key: Key, round_index: int, rnd: _Round, member_id: str) -> _Round | None:
        """A member of a formation in progress asked again: it gave this attempt up. Wait for
        the formation to settle (_after_settled)."""
        rnd.abandoned.add(member_id)
        logger.info("round %d of job %s span %d:%d attempt %d: %s gave up on it", round_index,
                    *key, rnd.attempt, member_id)
        return await self._after_settled(key, round_index, rnd, member_id)

    async def _wait_out(self, key: Key, round_index: int, rnd: _Round, member_id: str) -> _Round | None:
        """A voter asked after the group formed without it: that formation cannot commit
        without its majority unless the others are one, so wait for it to settle (_after_settled)."""
        logger.info("round %d of job %s span %d:%d attempt %d formed without %s, a voter; it waits "
                    "for the attempt to settle", round_index, *key, rnd.attempt, member_id)
        return await self._after_settled(key, round_index, rnd, member_id)

    async def _after_settled(self, key: Key, round_index: int, rnd: _Round, member_id: str) -> _Round | None:
        """Once `rnd` settles: committed without `member_id` -> FailedPrecondition (it fetches
        the committed state); aborted -> the formation open now, None when there is none (the
        caller forms the next attempt)."""
        await self._settled(key, round_index, rnd)
        if rnd.outcome[0]:
            raise FailedPrecondition(f"BeginRound: round {round_index} of job {key[0]!r} was committed "
                                     f"without {member_id}; fetch it with GetCommittedState")
        current = self._open.get((key, round_index))
        return None if current is rnd else current

    def standing(self, key: Key) -> set[str]:
        """Members whose checksum is in a committed round of (job, span) (kept up to date)."""
        held = self._standing.get(key)
        if held is None:
            held = self._standing[key] = self.store.members_with_standing(key)
        return held

    def voters(self, key: Key) -> set[str]:
        """Live members serving the span, with standing, that asked for a round of it in the
        last standing_s; without any, those that reported a new step of the job in the last
        trained_s: a commit needs more than half of them (module docstring)."""
        span, standing, now = Span(key[1], key[2]), self.standing(key), time.monotonic()
        replicas = [m.member_id for m in self.membership.members.values() if m.span == span]
        voters = {m for m in replicas if m in standing
                  and now - self._asked_at.get((key, m), self._started) <= self.config.standing_s}
        return voters or {m for m in replicas
                          if now - self._trained.get(m, {}).get(key[0], (0, -math.inf))[1] <= self.config.trained_s}

    def _host(self, member_id: str) -> str:
        """Where a live member's Join came from (its vote's host), else its own id."""
        member = self.membership.members.get(member_id)
        return (member.record.source_host if member is not None else "") or f"member {member_id}"

    def note_trained(self, member_id: str, steps: Mapping[str, int]) -> None:
        """A member's heartbeat: its optimizer steps so far per job (HeartbeatRequest.trained_steps,
        at most MAX_TRAINED_JOBS; the service checked them). Soft state, replaced every beat."""
        now, before, latest = time.monotonic(), self._trained.get(member_id, {}), {}
        for job, n in steps.items():
            count, rose_at = before.get(job, (0, -math.inf))
            latest[job] = (n, now if n > count else rose_at)
        self._trained[member_id] = latest
        if len(self._trained) > 2 * len(self.membership.members) + 16:  # members gone: forget them
            for gone in set(self._trained) - set(self.membership.members):
                del self._trained[gone]

    def _settle(self, key: Key, round_index: int, rnd: _Round) -> None:
        """Finish the formation once every member reported, gave up, or left the swarm."""
        if rnd.done.is_set() or rnd.finishing is not None:
            return
        ids = {m for m, _ in rnd.group.members}
        gone = {m for m in ids if m not in self.membership.members}
        if not ids <= set(rnd.checksums) | rnd.abandoned | gone:
            return
        rnd.agreed = majority_checksum(rnd.checksums, len(ids)) if rnd.checksums else ""
        if not rnd.checksums:
            self._abort(key, round_index, rnd, f"no member completed attempt {rnd.attempt} "
                                               f"(gave up: {sorted(rnd.abandoned)}, left: {sorted(gone)})")
        elif not rnd.agreed:
            self._abort(key, round_index, rnd, f"checksums disagree, none held by more than half of the "
                                               f"group of {len(ids)}: {dict(sorted(rnd.checksums.items()))}")
        elif why := majority_lacking(rnd.agreeing, self.voters(key), self._host):
            self._abort(key, round_index, rnd, why)
        elif rnd.state_from and not rnd.state:
            if rnd.state_from in gone or rnd.state_from in rnd.abandoned:
                self._abort(key, round_index, rnd, f"{rnd.state_from}, asked for the state, left")
        else:  # the state's bytes are checked or rebuilt off the event loop
            rnd.finishing = asyncio.create_task(self._finish(key, round_index, rnd))
            self._tasks.add(rnd.finishing)
            rnd.finishing.add_done_callback(self._tasks.discard)

    async def _settled(self, key: Key, round_index: int, rnd: _Round, member_id: str = "") -> bool:
        """Wait until the formation is done, re-checking leases; abort after commit_timeout_s.
        True if instead ``member_id`` was asked for the whole state (the round waits for it)."""
        deadline = time.monotonic() + self.config.commit_timeout_s
        while not rnd.done.is_set():
            if member_id and rnd.state_from == member_id and not rnd.state:
                return True
            self._settle(key, round_index, rnd)
            left = deadline - time.monotonic()
            if left <= 0 and rnd.finishing is None:
                missing = sorted({m for m, _ in rnd.group.members} - set(rnd.checksums) - rnd.abandoned)
                why = (f"no checksum from {', '.join(missing)}" if missing
                       else f"no state from {rnd.state_from}")
                self._abort(key, round_index, rnd, f"{why} within {self.config.commit_timeout_s:.0f} s")
                break
            waits = [asyncio.ensure_future(rnd.done.wait())]
            if not rnd.state_asked.is_set():  # once asked, only the asked member stops waiting
                waits.append(asyncio.ensure_future(rnd.state_asked.wait()))
            try:
                await asyncio.wait(waits, timeout=min(left, POLL_S) if left > 0 else POLL_S,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        return False

    # ---- CommitRound ----------------------------------------------------------------

    async def commit(self, job: str, span: Span, round_index: int, member_id: str,
                     checksum: str, state: bytes = b"", attempt: int = 0, *, bytes_sent: int = 0,
                     bytes_received: int = 0, coordinator_bytes_sent: int = 0,
                     coordinator_bytes_received: int = 0, results: Sequence[tuple[int, bytes]] = (),
                     outer: OuterStep | None = None, base_state: bytes = b"",
                     request_bytes: int = 0) -> CommitOutcome:
        """A member's report: its checksum, the result frames of the shards it owns and the
        outer step they make, the round's base state if it is the group's state member (or,
        where asked, the whole state). ``bytes_*`` are its
        ExchangeShard bytes, ``coordinator_bytes_*`` its BeginRound's, as it counted them;
        ``request_bytes`` is this request's serialized size."""
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
        if member_id in rnd.checksums:  # called again: with the state it was asked for
            if rnd.checksums[member_id] != checksum or (state and rnd.state_from != member_id):
                raise FailedPrecondition(f"CommitRound: {member_id} already reported round {round_index}")
            if state and not rnd.done.is_set() and not rnd.state:
                rnd.state, rnd.state_sender = state, member_id
            self.count_traffic(job, span, round_index, member_id, sent=request_bytes)
        elif not rnd.done.is_set():
            rnd.checksums[member_id] = checksum
            if state and not rnd.state:
                rnd.state, rnd.state_sender = state, member_id
            for shard, payload in results:
                if 0 <= shard < len(ids):
                    rnd.results.setdefault(shard, payload)
            if outer is not None and rnd.outer is None:
                rnd.outer = outer
            if base_state and member_id == rnd.group.state_member:
                rnd.base = base_state
            self.store.report_checksum(key, round_index, member_id, attempt=rnd.attempt, checksum=checksum,
                                       traffic=(bytes_sent, bytes_received,
                                                coordinator_bytes_sent + request_bytes, coordinator_bytes_received))
        if await self._settled(key, round_index, rnd, member_id):
            return CommitOutcome(committed=False, reason="send the whole state",
                                 committed_round=self.committed_round(key), send_state=True)
        committed, reason = rnd.outcome
        mine = rnd.checksums.get(member_id)
        if committed and mine != rnd.agreed:  # outvoted, or reported too late: its state is not the one kept
            committed, reason = False, (
                (f"checksum {mine[:16]} is not the committed state's {rnd.agreed[:16]}, which a majority of the "
                 "group reported" if mine else "the round committed without this member's checksum")
                + ": fetch the committed state")
        return CommitOutcome(committed=committed, reason=reason, committed_round=self.committed_round(key))

    def count_traffic(self, job: str, span: Span, round_index: int, member_id: str, *,
                      sent: int = 0, received: int = 0) -> None:
        """Add bytes measured here (CommitRound requests and replies) to a member's round."""
        self.store.add_coordinator_traffic((job, span.start, span.end), round_index, member_id,
                                           sent=sent, received=received)

    # ---- the committed state ---------------------------------------------------------

    def _has_state(self, key: Key, round_index: int) -> bool:
        """Whether round ``round_index``'s committed state is here to rebuild the next from."""
        stored = self._stored(key, round_index) if round_index >= 1 else None
        return stored is not None and (len(stored) == 3 or stored[0].is_file())

    def _stored(self, key: Key, round_index: int):
        """Where round ``round_index``'s committed state is: the decoded copy kept in memory,
        or (path, checksum) of its file; None if not committed. Event loop (reads the store)."""
        last = self._last.get(key)
        if last is not None and last[0] == round_index:
            return last
        stored = self.store.committed_state_file(key, round_index)
        return None if stored is None else stored[1:]

    @staticmethod
    def _previous(stored) -> tuple:
        """(θ_global, momentum, why): the state ``_stored`` points at, read and checked against
        its checksum if it is a file (after a restart); (None, None, why) if unusable."""
        from pollinate.compression.outer import state_checksum, state_from_bytes

        if stored is None:
            return None, None, "not committed"
        if len(stored) == 3:
            return stored[1], stored[2], ""
        path, checksum = stored
        try:
            state = state_from_bytes(path.read_bytes())
        except (OSError, ValueError) as exc:
            return None, None, f"stored state unreadable: {exc}"
        if state_checksum(state["global"], state["momentum"]) != checksum:
            return None, None, "stored state does not match its checksum"
        return state["global"], state["momentum"], ""

    @classmethod
    def _rebuild(cls, round_index: int, group_size: int, results: dict, outer: OuterStep | None, stored,
                 base: bytes = b""):
        """The new (θ_global, momentum, checksum) from the previous state (``base``, the one the
        state member sent, else ``stored``) and the results, or (None, why) where that is not
        possible. Worker thread: touches no shared state."""
        from pollinate.compression.outer import OuterStepError, apply_results, state_from_zstd

        missing = [j for j in range(group_size) if j not in results]
        if missing or outer is None:
            return None, f"result frames of shards {missing} missing" if missing else "no outer step settings"
        if base:  # decoded here: ours to step in place
            try:
                sent = state_from_zstd(base, max_bytes=COORDINATOR_STATE_BYTES + BASE_HEADER_BYTES)
            except OuterStepError as exc:
                return None, f"base state sent: {exc}"
            theta, momentum = sent["global"], sent["momentum"]
        else:
            theta, momentum, why = cls._previous(stored)
            if theta is None:
                return None, f"previous state (round {round_index - 1}): {why}"
            if len(stored) == 3:  # the copy kept in memory stays round r-1's
                theta, momentum = theta.clone(), momentum.clone()
        try:
            checksum = apply_results(theta, momentum, [results[j] for j in range(group_size)], outer,
                                     round_index=round_index)
        except ValueError as exc:  # OuterStepError, CompressionError, a bad codec setting
            return None, f"results do not apply: {exc}"
        return (theta, momentum, checksum), ""

    @staticmethod
    def _check_state(data: bytes, checksum: str):
        """(θ_global, momentum) of a state a member sent, if it matches the checksum."""
        from pollinate.compression.outer import state_checksum, state_from_bytes

        state = state_from_bytes(data)
        if state_checksum(state["global"], state["momentum"]) != checksum:
            raise ValueError("the state sent does not match the agreed checksum")
        return state["global"], state["momentum"]

    async def _finish(self, key: Key, round_index: int, rnd: _Round) -> None:
        """Every member reported and the checksums agree: hold the new state (rebuilt, or
        taken from the member that sent it and checked), write it, commit."""
        from pollinate.compression.outer import state_to_bytes

        checksum = rnd.agreed
        if rnd.state and rnd.checksums.get(rnd.state_sender) != checksum:
            rnd.state = b""  # an outvoted member's state: rebuild, or ask an agreeing member
        try:
            if rnd.state:
                theta, momentum = await asyncio.to_thread(self._check_state, rnd.state, checksum)
                data, how = rnd.state, f"taken whole from {rnd.state_from or rnd.group.state_member or 'a member'}"
            else:
                rebuilt, why = await asyncio.to_thread(
                    self._rebuild, round_index, len(rnd.group.members), dict(rnd.results), rnd.outer,
                    self._stored(key, round_index - 1), rnd.base)
                if rebuilt is not None and rebuilt[2] != checksum:
                    why, rebuilt = f"rebuilt checksum {rebuilt[2][:16]} != the group's {checksum[:16]}", None
                if rebuilt is None:
                    self._ask_state(key, round_index, rnd, why)
                    return
                theta, momentum, _ = rebuilt
                data = await asyncio.to_thread(state_to_bytes, theta, momentum)
                how = (f"rebuilt from {len(rnd.results)} result frame(s), {sum(map(len, rnd.results.values()))} B"
                       + (f", on the base state {rnd.group.state_member} sent ({len(rnd.base)} B)" if rnd.base else ""))
            rel = Path(STATES_DIR) / f"{hashlib.sha256(key[0].encode()).hexdigest()[:16]}-{key[1]}-{key[2]}-r{round_index}.safetensors"
            await asyncio.to_thread(_write_durably, Path(self.store.config.data_dir) / rel, data)
        except Exception as exc:  # a bad state sent, a disk error: the round does not commit
            self._abort(key, round_index, rnd, f"the new state could not be stored: {exc}")
            return
        if rnd.done.is_set():  # aborted meanwhile (a member's commit timed out)
            return
        self.store.commit_round(key, round_index, path=rel, checksum=checksum, nbytes=len(data), now=time.time())
        self._last[key] = (round_index, theta, momentum)
        if rnd.outer is not None:
            self._last_outer[key] = rnd.outer
        self.standing(key).update(rnd.agreeing)
        if self.checkpoints is not None:
            try:
                self.checkpoints.apply()
            except Exception:  # retention is housekeeping: the commit stands, the next one retries
                logger.exception("retention after round %d of job %s failed", round_index, key[0])
        rnd.outcome = (True, "")
        rnd.done.set()
        self._open.pop((key, round_index), None)
        self._attempts.pop((key, round_index), None)
        outvoted = sorted(set(rnd.checksums) - rnd.agreeing)
        logger.info("round %d of job %s span %d:%d committed by %d/%d members, state %.1f kB %s%s",
                    round_index, key[0], key[1], key[2], len(rnd.agreeing), len(rnd.group.members),
                    len(data) / 1000, how, f"; outvoted: {', '.join(outvoted)}" if outvoted else "")

    def _ask_state(self, key: Key, round_index: int, rnd: _Round, why: str) -> None:
        """The state cannot be rebuilt: ask the first member that reported (shard order) for it."""
        agreeing = rnd.agreeing
        alive = [m for m, _ in rnd.group.members if m in agreeing and m in self.membership.members]
        if not alive:
            self._abort(key, round_index, rnd, f"cannot rebuild the state ({why}) and no member is left to send it")
            return
        rnd.state_from = alive[0]
        rnd.finishing = None
        rnd.state_asked.set()
        logger.info("round %d of job %s span %d:%d: cannot rebuild the state (%s); asking %s for it",
                    round_index, *key, why, rnd.state_from)

    def _abort(self, key: Key, round_index: int, rnd: _Round, reason: str) -> None:
        self.store.abort_round(key, round_index, time.time())
        rnd.outcome = (False, reason)
        rnd.done.set()
        logger.warning("round %d of job %s span %d:%d aborted: %s", round_index, *key, reason)


def majority_checksum(checksums: dict[str, str], group_size: int) -> str:
    """The checksum a round commits ("": none) of the reported ones (at least one): the one
    every reporter holds (members that gave the attempt up or left do not count against it),
    else the one more than half of the whole group holds. A member that reports another is
    outvoted and fetches the committed state, so one liar in a group of three cannot stop the
    round (issue 18); in a group of two any disagreement still aborts."""
    held = collections.Counter(checksums.values())
    if len(held) == 1:
        return next(iter(held))
    best, count = held.most_common(1)[0]
    return best if 2 * count > group_size else ""


def majority_lacking(agreeing: set[str], voters: set[str], host: Callable[[str], str] = str) -> str:
    """Why members that reported agreeing checksums may not commit ("": they may): they must
    hold more than half of the voters' votes; with no voter the group decides (issue 18, item 4).
    Each source host (``host(member)``, the IP its Join came from) has one vote, shared equally
    by its voters: members on one machine vote as before, one by one, but Sybils on one address
    outweigh no more than one honest replica elsewhere."""
    if not voters:
        return ""
    per_host = collections.Counter(map(host, voters))
    held = sum(Fraction(1, per_host[host(m)]) for m in agreeing & voters)
    if 2 * held > len(per_host):
        return ""
    votes = f"{len(agreeing & voters)} of {len(voters)}" + (
        f" on {len(per_host)} hosts, {float(held):.2f} of {len(per_host)} votes" if len(per_host) < len(voters) else "")
    return (f"no majority of the span's voters (members with standing, else those training the job): "
            f"{votes} ({', '.join(sorted(voters))}) agree; a round needs more than half of them")


def outer_from_proto(codec: str, params_json: str, lr: float, momentum: float, nesterov: bool) -> OuterStep | None:
    """CommitRoundRequest.outer as an OuterStep; None if absent or malformed (the round then
    falls back to taking the state whole)."""
    if not codec:
        return None
    from pollinate.compression.outer import OuterStep

    try:
        params = json.loads(params_json or "{}")
        if not isinstance(params, dict):
            raise ValueError("codec_params_json is not an object")
        return OuterStep(codec=codec, codec_params=params, lr=lr, momentum=momentum, nesterov=nesterov)
    except ValueError as exc:
        logger.warning("CommitRound: outer step settings refused: %s", exc)
        return None


def _write_durably(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


__all__ = ["MAX_JOB_NAME", "MAX_TRAINED_JOBS", "CommitOutcome", "Group", "Rounds", "RoundsConfig",
           "majority_checksum", "majority_lacking", "outer_from_proto"]
