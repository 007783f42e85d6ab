"""ExchangeShard: a round's contributions between the members of a span group.

One owner per shard. As a sender, ``send`` streams this node's contribution to shard j to
its owner and returns the owner's result (both ways on one call). As an owner, this node
collects the group's contributions to its own shard in an inbox (``receive``, called by the
servicer for each member's call, plus ``put`` for our own), ``own_shard`` averages them once
all are in, or after ``contribution_wait_s`` those that arrived (weighted by tokens: a member
that died or whose stream broke is dropped and the average renormalises), and answers every
waiting call with the one result.

An inbox exists only for a round attempt this node began itself (``open``, right after its
own BeginRound named the group): a contribution that arrives first waits for that, at most
``exchange_timeout_s``, holding nothing but its own call; one from outside the group, for a
round more than MAX_ROUNDS_AHEAD past the last committed here, or still unmatched at the
timeout is refused and kept nowhere (a peer cannot park memory here for rounds that never
form). ``leave(job, r, attempt)`` closes the inboxes up to that attempt: senders still waiting get
an error, later ones are refused. Every ExchangeShard message is counted at its serialized
size per (job, round, attempt) (``count`` / ``traffic``): the commit reports those totals.

The round itself (when to send, what to do with the results, commit or roll back) is
node/rounds.py's; the math is node/diloco.py's.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable

from pollinate.node.diloco import Contribution
from pollinate.protocol.channels import open_channel, peer_channel_config
from pollinate.protocol.errors import FailedPrecondition, InvalidRequest, NotFound, RpcTimeout, translate_rpc_errors
from pollinate.protocol.tensors import EncodedTensor, MiB, TensorAssembler
from pollinate.protocol.v1 import node_pb2, node_pb2_grpc

if TYPE_CHECKING:
    from pollinate.node.rounds import RoundConfig

logger = logging.getLogger(__name__)

PAYLOAD = "payload"  # the one tensor an ExchangeShard message carries (uint8 bytes)
# Rounds past the last one committed here that a contribution may name: the round in
# progress, and one more for a peer whose commit reply came before ours.
MAX_ROUNDS_AHEAD = 2


def payload_chunks(payload: bytes, framing):
    """A contribution's or result's bytes as Tensor chunks (at most framing's chunk size each)."""
    return EncodedTensor(name=PAYLOAD, dtype="uint8", shape=(len(payload),), codec="none",
                         payload=payload).chunks(framing)


@dataclass(kw_only=True)
class Inbox:
    """This node as owner of its shard in one round attempt: contributions in, one result out."""

    contributions: dict[str, Contribution] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    group: frozenset[str] | None = None  # the members, once this node began the attempt (open)
    waiters: int = 0  # contributions waiting for open()
    opened: asyncio.Event = field(default_factory=asyncio.Event)  # set by open() and by leave()
    result: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ShardExchange:
    """Both sides of ExchangeShard for the jobs of one node.

    ``job_state(job)``: the job's last round committed here and its adapter's values, None for
    a job this node does not run rounds for (its contributions are refused)."""

    def __init__(self, config: RoundConfig, *, token: str, framing,
                 job_state: Callable[[str], tuple[int, int] | None]) -> None:
        self.config = config
        self.token = token
        self.framing = framing
        self._job_state = job_state  # job -> (its last committed round here, its adapter's values), or None
        self._inboxes: dict[tuple[str, int, int], Inbox] = {}  # (job, round, attempt)
        self._left: dict[str, tuple[int, int]] = {}  # job -> (round, attempt) last left: older refused
        # (job, round, attempt) -> [bytes sent, bytes received] of serialized ExchangeShard
        # messages, then the same of the coordinator's messages (BeginRound) for that attempt
        self._traffic: dict[tuple[str, int, int], list[int]] = {}

    # ---- traffic -----------------------------------------------------------------------

    def count(self, job: str, r: int, attempt: int, *, sent: int = 0, received: int = 0,
              coordinator: bool = False) -> None:
        """Add serialized message sizes to (job, round, attempt)'s traffic: ExchangeShard's, or
        with ``coordinator`` BeginRound's."""
        state = self._job_state(job)
        committed = state[0] if state is not None else None
        if committed is None or (r, attempt) <= self._left.get(job, (0, 0)) or r > committed + MAX_ROUNDS_AHEAD:
            return  # over here: already reported (or refused)
        traffic = self._traffic.setdefault((job, r, attempt), [0, 0, 0, 0])
        traffic[2 * coordinator] += sent
        traffic[2 * coordinator + 1] += received

    def traffic(self, job: str, r: int, attempt: int) -> tuple[int, int, int, int]:
        """(ExchangeShard sent, received, coordinator sent, received) bytes of the attempt so far."""
        return tuple(self._traffic.get((job, r, attempt), (0, 0, 0, 0)))

    # ---- owner side --------------------------------------------------------------------

    def inbox(self, job: str, r: int, attempt: int) -> Inbox:
        inbox = self._inboxes.get((job, r, attempt))
        if inbox is None:
            inbox = self._inboxes[(job, r, attempt)] = Inbox()
        return inbox

    def open(self, job: str, r: int, attempt: int, group: list[str]) -> Inbox:
        """This node began (job, r, attempt) with these members: their contributions may land."""
        inbox = self.inbox(job, r, attempt)
        inbox.group = frozenset(group)
        inbox.opened.set()
        return inbox

    def put(self, job: str, r: int, attempt: int, contribution: Contribution) -> None:
        """Our own contribution to our shard (it travels no wire)."""
        inbox = self.inbox(job, r, attempt)
        inbox.contributions[contribution.sender] = contribution
        inbox.arrived.set()

    def admit(self, job: str, r: int, attempt: int, payload_bytes: int) -> None:
        """What a contribution to round r (that attempt) must meet before its bytes are kept
        (ExchangeShard checks it at the first message, from the size the tensor declares)."""
        state = self._job_state(job)
        if state is None:
            raise NotFound(f"ExchangeShard: job {job!r} is unknown on this node")
        committed, numel = state
        if r <= committed:
            raise FailedPrecondition(f"ExchangeShard: round {r} of job {job!r} is already committed here")
        if r > committed + MAX_ROUNDS_AHEAD:
            raise FailedPrecondition(f"ExchangeShard: round {r} of job {job!r} is not in progress here "
                                     f"(round {committed} is the last committed)")
        if (r, attempt) <= self._left.get(job, (0, 0)):
            raise FailedPrecondition(f"ExchangeShard: round {r} attempt {attempt} of job {job!r} is "
                                     f"over on this node")
        if payload_bytes > 8 * numel + MiB:  # a shard's values in fp32, twice over, and headers
            raise InvalidRequest(f"ExchangeShard: a contribution of {payload_bytes} bytes to job {job!r}, whose "
                                 f"adapter has {numel} values (at most {8 * numel + MiB} bytes)")

    async def receive(self, job: str, r: int, sender: str, shard: int, tokens: int,
                      payload: bytes, attempt: int = 1) -> bytes:
        """A member's contribution to our shard of round r (that attempt); returns the shard's
        result bytes once the owner task has published them."""
        self.admit(job, r, attempt, len(payload))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.exchange_timeout_s
        inbox = await self._opened(job, r, attempt, deadline)
        if sender not in inbox.group:
            raise FailedPrecondition(f"ExchangeShard: {sender} is not a member of round {r} attempt {attempt} "
                                     f"of job {job!r}")
        if sender in inbox.contributions:
            raise FailedPrecondition(f"ExchangeShard: {sender} sent round {r} twice")
        self.put(job, r, attempt, Contribution(sender=sender, tokens=tokens, payload=payload))
        try:
            return await asyncio.wait_for(asyncio.shield(inbox.result), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise RpcTimeout(f"ExchangeShard: round {r} of job {job!r}: no result within "
                             f"{self.config.exchange_timeout_s:.0f} s") from None

    async def _opened(self, job: str, r: int, attempt: int, deadline: float) -> Inbox:
        """The attempt's inbox once this node has begun it (open); refused if it does not
        begin by `deadline` or is left meanwhile. An inbox nobody opened is dropped with its
        last waiter, so a round that never forms leaves nothing behind."""
        key = (job, r, attempt)
        inbox = self.inbox(job, r, attempt)
        if not inbox.opened.is_set():
            inbox.waiters += 1
            try:
                await asyncio.wait_for(inbox.opened.wait(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                raise RpcTimeout(f"ExchangeShard: round {r} attempt {attempt} of job {job!r} did not begin "
                                 f"on this node within {self.config.exchange_timeout_s:.0f} s") from None
            finally:
                inbox.waiters -= 1
                if inbox.group is None and not inbox.waiters and self._inboxes.get(key) is inbox:
                    del self._inboxes[key]
        if inbox.group is None or self._inboxes.get(key) is not inbox:  # left before it began here
            raise FailedPrecondition(f"ExchangeShard: round {r} attempt {attempt} of job {job!r} is over "
                                     f"on this node")
        return inbox

    async def own_shard(self, job: str, r: int, s: int, group: list[str], inbox: Inbox,
                        aggregate: Callable[[list[Contribution]], Awaitable[bytes]]) -> None:
        """Wait for the group's contributions to shard s (at most contribution_wait_s; a sender
        that does not make it is dropped and the average renormalises), ``aggregate`` them
        (on the torch thread: the caller's), publish the result to every waiting call."""
        ids = set(group)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.contribution_wait_s
        try:
            while not ids <= set(inbox.contributions) and loop.time() < deadline:
                inbox.arrived.clear()
                try:
                    await asyncio.wait_for(inbox.arrived.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            missing = sorted(ids - set(inbox.contributions))
            if missing:
                logger.warning("round %d of job %s shard %d: no contribution from %s within %.0f s; "
                               "averaging the %d that arrived", r, job, s, ", ".join(missing),
                               self.config.contribution_wait_s, len(group) - len(missing))
            result = await aggregate([inbox.contributions[m] for m in group if m in inbox.contributions])
            if not inbox.result.done():
                inbox.result.set_result(result)
        except Exception as exc:
            if not inbox.result.done():
                inbox.result.set_exception(exc)

    def leave(self, job: str, r: int, attempt: int, why) -> None:
        """Close our inboxes up to (r, attempt): waiting senders get an error, late ones are
        refused, and the traffic of what is over is forgotten (it has been reported)."""
        left = self._left[job] = max(self._left.get(job, (0, 0)), (r, attempt))
        for key in [k for k in self._traffic if k[0] == job and k[1:] <= left]:
            del self._traffic[key]
        for key in [k for k in self._inboxes if k[0] == job and k[1:] <= (r, attempt)]:
            inbox = self._inboxes.pop(key)
            inbox.opened.set()  # waiters see it gone and are refused
            if not inbox.result.done():
                inbox.result.set_exception(FailedPrecondition(
                    f"ExchangeShard: round {key[1]} attempt {key[2]} of job {job!r} was left by its "
                    f"owner ({why or 'done'})"))
                inbox.result.exception()  # retrieved: nobody else may be waiting on it

    def result_messages(self, request: node_pb2.ShardMessage, result: bytes) -> list[node_pb2.ShardMessage]:
        """The RESULT replies to a contribution whose first message was ``request``, counted as
        sent before the first goes out: our own CommitRound reports this attempt's traffic."""
        replies = [node_pb2.ShardMessage(job=request.job, span=request.span, round=request.round,
                                         shard_index=request.shard_index, attempt=request.attempt,
                                         kind=node_pb2.ShardMessage.RESULT, tensor=chunk)
                   for chunk in payload_chunks(result, self.framing)]
        self.count(request.job, request.round, request.attempt or 1, sent=sum(m.ByteSize() for m in replies))
        return replies

    # ---- sender side -------------------------------------------------------------------

    async def send(self, job: str, span, r: int, attempt: int, me: str, j: int, tokens: int,
                   payload: bytes, address: str) -> bytes:
        """ExchangeShard to owner j: our contribution out, its result back (both counted)."""

        def messages():
            for chunk in payload_chunks(payload, self.framing):
                msg = node_pb2.ShardMessage(job=job, span=span, round=r, sender_id=me, shard_index=j,
                                            weight=tokens, kind=node_pb2.ShardMessage.CONTRIBUTION,
                                            tensor=chunk, attempt=attempt)
                self.count(job, r, attempt, sent=msg.ByteSize())
                yield msg

        channel = open_channel(address, peer_channel_config(self.token))
        try:
            with translate_rpc_errors(peer=address):
                call = node_pb2_grpc.NodeStub(channel).ExchangeShard(
                    messages(), timeout=self.config.exchange_timeout_s)
                assembler = TensorAssembler(self.framing)
                async for msg in call:
                    self.count(job, r, attempt, received=msg.ByteSize())
                    if msg.kind != node_pb2.ShardMessage.RESULT or msg.shard_index != j or msg.round != r:
                        raise FailedPrecondition(f"ExchangeShard to {address}: unexpected reply "
                                                 f"(kind {msg.kind}, shard {msg.shard_index}, round {msg.round})")
                    encoded = assembler.feed(msg.tensor)
                    if encoded is not None:
                        return encoded.payload
        finally:
            await channel.close()
        raise FailedPrecondition(f"ExchangeShard to {address}: no result for shard {j}")


__all__ = ["Inbox", "PAYLOAD", "ShardExchange", "payload_chunks"]
