"""An inference session through a chain of nodes, with failover by replay.

Each hop is one Inference stream to one peer for blocks [start, end). The client keeps,
per hop, every hidden state it sent (`HopStream.history`). When a hop fails mid-session
(error status, timeout, stream closed), the peer is banned, blocks [start, end) are routed
again, the history is replayed to the replacement chain as one step at position 0 (which
rebuilds its KV cache exactly as the dead peer had it), and the step that failed is
retried. The downstream hops never notice.

A node that leaves gracefully (SIGTERM) or moves may instead hand the session's KV cache to
another replica of its blocks (node/handoff.py): it ends the stream with SessionHandedOff,
naming the replica. The client then opens a stream there proving, with the secret whose
SHA-256 it sent at open (`resume_digest`), that the session is its own, and continues at
its position with no replay. If that resume fails in any way, the hop is replayed as above. The session's position is the client's alone:
a replacement starts a new session at 0 and is brought to the same position by the replay,
so position and history cannot disagree (Petals issue #587).

A session with a job (generate --job) may reach a replica that never trained that job: it
answers NOT_FOUND. That replica is left out of this session's routes (it is not banned:
it serves everyone else) and the hop goes to another replica of its blocks; when none is
left, NotFound names the blocks, the job and the replicas that lack it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
import uuid

import torch

from pollinate.client.routing import Hop, NoRouteError, PeerSpan
from pollinate.client.swarm import Swarm
from pollinate.protocol.errors import (
    InvalidRequest,
    NotFound,
    PeerUnavailable,
    PollinateError,
    RpcTimeout,
    SessionHandedOff,
    Unauthenticated,
    from_rpc_error,
    translate_rpc_errors,
)
from pollinate.protocol.answers import Transcript, prefix_of
from pollinate.protocol.tensors import HIDDEN_STATES, EncodedTensor, TensorAssembler, encode_tensor
from pollinate.protocol.v1 import common_pb2, node_pb2

logger = logging.getLogger(__name__)

# Errors that are the client's own fault: retrying elsewhere would fail the same way.
# NotFound: the session's job does not exist on that node (it was not trained there).
FATAL = (InvalidRequest, NotFound, Unauthenticated)


class HopStream:
    """One Inference stream to one peer for one hop of a route."""

    def __init__(self, swarm: Swarm, hop: Hop, *, session_id: str, max_length: int, job: str = "",
                 resume_secret: bytes | None = None, history: list[torch.Tensor] | None = None):
        self.swarm = swarm
        self.hop = hop
        self.job = job  # training job whose adapter the node applies; "" = the base model
        self.session_id = session_id
        self.max_length = max_length
        # inputs sent, in order (for replay); a resuming stream's starts with those its
        # session's previous node got
        self.history: list[torch.Tensor] = history if history is not None else []
        self._call = None
        self.step_seconds = 0.0  # time spent waiting on this hop, for --verbose and benchmarks
        # Handoff (node/handoff.py): the node gets SHA-256 of `secret`; a replica it hands the
        # session to gives it back only to whoever shows the secret. `resuming`: this stream
        # opens by resuming a session handed to its peer (InferenceOpen.resume_secret).
        self.secret = resume_secret or secrets.token_bytes(32)
        self.resuming = resume_secret is not None
        self.resumed = False  # the resuming stream's first step succeeded
        self.opened_at = time.perf_counter()
        # what the node signed, for a liar report (protocol/answers.py); a resumed session's
        # transcript starts from the inputs sent so far (its prefix), which a recompute handoff
        # prefilled there (the node signs no prefix after a KV handoff: then no evidence)
        self.transcript = Transcript("inference", job=job, start=hop.start, end=hop.end,
                                     prefix=self._sent_so_far() if self.resuming else None) \
            if swarm.keeps_evidence and (self.history or not self.resuming) else None

    def _sent_so_far(self) -> EncodedTensor:
        """The history as the node it went to decoded it off the wire, in prefix_of's form:
        the inputs a node that hands the session off by recompute sends (node/handoff.py
        kept_input holds them exactly). The wire codecs are deterministic: encoding again
        gives the bytes sent."""
        codec = self.swarm.config.wire_codec
        return prefix_of([encode_tensor(h, codec=codec, name=HIDDEN_STATES).decode() for h in self.history])

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        cfg = self.swarm.config
        address = self.hop.peer.address
        t0 = time.perf_counter()
        encoded = encode_tensor(hidden, codec=cfg.wire_codec, name=HIDDEN_STATES)
        try:
            out, signature = await self._exchange(encoded, position, address)
        except asyncio.InvalidStateError as e:
            # grpc.aio: writing to a call the peer already ended (it died, aborted it, or
            # handed the session off): its status says which
            raise await self._ended(address, e) from e
        result = out.decode()
        if tuple(result.shape) != tuple(hidden.shape):
            raise PeerUnavailable(f"{address} returned shape {list(result.shape)} for {list(hidden.shape)}")
        if self.transcript is not None:
            self.transcript.record(position, [encoded, out], signature)
        self.step_seconds += time.perf_counter() - t0
        return result.to(hidden.dtype)

    async def _exchange(self, encoded, position: int, address: str):
        """Write one step's chunks, read the reply's: (the reply still encoded, the node's
        signature of it or None)."""
        cfg = self.swarm.config
        with translate_rpc_errors(peer=address):
            if self._call is None:
                self._call = self.swarm.stub(address).Inference()
                first = True
            else:
                first = False
            for chunk in encoded.chunks():
                req = node_pb2.InferenceRequest(position=position, tensor=chunk)
                if first:
                    req.open.CopyFrom(node_pb2.InferenceOpen(
                        session_id=self.session_id,
                        max_length=self.max_length,
                        reply_codec=cfg.wire_codec,
                        job=self.job,
                        blocks=common_pb2.Span(start=self.hop.start, end=self.hop.end),
                        resume_digest=hashlib.sha256(self.secret).digest() if cfg.handoff else b"",
                        resume_secret=self.secret if self.resuming else b"",
                    ))
                    first = False
                await asyncio.wait_for(self._call.write(req), cfg.step_timeout_s)
            def check(chunk) -> None:  # the reply's shape before its bytes are kept (a node may be hostile)
                if tuple(chunk.shape) != encoded.shape:
                    raise PeerUnavailable(f"{address} answers shape {list(chunk.shape)[:8]} for {list(encoded.shape)}")

            assembler = TensorAssembler(check=check)
            while True:
                reply = await asyncio.wait_for(self._call.read(), cfg.step_timeout_s)
                if reply is grpc_eof():
                    raise PeerUnavailable(f"{address} closed the session stream")
                if reply.position != position:
                    raise PeerUnavailable(f"{address} answered position {reply.position} to step {position}")
                out = assembler.feed(reply.tensor)
                if out is not None:
                    return out, reply.signature if reply.HasField("signature") else None

    async def _ended(self, address: str, error: BaseException) -> PollinateError:
        """The error a call the peer ended means, from its status (a handoff names the new node)."""
        call = self._call
        try:
            code = await asyncio.wait_for(call.code(), 1.0)
            details = await asyncio.wait_for(call.details(), 1.0)
        except Exception:  # no status to read: the peer is simply gone
            return PeerUnavailable(f"{address} ended the session stream: {error}")
        import grpc.aio

        return from_rpc_error(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details),
                              peer=address)

    async def close(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            try:
                await asyncio.wait_for(call.done_writing(), 1.0)
            except Exception:  # the peer may be gone already; closing is best effort
                pass
            call.cancel()


def grpc_eof():
    import grpc.aio

    return grpc.aio.EOF


class RemoteSession:
    """Async core of an inference session over blocks [0, num_blocks)."""

    def __init__(self, swarm: Swarm, *, max_length: int, job: str = ""):
        self.swarm = swarm
        self.max_length = max_length
        self.job = job  # every hop applies this job's adapter ("" = the base model)
        self.session_id = uuid.uuid4().hex[:16]
        self.hops: list[HopStream] = []
        self.position = 0
        self.failovers = 0  # hops replaced mid-session, with their history replayed
        self.handoffs = 0  # hops resumed (first step answered) where a leaving node handed them
        self.handoff_seconds = 0.0  # time from a handoff notice to the resumed step's answer
        self.reroutes = 0  # hops replaced before they held any state (refused, unreachable)
        self.recovery_seconds = 0.0  # time spent rerouting and replaying
        self.lacking_job: dict[str, tuple[str, str]] = {}  # peer id -> (address, its NOT_FOUND) for self.job

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self.hops]

    def _new_stream(self, hop: Hop, resume_secret: bytes | None = None,
                    history: list[torch.Tensor] | None = None) -> HopStream:
        """A stream for `hop`; with `resume_secret`, one that resumes a handed-off session
        whose inputs so far were `history`."""
        return HopStream(self.swarm, hop, session_id=f"{self.session_id}-{hop.start}", max_length=self.max_length,
                         job=self.job, resume_secret=resume_secret, history=history)

    def _lacks_job(self, hop: Hop, error: BaseException) -> bool:
        """Record a replica that answered NOT_FOUND for the session's job; True if it did."""
        if not (self.job and isinstance(error, NotFound)):
            return False
        self.lacking_job[hop.peer.peer_id] = (hop.peer.address, str(error))
        logger.warning("session %s: %s has no job %r; trying another replica of blocks %d:%d",
                       self.session_id, hop.peer.address, self.job, hop.start, hop.end)
        return True

    async def _route(self, start: int, end: int) -> list[Hop]:
        try:
            return await self.swarm.route(start, end, exclude=frozenset(self.lacking_job))
        except NoRouteError as e:
            if not self.lacking_job:
                raise
            lacking = ", ".join(a for a, _ in self.lacking_job.values())
            last = list(self.lacking_job.values())[-1][1]
            raise NotFound(f"no replica of blocks {start}:{end} has job {self.job!r} ({e}; without the job: "
                           f"{lacking}; last answer: {last})") from e

    async def _build(self, start: int, end: int, history: torch.Tensor | None) -> list[HopStream]:
        """Route [start, end) and bring the new hops to the session's position by replay."""
        streams = [self._new_stream(hop) for hop in await self._route(start, end)]
        x = history
        for s in streams:
            if x is None:
                continue
            try:
                y = await s.step(x, 0)
            except BaseException as e:
                for t in streams:
                    await t.close()
                if isinstance(e, (PollinateError, asyncio.TimeoutError, OSError)) and not isinstance(e, FATAL):
                    self.swarm.ban(s.hop.peer, e)
                self._lacks_job(s.hop, e)
                raise
            s.history.append(x)
            x = y
        return streams

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run `hidden` [batch, seq, hidden] through all blocks at the session's position."""
        if self.position + hidden.shape[1] > self.max_length:
            raise InvalidRequest(
                f"session of max_length {self.max_length} cannot take {hidden.shape[1]} more tokens "
                f"after {self.position}"
            )
        if not self.hops:
            await self._reroute(0, None)
        x, i, failures = hidden, 0, 0
        while i < len(self.hops):
            stream = self.hops[i]
            try:
                y = await stream.step(x, self.position)
            except (PollinateError, asyncio.TimeoutError, OSError) as e:
                resume_failed = stream.resuming and not stream.resumed
                if resume_failed:
                    # The handed-off session could not be resumed there (expired, refused,
                    # gone): replay, without banning that replica (it may be the only one left).
                    failures += 1
                    logger.warning("session %s: resuming at %s failed (%s); replaying instead",
                                   self.session_id, stream.hop.peer.address, e)
                elif isinstance(e, FATAL):
                    if not self._lacks_job(stream.hop, e):
                        raise
                    await self._reroute(i, e)
                    continue
                else:
                    failures += 1
                    self.swarm.ban(stream.hop.peer, e)
                if failures > self.swarm.config.max_failovers:
                    raise PeerUnavailable(f"gave up after {failures} failures in one step; last: {e}") from e
                if isinstance(e, SessionHandedOff) and e.address and not resume_failed:
                    self._resume(i, e)
                    continue
                await self._reroute(i, e)
                continue
            if stream.resuming and not stream.resumed:
                stream.resumed = True
                self.handoffs += 1
                self.handoff_seconds += time.perf_counter() - stream.opened_at
            stream.history.append(x)
            self.swarm.bans.succeeded(stream.hop.peer.peer_id)
            checks = self.swarm.spot_checks
            if checks.due():
                liar = await checks.check(stream.hop, torch.cat(stream.history, dim=1), y, job=self.job,
                                          transcript=stream.transcript)
                if liar is not None and liar.peer_id == stream.hop.peer.peer_id:
                    # The hop answered wrong: the route from it on is rebuilt without it
                    # (replaying its correct history) and this step runs again.
                    stream.history.pop()
                    await self._rebuild_from(i)
                    continue
            x, i = y, i + 1
        self.position += hidden.shape[1]
        return x

    def _resume(self, index: int, notice: SessionHandedOff) -> None:
        """Put a stream resuming the handed-off session at the named node in hop `index`'s place;
        it keeps the hop's history, so a failed resume still replays."""
        old = self.hops[index]
        peer = PeerSpan(peer_id=notice.peer_id, address=notice.address, start=old.hop.start, end=old.hop.end,
                        throughput=old.hop.peer.throughput)
        new = self._new_stream(Hop(peer=peer, start=old.hop.start, end=old.hop.end), resume_secret=old.secret,
                               history=old.history)
        asyncio.ensure_future(old.close())
        self.hops[index] = new
        logger.info("session %s: blocks %d:%d handed off from %s to %s; resuming at position %d",
                    self.session_id, old.hop.start, old.hop.end, old.hop.peer.address, notice.address, self.position)

    async def _reroute(self, index: int, error: BaseException | None) -> None:
        """Replace hop `index` (or build the whole route when there are none yet)."""
        t0 = time.perf_counter()
        if error is None:
            start, end, history = 0, self.swarm.num_blocks, None
            old = None
        else:
            old = self.hops[index]
            start, end = old.hop.start, old.hop.end
            history = torch.cat(old.history, dim=1) if old.history else None
            await old.close()
        attempts = 0
        while True:
            lacking = len(self.lacking_job)
            try:
                new = await self._build(start, end, history)
                break
            except FATAL as e:
                if len(self.lacking_job) == lacking:  # not a replica without the job: nothing else to try
                    raise
            except (PollinateError, asyncio.TimeoutError, OSError) as e:
                attempts += 1  # _build banned the peer that failed
                if attempts > self.swarm.config.max_failovers:
                    raise PeerUnavailable(f"blocks {start}:{end}: gave up after {attempts} failures; last: {e}") from e
        if old is None:
            self.hops = new
        else:
            self.hops[index:index + 1] = new
            if history is None:
                self.reroutes += 1
                return
            self.failovers += 1
            self.recovery_seconds += time.perf_counter() - t0
            logger.warning(
                "session %s: blocks %d:%d moved from %s to %s (replayed %d tokens in %.2f s)",
                self.session_id, start, end, old.hop.peer.address, " -> ".join(str(s.hop) for s in new),
                self.position, time.perf_counter() - t0,
            )

    async def _rebuild_from(self, index: int) -> None:
        """Replace hops `index`.. with a fresh route over their blocks, replaying the history
        of hop `index`'s inputs: after a lie, the later hops' caches hold what the liar said."""
        old = self.hops[index:]
        start = old[0].hop.start
        history = torch.cat(old[0].history, dim=1) if old[0].history else None
        for h in old:
            await h.close()
        self.hops[index:] = await self._build(start, self.swarm.num_blocks, history)
        self.failovers += 1

    async def close(self) -> None:
        hops, self.hops = self.hops, []
        for h in hops:
            await h.close()


__all__ = ["HopStream", "RemoteSession", "RpcTimeout"]
