"""The node's side of a DiLoCo round over the network: coordinator quorum, ExchangeShard, commit.

After every H inner steps of a job (``JobSpec.round_steps``, 0 = ``DiLoCoConfig``'s default)
the Backward call that made the H-th step runs round r = last committed + 1 before it
replies, so the trainer feeding this replica waits for the round:

1. ``BeginRound`` at the coordinator: the group (shard order) and this member's shard.
2. ``DiLoCoMember.contribute``; each payload goes to its shard's owner by ``ExchangeShard``
   (one call per other owner: CONTRIBUTION in, that owner's RESULT back on the same call).
   As owner, this node collects the group's contributions for its shard (``receive``, called
   by the servicer), ``aggregate``s once all are in and answers every call with the result.
3. ``apply`` → checksum; ``CommitRound`` with the checksum and the new global state.
4. Committed: the adapter restarts from ``local_start()``. Anything else (a timeout, a peer
   error, checksums that disagree): θ_global, momentum and both residuals are restored to
   their values before the round and the adapter restarts from the committed θ_global;
   nothing is half-applied.

With one replica the group has one member and the exchange is local (no RPC).
Math in node/diloco.py; nothing here changes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import torch

from pollinate.node.diloco import (
    Contribution,
    DiLoCoConfig,
    DiLoCoMember,
    assign_flat,
    flatten_params,
)
from pollinate.protocol.errors import FailedPrecondition, NotFound, RpcTimeout
from pollinate.protocol.tensors import EncodedTensor, TensorAssembler

logger = logging.getLogger(__name__)

PAYLOAD = "payload"


@dataclass(frozen=True, kw_only=True)
class RoundConfig:
    # BeginRound deadline, seconds: must exceed the coordinator's round window.
    begin_timeout_s: float = 60.0
    # Longest wait for the group's contributions (owner) and for each owner's result, seconds.
    exchange_timeout_s: float = 60.0
    # CommitRound deadline, seconds (the coordinator waits for every member's checksum).
    commit_timeout_s: float = 90.0

    def __post_init__(self) -> None:
        for name in ("begin_timeout_s", "exchange_timeout_s", "commit_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(kw_only=True)
class _JobRounds:
    member: DiLoCoMember
    committed_round: int = 0
    steps_at_round: int = 0  # job.inner_steps when the last round ended
    tokens_at_round: int = 0  # job.tokens when the last round ended
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(kw_only=True)
class _Inbox:
    """This node as owner of its shard in one round: contributions in, one result out."""

    contributions: dict[str, Contribution] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    result: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def payload_chunks(payload: bytes, framing):
    return EncodedTensor(name=PAYLOAD, dtype="uint8", shape=(len(payload),), codec="none",
                         payload=payload).chunks(framing)


class RoundDriver:
    """Runs a job's rounds on one node. ``coordinator``: a CoordinatorClient (member id)."""

    def __init__(self, config: RoundConfig, *, coordinator_address: str, token: str,
                 member_id, framing) -> None:
        self.config = config
        self.coordinator_address = coordinator_address
        self.token = token
        self._member_id = member_id  # callable: the id changes when the node re-joins
        self.framing = framing
        self.jobs: dict[str, _JobRounds] = {}
        self._inboxes: dict[tuple[str, int], _Inbox] = {}
        self._channel = None

    # ---- tracking --------------------------------------------------------------------

    def track(self, job) -> None:
        """A new job: θ_global starts at the adapter's initial value (same seed everywhere)."""
        cfg = DiLoCoConfig(inner_steps=job.spec.round_steps) if job.spec.round_steps else DiLoCoConfig()
        params = list(job.adapter.parameters())
        self.jobs[job.name] = _JobRounds(member=DiLoCoMember(flatten_params(params), cfg))

    def committed(self, name: str) -> tuple[int, dict[str, torch.Tensor]]:
        """The last committed round of a job on this node and its shared state."""
        state = self.jobs.get(name)
        if state is None or state.committed_round == 0:
            raise NotFound(f"job {name!r}: no committed round on this node")
        return state.committed_round, state.member.shared_state()

    async def after_backward(self, manager, job) -> None:
        state = self.jobs.get(job.name)
        if state is None:
            return
        if job.inner_steps - state.steps_at_round < state.member.config.inner_steps:
            return
        async with state.lock:
            if job.inner_steps - state.steps_at_round < state.member.config.inner_steps:
                return
            await self.run_round(manager, job, state)

    # ---- one round -------------------------------------------------------------------

    def _coordinator(self):
        from pollinate.protocol.channels import ChannelConfig, open_channel
        from pollinate.protocol.v1 import coordinator_pb2_grpc

        if self._channel is None:
            self._channel = open_channel(self.coordinator_address, ChannelConfig(token=self.token))
        return coordinator_pb2_grpc.CoordinatorStub(self._channel)

    async def run_round(self, manager, job, state: _JobRounds) -> bool:
        from pollinate.protocol.errors import translate_rpc_errors
        from pollinate.protocol.v1 import common_pb2, coordinator_pb2

        member, server = state.member, manager.server
        r = state.committed_round + 1
        me = self._member_id()
        span = common_pb2.Span(start=server.start, end=server.end)
        tokens = max(job.tokens - state.tokens_at_round, 1)
        params = list(job.adapter.parameters())
        saved = {k: getattr(member, k).clone() for k in ("global_flat", "momentum", "residual", "owner_residual")}
        t0 = time.monotonic()
        moved = 0
        try:
            with translate_rpc_errors(peer=self.coordinator_address):
                reply = await self._coordinator().BeginRound(coordinator_pb2.BeginRoundRequest(
                    job=job.name, span=span, round=r, member_id=me, tokens=tokens),
                    timeout=self.config.begin_timeout_s)
            group = [(m.member_id, m.address) for m in reply.members]
            n, s = len(group), reply.shard_index
            local = await server._run(flatten_params, params)
            payloads = await server._run(lambda: member.contribute(local, round_index=r, num_shards=n))
            inbox = self._inbox(job.name, r)
            inbox.contributions[me] = Contribution(sender=me, tokens=tokens, payload=payloads[s])
            owner_task = asyncio.create_task(self._own_shard(server, job.name, r, s, n, group, inbox))
            sends = [asyncio.create_task(self._send(job.name, span, r, me, j, tokens, payloads[j], addr))
                     for j, (_, addr) in enumerate(group) if j != s]
            try:
                own = await asyncio.wait_for(asyncio.shield(inbox.result), self.config.exchange_timeout_s)
                got = await asyncio.wait_for(asyncio.gather(*sends), self.config.exchange_timeout_s)
            finally:
                for t in (owner_task, *sends):
                    t.cancel()
            results, k = [], 0
            for j in range(n):
                if j == s:
                    results.append(own)
                else:
                    results.append(got[k][0])
                    moved += got[k][1]
                    k += 1
            moved += len(own) * (n - 1) + sum(len(c.payload) for m, c in inbox.contributions.items() if m != me)
            checksum = await server._run(lambda: member.apply(results, round_index=r, num_shards=n))
            blob = await server._run(_save_state, member.shared_state())
            with translate_rpc_errors(peer=self.coordinator_address):
                done = await self._coordinator().CommitRound(coordinator_pb2.CommitRoundRequest(
                    job=job.name, span=span, round=r, member_id=me, checksum=checksum, state=blob),
                    timeout=self.config.commit_timeout_s)
            if not done.committed:
                raise FailedPrecondition(f"round {r} not committed: {done.reason}")
        except (Exception, asyncio.CancelledError) as exc:
            member.abort()
            for k_, v in saved.items():
                setattr(member, k_, v)
            await server._run(assign_flat, params, member.global_flat.clone())
            state.steps_at_round, state.tokens_at_round = job.inner_steps, job.tokens
            logger.warning("round %d of job %s span %d:%d failed, rolled back to round %d: %s",
                           r, job.name, server.start, server.end, state.committed_round, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return False
        finally:
            self._inboxes.pop((job.name, r), None)
        await server._run(assign_flat, params, member.local_start())
        state.committed_round = r
        state.steps_at_round, state.tokens_at_round = job.inner_steps, job.tokens
        logger.info("round %d of job %s span %d:%d committed by %d/%d members, %.1f kB sent+received, "
                    "%.2f s", r, job.name, server.start, server.end, n, n, moved / 1000,
                    time.monotonic() - t0)
        return True

    def _inbox(self, job: str, r: int) -> _Inbox:
        inbox = self._inboxes.get((job, r))
        if inbox is None:
            inbox = self._inboxes[(job, r)] = _Inbox()
        return inbox

    async def _own_shard(self, server, job: str, r: int, s: int, n: int, group, inbox: _Inbox) -> None:
        """Wait for every group member's contribution to shard s, aggregate, publish."""
        ids = {m for m, _ in group}
        try:
            while not ids <= set(inbox.contributions):
                inbox.arrived.clear()
                await inbox.arrived.wait()
            contribs = [inbox.contributions[m] for m, _ in group]
            member = self.jobs[job].member
            result = await server._run(lambda: member.aggregate(
                contribs, round_index=r, shard_index=s, num_shards=n))
            if not inbox.result.done():
                inbox.result.set_result(result.payload)
        except Exception as exc:
            if not inbox.result.done():
                inbox.result.set_exception(exc)

    async def _send(self, job: str, span, r: int, me: str, j: int, tokens: int, payload: bytes,
                    address: str) -> tuple[bytes, int]:
        """ExchangeShard to owner j: our contribution out, its result back."""
        from pollinate.protocol.channels import ChannelConfig, open_channel
        from pollinate.protocol.errors import translate_rpc_errors
        from pollinate.protocol.v1 import node_pb2, node_pb2_grpc

        def messages():
            for chunk in payload_chunks(payload, self.framing):
                yield node_pb2.ShardMessage(job=job, span=span, round=r, sender_id=me, shard_index=j,
                                            weight=tokens, kind=node_pb2.ShardMessage.CONTRIBUTION,
                                            tensor=chunk)

        channel = open_channel(address, ChannelConfig(token=self.token))
        try:
            with translate_rpc_errors(peer=address):
                call = node_pb2_grpc.NodeStub(channel).ExchangeShard(
                    messages(), timeout=self.config.exchange_timeout_s)
                assembler = TensorAssembler(self.framing)
                async for msg in call:
                    if msg.kind != node_pb2.ShardMessage.RESULT or msg.shard_index != j or msg.round != r:
                        raise FailedPrecondition(f"ExchangeShard to {address}: unexpected reply "
                                                 f"(kind {msg.kind}, shard {msg.shard_index}, round {msg.round})")
                    encoded = assembler.feed(msg.tensor)
                    if encoded is not None:
                        return encoded.payload, len(payload) + len(encoded.payload)
        finally:
            await channel.close()
        raise FailedPrecondition(f"ExchangeShard to {address}: no result for shard {j}")

    # ---- owner side, called by the servicer ------------------------------------------

    async def receive(self, job: str, r: int, sender: str, shard: int, tokens: int,
                      payload: bytes) -> bytes:
        """A contribution to our shard of round r; returns the shard's result bytes."""
        state = self.jobs.get(job)
        if state is None:
            raise NotFound(f"ExchangeShard: job {job!r} is unknown on this node")
        if r <= state.committed_round:
            raise FailedPrecondition(f"ExchangeShard: round {r} of job {job!r} is already committed here")
        inbox = self._inbox(job, r)
        if sender in inbox.contributions:
            raise FailedPrecondition(f"ExchangeShard: {sender} sent round {r} twice")
        inbox.contributions[sender] = Contribution(sender=sender, tokens=tokens, payload=payload)
        inbox.arrived.set()
        try:
            return await asyncio.wait_for(asyncio.shield(inbox.result), self.config.exchange_timeout_s)
        except asyncio.TimeoutError:
            raise RpcTimeout(f"ExchangeShard: round {r} of job {job!r}: no result within "
                             f"{self.config.exchange_timeout_s:.0f} s") from None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def _save_state(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


def load_state(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


__all__ = ["RoundConfig", "RoundDriver", "load_state"]
