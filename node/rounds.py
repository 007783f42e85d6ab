"""The node's side of a DiLoCo round: when it runs, its attempts, commit or roll back.

The round's state machine, and only that: the coordinator calls are node/round_coordinator.py's
(``RoundCoordinator``), the exchange between members node/shard_exchange.py's
(``ShardExchange``: sender, owner inbox, traffic counts), the math node/diloco.py's and
compression/outer.py's (which also (de)serialises a committed state). Torch work runs on the
span's one torch thread (``SpanServer.run_torch``).

After every H inner steps of a job (``JobSpec.round_steps``, 0 = ``DiLoCoConfig``'s default)
round r = last committed + 1 runs. With blocking rounds (``DiLoCoConfig.overlap_rounds``
False) the Backward call that made the H-th step runs it before it replies, so the trainer
feeding this replica waits for the round. With overlapped rounds that Backward snapshots the
adapter and starts the round in the background on the snapshot (``_start_overlapped``); the
inner steps go on, and when the round lands the adapter takes the round's restart point plus
the steps made since the snapshot (``diloco.overlap_restart``). A Backward waits only for a
round still out after ``DiLoCoConfig.overlap_max_steps`` inner steps (bounded staleness: a
round landing a whole round late costs 13% on bench_diloco, one step late 0.1%). Either way
each round logs one line with ``backward_wait_s=<seconds>``: how long a Backward was held for
it. A round:

1. ``BeginRound`` at the coordinator: the group (shard order) and this member's shard.
2. ``DiLoCoMember.contribute``; each payload goes to its shard's owner by ``ExchangeShard``
   (one call per other owner: CONTRIBUTION in, that owner's RESULT back on the same call).
   As owner, this node collects the group's contributions for its shard (``ShardExchange.receive``,
   called by the servicer), ``aggregate``s once all are in and answers every call with the result.
3. ``apply`` → checksum; ``CommitRound`` with the checksum, the result frame of our own shard
   and the outer step's settings: the coordinator rebuilds the new global state from its
   previous one with the same code (compression/outer.py). Where it holds none (``send_state``
   from BeginRound: round 1) this member also sends the state the round started from, zstd
   (``base_state``); the new state itself travels only when the coordinator asks again (a
   result missing, a rebuild that disagreed).
4. Committed: the adapter restarts from ``local_start()``. Anything else (a timeout, a peer
   error, checksums that disagree): θ_global, momentum and both residuals are restored to
   their values before the round; nothing is half-applied.

Faults (issue 6). An owner waits ``contribution_wait_s`` for the group's contributions, then
averages those that arrived (weighted by tokens: a member that died or whose stream broke is
dropped and the average renormalises). A member whose exchange fails (an owner died, a
stream broke, a timeout) still serves its own shard's result to the others, then rolls back
and asks BeginRound for the same round again at once: the coordinator takes that as giving
up the attempt, commits it for the members that hold every result if they agree, else
aborts it and forms the next attempt with the live members (coordinator/rounds.py). Up to
``max_attempts`` attempts; a member told the round was committed without it adopts the
coordinator's committed state (``GetCommittedState``). Only after the last attempt fails
does the adapter restart from the committed θ_global (the H steps are then lost).

With one replica the group has one member and the exchange is local (no RPC); its commit
still carries its result frame (``DiLoCoConfig.solo_codec``: int8). Bytes: every message of the round (BeginRound,
ExchangeShard, CommitRound, requests and replies) is counted at its serialized size; the
commit log line and the coordinator's status report the same totals.
Math in node/diloco.py and compression/outer.py; nothing here changes it. An overlapped
round is the same round: it runs ``run_round`` on a copy of the adapter taken at the
snapshot, so everything above (checksums, commit, faults, catch-up, poison rejection) is
unchanged; only when its result reaches the live adapter differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pollinate.compression.outer import state_to_bytes, state_to_zstd
from pollinate.node.diloco import (
    Contribution,
    DiLoCoMember,
    RoundError,
    assign_flat,
    flatten_params,
    job_diloco_config,
    overlap_restart,
)
from pollinate.node.round_coordinator import RoundCoordinator
from pollinate.node.shard_exchange import ShardExchange
from pollinate.protocol.channels import COORDINATOR_STATE_BYTES
from pollinate.protocol.errors import FailedPrecondition, NotFound
from pollinate.protocol.identity import NodeIdentity
from pollinate.protocol.v1 import common_pb2

logger = logging.getLogger(__name__)

@dataclass(frozen=True, kw_only=True)
class RoundConfig:
    # BeginRound deadline, seconds: must exceed the coordinator's round window, and after a
    # failed attempt its commit timeout too (the retry waits until the attempt is settled).
    begin_timeout_s: float = 150.0
    # Longest wait for the group's contributions (owner) and for each owner's result, seconds.
    exchange_timeout_s: float = 60.0
    # CommitRound deadline, seconds (the coordinator waits for every member's checksum).
    commit_timeout_s: float = 90.0
    # How long an owner waits for the group's contributions before averaging the ones that
    # arrived, seconds: a sender that died or stalled is dropped after this (about one lease).
    contribution_wait_s: float = 10.0
    # Attempts at one round before the H steps are given up: a failed attempt (an owner died)
    # is retried at once with a new quorum of the live members.
    max_attempts: int = 3

    def __post_init__(self) -> None:
        for name in ("begin_timeout_s", "exchange_timeout_s", "commit_timeout_s", "contribution_wait_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.contribution_wait_s < self.exchange_timeout_s:
            raise ValueError(f"contribution_wait_s ({self.contribution_wait_s}) must be < "
                             f"exchange_timeout_s ({self.exchange_timeout_s})")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")


@dataclass(kw_only=True)
class JobRounds:
    """One job's rounds on this node: its DiLoCo member and where its last round ended."""

    member: DiLoCoMember
    committed_round: int = 0
    steps_at_round: int = 0  # job.inner_steps when the last round ended
    tokens_at_round: int = 0  # job.tokens when the last round ended
    restored: bool = False  # the coordinator's last committed state fetched (before the first step)
    # why this node cannot train the job (the committed state does not fit its adapter): every
    # later Forward and Backward of it is refused with this, instead of losing its H steps
    # at every round (docs/security.md: a forged round 1)
    broken: str = ""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(kw_only=True)
class _Overlapped:
    """A round running in the background on a snapshot of the adapter (overlap_rounds)."""

    round: int  # the round it runs (last committed + 1 at the snapshot)
    shadow: list  # copies of the adapter's tensors at the snapshot: the round restarts these
    snapshot: torch.Tensor  # flatten_params(shadow) at the snapshot
    steps: int  # job.inner_steps at the snapshot: the next boundary counts from here
    tokens: int  # job.tokens at the snapshot
    before: tuple[int, int]  # (steps_at_round, tokens_at_round) before it, restored if it crashes
    task: asyncio.Task | None = None
    landed: int = 0  # inner steps made between the snapshot and the landing
    waited: bool = False  # a Backward was held for it
    wait_s: float = 0.0  # how long the first held Backward waited (logged at the landing)
    land: Callable[[], int] | None = None  # the round done, its landing waits for a safe point


class RoundDriver:
    """Runs a job's rounds on one node: ``after_backward`` after every Backward of a job."""

    def __init__(self, config: RoundConfig, *, coordinator_address: str, token: str,
                 member_id, framing, identity: NodeIdentity, tls: bool = False,
                 tls_root_cert_file: Path | None = None) -> None:
        self.config = config
        self._member_id = member_id  # callable: the id changes when the node re-joins
        self.jobs: dict[str, JobRounds] = {}
        self.coordinator = RoundCoordinator(config, address=coordinator_address, token=token,
                                            member_id=member_id, identity=identity, tls=tls,
                                            tls_root_cert_file=tls_root_cert_file)
        self.exchange = ShardExchange(config, token=token, framing=framing, job_state=self._job_state)
        # job -> (round, attempt, owner task) of a failed attempt whose shard is still served
        self._serving: dict[str, tuple] = {}
        self._overlapped: dict[str, _Overlapped] = {}  # job -> its round running in the background

    def _job_state(self, job: str) -> tuple[int, int] | None:
        """(its last committed round, its adapter's values), None for a job unknown here."""
        state = self.jobs.get(job)
        return None if state is None else (state.committed_round, state.member.numel)

    # ---- tracking --------------------------------------------------------------------

    def track(self, job) -> None:
        """A new job: θ_global starts at the adapter's initial value (same seed everywhere)."""
        params = list(job.adapter.parameters())
        self.jobs[job.name] = JobRounds(member=DiLoCoMember(flatten_params(params), job_diloco_config(job.spec)))

    def committed(self, name: str) -> tuple[int, dict[str, torch.Tensor]]:
        """The last committed round of a job on this node and its shared state."""
        state = self.jobs.get(name)
        if state is None or state.committed_round == 0:
            raise NotFound(f"job {name!r}: no committed round on this node")
        return state.committed_round, state.member.shared_state()

    async def before_step(self, manager, job) -> None:
        """Before a job's first Forward/Backward here: a node that joins the span mid-job (or
        replaces a dead replica, or restarted) adopts the coordinator's last committed state
        and round number, so its first round is the group's next one. Nothing committed yet:
        it starts from the job's seed like everyone else. The coordinator unreachable: the
        call fails (clear error) and the next one tries again."""
        state = self.jobs.get(job.name)
        if state is not None and state.broken:
            raise FailedPrecondition(f"job {job.name!r} cannot train on this node: {state.broken}")
        if state is None or state.restored:
            return
        async with state.lock:
            if state.restored:
                return
            server = manager.server
            try:
                adopted = await self._catch_up(server, job, state, list(job.adapter.parameters()),
                                               state.committed_round + 1, why="restored at job start")
            except RoundError as exc:
                raise FailedPrecondition(f"job {job.name!r} cannot train on this node: "
                                         f"{self._unfit(job.name, server, state, exc)}") from None
            except Exception as exc:
                logger.warning("job %s span %d:%d: restoring the last committed state failed: %s",
                               job.name, server.start, server.end, exc)
                raise
            if not adopted:
                logger.info("job %s span %d:%d: no committed round at the coordinator; starting "
                            "from the job's initial state", job.name, server.start, server.end)
            state.restored = True

    @staticmethod
    def _unfit(job: str, server, state: JobRounds, exc: RoundError) -> str:
        """The committed state cannot be adopted here, ever: mark the job (before_step refuses
        its calls from now on), log it once; returns why."""
        state.broken = (f"the coordinator's committed state of span {server.start}:{server.end} does not fit "
                        f"this node's adapter ({exc}): committed by other members alone, a forged round 1? "
                        f"(docs/security.md)")
        logger.error("job %s: %s; refusing its Forward and Backward from now on", job, state.broken)
        return state.broken

    async def after_backward(self, manager, job) -> None:
        state = self.jobs.get(job.name)
        if state is None or job.pending:  # inside an optimizer step's micro-batches: nothing moves
            return
        running = self._overlapped.get(job.name)
        if running is not None and running.task is not None and not running.task.done() and \
                job.inner_steps - running.steps >= state.member.config.overlap_max_steps:
            await self._wait_overlapped(manager, job, running)  # out for as long as it may be
        await self.land_if_ready(manager, job)
        if job.inner_steps - state.steps_at_round < state.member.config.inner_steps:
            return
        async with state.lock:
            if job.inner_steps - state.steps_at_round < state.member.config.inner_steps:
                return
            if state.member.config.overlap_rounds:
                await self._overlapped_boundary(manager, job, state)
                return
            r, t0 = state.committed_round + 1, time.monotonic()
            try:
                await self.run_round(manager, job, state)
            finally:
                self._log_wait(r, job.name, manager.server, "blocking", time.monotonic() - t0)

    # ---- overlapped rounds -----------------------------------------------------------

    def _log_wait(self, r: int, job: str, server, how: str, wait_s: float) -> None:
        # One line per round; benchmarks (bench_wan) parse the backward_wait_s= token.
        logger.info("round %d of job %s span %d:%d: %s, backward_wait_s=%.3f", r, job, server.start,
                    server.end, how, wait_s)

    async def land_if_ready(self, manager, job) -> None:
        """Land the job's overlapped round if it is done, at a point where that changes no
        step in progress: after a Backward that ended an optimizer step, or before a Forward
        with no micro-batch pending (never between a micro-batch's Forward and its Backward,
        nor inside an optimizer step's micro-batches)."""
        running = self._overlapped.get(job.name)
        if running is None or running.land is None or job.pending:
            return
        land, running.land = running.land, None
        running.landed = await manager.server.run_torch(land)
        self._log_wait(running.round, job.name, manager.server,
                       f"overlapped, landed {running.landed} inner steps after its snapshot", running.wait_s)

    async def _overlapped_boundary(self, manager, job, state: JobRounds) -> None:
        """A boundary with overlapped rounds (under state.lock): wait for the previous round
        if it is still out (the only wait a Backward has) and land it, then start the next."""
        running = self._overlapped.get(job.name)
        if running is not None and running.task is not None and not running.task.done():
            await self._wait_overlapped(manager, job, running)
        await self.land_if_ready(manager, job)
        if job.inner_steps - state.steps_at_round < state.member.config.inner_steps:
            return
        await self._start_overlapped(manager, job, state)

    async def _wait_overlapped(self, manager, job, running: _Overlapped) -> None:
        """Hold this Backward until the round is done (the caller lands it); the first
        Backward held has its wait logged with the landing."""
        first, running.waited = not running.waited, True
        t0 = time.monotonic()
        await asyncio.shield(running.task)  # _overlapped_round raises nothing but cancellation
        if first:
            running.wait_s = time.monotonic() - t0

    async def _start_overlapped(self, manager, job, state: JobRounds) -> None:
        """Snapshot the adapter (with the step and token counts, atomically with the training
        steps: one torch thread) and run round r on the snapshot in the background."""
        params = list(job.adapter.parameters())

        def snapshot():
            shadow = [p.detach().clone() for p in params]
            return shadow, flatten_params(shadow), job.inner_steps, job.tokens

        shadow, flat, steps, tokens = await manager.server.run_torch(snapshot)
        bg = _Overlapped(round=state.committed_round + 1, shadow=shadow, snapshot=flat, steps=steps,
                         tokens=tokens, before=(state.steps_at_round, state.tokens_at_round))
        weight = max(tokens - state.tokens_at_round, 1)
        state.steps_at_round, state.tokens_at_round = steps, tokens  # the next boundary: steps + H
        self._overlapped[job.name] = bg
        bg.task = asyncio.create_task(self._overlapped_round(manager, job, state, bg, weight))

    async def _overlapped_round(self, manager, job, state: JobRounds, bg: _Overlapped, weight: int) -> None:
        """Round bg.round on the snapshot, then land it on the live adapter: θ_local ← where
        the round restarted the snapshot + the steps made since (overlap_restart). A round
        given up restarts from θ_global the same way; an unexpected error keeps the live
        adapter as it is and makes the next Backward start the round again (as blocking
        rounds do: their Backward fails and the next one retries)."""
        server = manager.server
        try:
            await self.run_round(manager, job, state, params=bg.shadow, tokens=weight)
        except Exception as exc:
            state.steps_at_round, state.tokens_at_round = bg.before
            logger.warning("round %d of job %s span %d:%d (overlapped) failed: %s; the next Backward "
                           "starts it again", bg.round, job.name, server.start, server.end, exc)
        else:
            # run_round set the counters when it ended; the rounds count from the snapshot
            state.steps_at_round, state.tokens_at_round = bg.steps, bg.tokens
            live = list(job.adapter.parameters())

            restart = flatten_params(bg.shadow)

            def land() -> int:
                assign_flat(live, overlap_restart(restart, flatten_params(live), bg.snapshot))
                return job.inner_steps - bg.steps

            bg.land = land  # land_if_ready, at the next safe point
        finally:
            bg.shadow = []

    async def settled(self, manager, job) -> None:
        """Wait for the job's round running in the background, if any, and land it (GetState,
        tests): a caller with no step of the job in progress."""
        running = self._overlapped.get(job.name)
        if running is not None and running.task is not None:
            await asyncio.shield(running.task)
        await self.land_if_ready(manager, job)

    # ---- one round -------------------------------------------------------------------

    async def run_round(self, manager, job, state: JobRounds, *, params=None, tokens: int | None = None) -> bool:
        """Round r = last committed + 1, retried with a new quorum after a failed attempt.
        params: the tensors the round reads θ_local from and restarts (the live adapter's, or
        an overlapped round's snapshot copies); tokens: this member's weight (default: since
        the last round)."""
        server = manager.server
        r = state.committed_round + 1
        span = common_pb2.Span(start=server.start, end=server.end)
        tokens = tokens if tokens is not None else max(job.tokens - state.tokens_at_round, 1)
        params = params if params is not None else list(job.adapter.parameters())
        for _ in range(self.config.max_attempts):
            try:
                reply = await self._begin(job.name, span, r, tokens)
            except FailedPrecondition as exc:  # formed without us, or committed without us
                try:
                    if await self._catch_up(server, job, state, params, r, why="committed without this node"):
                        return True
                except RoundError as fetch_exc:  # it can never be adopted: say so once, stop training the job
                    self._unfit(job.name, server, state, fetch_exc)
                except Exception as fetch_exc:
                    logger.warning("round %d of job %s: fetching the committed state failed: %s",
                                   r, job.name, fetch_exc)
                logger.warning("round %d of job %s span %d:%d: %s", r, job.name, server.start,
                               server.end, exc)
                break
            except Exception as exc:
                logger.warning("round %d of job %s span %d:%d: BeginRound failed: %s", r, job.name,
                               server.start, server.end, exc)
                break
            if await self._attempt(server, job, span, state, params, r, reply, tokens):
                return True
        # Given up: restart the inner steps from the committed θ_global (the H steps are lost).
        self._stop_serving(job.name)
        await server.run_torch(assign_flat, params, state.member.global_flat.clone())
        state.steps_at_round, state.tokens_at_round = job.inner_steps, job.tokens
        logger.warning("round %d of job %s span %d:%d given up; adapter reset to round %d",
                       r, job.name, server.start, server.end, state.committed_round)
        return False

    async def _begin(self, job: str, span, r: int, tokens: int):
        """BeginRound; after a failed attempt this call is what gives it up at the coordinator,
        and until it returns (the attempt settled) our shard of it is still served."""
        try:
            reply, sent, received = await self.coordinator.begin(job, span, r, tokens)
            # the attempt's traffic includes its BeginRound (issue 12: every byte of the round)
            self.exchange.count(job, r, reply.attempt, sent=sent, received=received, coordinator=True)
            return reply
        finally:
            self._stop_serving(job)

    def _stop_serving(self, job: str) -> None:
        serving = self._serving.pop(job, None)
        if serving is not None:
            r, attempt, task = serving
            task.cancel()
            self.exchange.leave(job, r, attempt, "given up")

    async def _catch_up(self, server, job, state: JobRounds, params, r: int, *, why: str) -> bool:
        """Adopt the coordinator's last committed state if it is of round >= r (checksum
        verified; residuals restart at zero); False if there is none that recent."""
        got = await self.coordinator.committed_state(job.name, common_pb2.Span(start=server.start, end=server.end))
        if got is None or got.round < r:
            return False
        state.member.load_shared_state(got.shared)
        await server.run_torch(assign_flat, params, state.member.local_start())
        state.committed_round = got.round
        state.steps_at_round, state.tokens_at_round = job.inner_steps, job.tokens
        logger.info("round %d of job %s span %d:%d (%s): adopted the coordinator's committed state, "
                    "checksum %s", got.round, job.name, server.start, server.end, why, got.checksum[:16])
        return True

    async def _attempt(self, server, job, span, state: JobRounds, params, r: int, reply,
                       tokens: int) -> bool:
        """One formation of round r: exchange, apply, commit; on failure roll back, False."""
        member, me = state.member, self._member_id()
        group = [(m.member_id, m.address) for m in reply.members]
        n, s, attempt = len(group), reply.shard_index, reply.attempt
        saved = {k: getattr(member, k).clone() for k in ("global_flat", "momentum", "residual", "owner_residual")}
        t0 = time.monotonic()
        owner_task = None
        try:
            self.exchange.open(job.name, r, attempt, [m for m, _ in group])  # members' contributions may land
            local = await server.run_torch(flatten_params, params)

            def contribute() -> list[bytes]:
                # abort() first: a failed attempt's owner may have staged an owner residual after
                # its rollback; the executor is one thread, so that aggregate ran before this.
                member.abort()
                return member.contribute(local, round_index=r, num_shards=n)

            async def aggregate(contributions: list[Contribution]) -> bytes:
                return (await server.run_torch(lambda: member.aggregate(
                    contributions, round_index=r, shard_index=s, num_shards=n))).payload

            payloads = await server.run_torch(contribute)
            self.exchange.put(job.name, r, attempt, Contribution(sender=me, tokens=tokens, payload=payloads[s]))
            inbox = self.exchange.inbox(job.name, r, attempt)
            owner_task = asyncio.create_task(self.exchange.own_shard(
                job.name, r, s, [m for m, _ in group], inbox, aggregate))
            results = await self._results(job.name, span, r, attempt, me, s, tokens, payloads, group, inbox)
            checksum = await server.run_torch(lambda: member.apply(results, round_index=r, num_shards=n))
            sent, received = await self._commit(server, job.name, span, r, attempt, me, checksum, member,
                                                own=(s, results[s]), n=n, send_state=reply.send_state,
                                                base=(saved["global_flat"], saved["momentum"]))
        except (Exception, asyncio.CancelledError) as exc:
            owner_task = self._roll_back(server, job.name, state, saved, r, attempt, owner_task, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return False
        finally:
            if owner_task is not None:
                owner_task.cancel()
        self.exchange.leave(job.name, r, attempt, None)
        await server.run_torch(assign_flat, params, member.local_start())
        state.committed_round = r
        state.steps_at_round, state.tokens_at_round = job.inner_steps, job.tokens
        logger.info("round %d of job %s span %d:%d committed here (attempt %d, group of %d), "
                    "%d B sent, %d B received, %.2f s", r, job.name, server.start, server.end, attempt, n,
                    sent, received, time.monotonic() - t0)
        return True

    async def _results(self, job: str, span, r: int, attempt: int, me: str, s: int, tokens: int,
                       payloads: list[bytes], group, inbox) -> list[bytes]:
        """Our contribution to every other shard's owner; every shard's result in shard order
        (ours from our own inbox). The first failure (an owner gone, a broken stream) ends the
        wait at once."""
        sends = [asyncio.create_task(self.exchange.send(job, span, r, attempt, me, j, tokens, payloads[j], addr))
                 for j, (_, addr) in enumerate(group) if j != s]
        try:
            own, *got = await asyncio.wait_for(asyncio.gather(asyncio.shield(inbox.result), *sends),
                                               self.config.exchange_timeout_s)
        except BaseException:
            for t in sends:
                t.cancel()
            raise
        return [own if j == s else got[j - (j > s)] for j in range(len(group))]

    def _roll_back(self, server, job: str, state: JobRounds, saved: dict, r: int, attempt: int,
                   owner_task, exc: BaseException):
        """A failed attempt: θ_global, momentum and both residuals as before it. Unless
        cancelled, our shard keeps being served (the others may still complete the attempt and
        need its result) until the coordinator has settled the attempt (see _begin). Returns
        the owner task to cancel now, if any."""
        if owner_task is not None and not isinstance(exc, asyncio.CancelledError):
            self._serving[job] = (r, attempt, owner_task)
            owner_task = None
        else:
            self.exchange.leave(job, r, attempt, exc)
        member = state.member
        member.abort()
        for k, v in saved.items():
            setattr(member, k, v)
        logger.warning("round %d attempt %d of job %s span %d:%d failed, rolled back to round %d: %s",
                       r, attempt, job, server.start, server.end, state.committed_round, exc)
        return owner_task

    async def _commit(self, server, job: str, span, r: int, attempt: int, me: str, checksum: str,
                      member: DiLoCoMember, *, own: tuple[int, bytes], n: int, send_state: bool,
                      base: tuple) -> tuple[int, int]:
        """CommitRound (RoundCoordinator.commit) with the attempt's traffic; ``base`` is
        (θ_global, momentum) before the round, sent (zstd) where BeginRound asked for the state.
        Raises unless committed; returns every byte of the attempt (sent, received):
        ExchangeShard, BeginRound and CommitRound messages."""
        if member.numel * 8 > COORDINATOR_STATE_BYTES:  # θ_global and momentum, fp32
            raise FailedPrecondition(
                f"job {job!r} span {span.start}:{span.end}: the round's state is {member.numel * 8 / 1e6:.1f} MB, "
                f"over the {COORDINATOR_STATE_BYTES >> 20} MiB a coordinator keeps per round; use a smaller "
                f"adapter (rank) or fewer blocks per node")

        async def state() -> bytes:
            return await server.run_torch(state_to_bytes, member.global_flat, member.momentum)

        async def base_state() -> bytes:
            return await server.run_torch(state_to_zstd, *base)

        # Every ExchangeShard message of the attempt has been counted by now: our calls
        # returned, and the handlers answering our shard count their replies before sending.
        traffic = self.exchange.traffic(job, r, attempt)
        sent, received = await self.coordinator.commit(
            job, span, r, attempt, me, checksum, own=own, step=member.outer_settings(r, n), traffic=traffic,
            send_state=send_state, state=state, base_state=base_state)
        return traffic[0] + traffic[2] + sent, traffic[1] + traffic[3] + received

    async def close(self) -> None:
        for running in self._overlapped.values():
            if running.task is not None and not running.task.done():
                running.task.cancel()
        for running in self._overlapped.values():
            if running.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await running.task
        self._overlapped.clear()
        await self.coordinator.close()


__all__ = ["JobRounds", "RoundConfig", "RoundDriver"]
