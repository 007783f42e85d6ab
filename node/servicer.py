"""The Node gRPC service for serving: decode, call SpanServer, encode.

Health, Info, Forward and Inference. Domain errors raised here or in SpanServer become
status codes in the protocol's one table (the error-mapping interceptor installed by
RpcServer); a bad request fails only its own call.
"""

from __future__ import annotations

import asyncio
import logging

import grpc.aio
import torch

from pollinate import __version__
from pollinate.node.handoff import DIGEST_BYTES, HandoffConfig, HandoffState
from pollinate.node.handoff_inbox import HandoffInbox
from pollinate.node.kept_inputs import check_keep_id
from pollinate.node.span_server import SpanServer
from pollinate.node.training import JobManager
from pollinate.node.training_service import (TrainingRpcs, activation_assembler, check_reply_codec,
                                             holds_what_it_receives)
from pollinate.protocol.addresses import peer_host
from pollinate.protocol.answers import AnswerSigner, prefix_of, signed
from pollinate.protocol.auth import MAX_CHALLENGE_CHARS
from pollinate.protocol.budget import ByteBudget
from pollinate.protocol.errors import FailedPrecondition, InvalidRequest, RpcTimeout
from pollinate.protocol.identity import NodeIdentity, address_proof
from pollinate.protocol.tensors import (
    DEFAULT_FRAMING,
    HIDDEN_STATES as HIDDEN,
    EncodedTensor,
    FramingConfig,
    encode_tensor,
)
from pollinate.protocol.v1 import common_pb2, node_pb2, node_pb2_grpc

logger = logging.getLogger(__name__)



async def _encode(tensor: torch.Tensor, codec: str) -> EncodedTensor:
    return await asyncio.to_thread(encode_tensor, tensor, codec=codec, name=HIDDEN)


class NodeServicer(TrainingRpcs, node_pb2_grpc.NodeServicer):
    def __init__(self, server: SpanServer, *, throughput: float, framing: FramingConfig = DEFAULT_FRAMING,
                 identity: NodeIdentity | None = None, handoff: HandoffConfig = HandoffConfig()):
        self.server = server
        # signs the coordinator's address challenge (protocol/identity.py) and every answer
        # (protocol/answers.py)
        self.identity = identity
        self.throughput = throughput
        self.framing = framing
        self.serving = True
        self.jobs = JobManager(server)  # training jobs: adapters and inner optimizers (node/training.py)
        self.handoffs = HandoffInbox(handoff)  # sessions other replicas handed to this node
        # bytes of tensors callers are still sending, per caller's address (holds_what_it_receives)
        self.receiving = ByteBudget(total=None, per_host=server.serving.receive_peer_bytes)

    async def Health(self, request, context):
        status = common_pb2.HealthReply.SERVING if self.serving else common_pb2.HealthReply.NOT_SERVING
        if len(request.challenge) > MAX_CHALLENGE_CHARS:
            raise InvalidRequest(f"Health: challenge over {MAX_CHALLENGE_CHARS} characters")
        proof = address_proof(self.identity, request.challenge) if request.challenge and self.identity else ""
        return common_pb2.HealthReply(status=status, version=__version__, protocol="v1", proof=proof)

    async def Info(self, request, context):
        s = self.server
        return node_pb2.InfoReply(
            span=common_pb2.Span(start=s.start, end=s.end),
            model_id=s.model_id,
            hidden_size=s.hidden_size,
            dtype=str(s.compute_dtype).removeprefix("torch."),
            throughput=self.throughput,
            version=__version__,
            num_blocks=s.num_blocks,
            load=s.worker.stats.to_proto(),
        )

    async def _next(self, requests, what: str):
        """The next message of a request stream, or None at its end; waits at most step_timeout_s."""
        try:
            return await asyncio.wait_for(anext(requests), self.server.serving.step_timeout_s)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            raise RpcTimeout(
                f"{what}: no message for {self.server.serving.step_timeout_s:.0f} s, closing the stream"
            ) from None

    @holds_what_it_receives
    async def Forward(self, request_iterator, context, *, hold):
        requests = aiter(request_iterator)
        assembler = activation_assembler(self.framing, self.server.check_activation, hold)
        header, job, tensors, signer = None, None, 0, None
        while True:
            req = await self._next(requests, "Forward")
            if req is None:
                break
            if header is None:
                if not req.HasField("header"):
                    raise InvalidRequest("Forward: the first message must carry the header")
                header = req.header
                self.server.check_blocks(header.blocks.start, header.blocks.end)
                check_reply_codec(header.reply_codec, "Forward")
                if header.job:  # the job's adapter applies (created from header.spec on first sight)
                    job = self.jobs.job(header.job, header.spec if header.HasField("spec") else None)
                if header.keep_id:  # keep the input for this micro-batch's Backward (node/kept_inputs.py)
                    if job is None:
                        raise InvalidRequest("Forward: keep_id is for training and needs a job")
                    check_keep_id(header.keep_id)
                signer = AnswerSigner.maybe(self.identity, "forward", job=header.job, start=header.blocks.start,
                                            end=header.blocks.end, spec=header.spec if header.HasField("spec") else None)
            elif req.HasField("header"):
                raise InvalidRequest("Forward: header sent twice")
            if not req.HasField("tensor"):
                continue
            encoded = assembler.feed(req.tensor)
            if encoded is None:  # (its name and shape were checked at its first chunk)
                continue
            if header.keep_id and tensors:
                raise InvalidRequest(f"Forward: keep_id {header.keep_id!r} names one input, got a second tensor")
            hidden = await asyncio.to_thread(encoded.decode)
            out = await (self.jobs.forward(job, hidden) if job is not None else self.server.forward(hidden))
            if header.keep_id:  # after the forward checked it: a refused input is never kept
                self.jobs.kept.put(header.keep_id, header.job, encoded)
            reply = await _encode(out, header.reply_codec or encoded.codec)
            signature = signer.sign(tensors, [encoded, reply]) if signer is not None else None
            tensors += 1
            for msg in signed([node_pb2.ForwardReply(tensor=c) for c in reply.chunks(self.framing)], signature):
                yield msg
        assembler.close()

    @holds_what_it_receives
    async def Inference(self, request_iterator, context, *, hold):
        requests = aiter(request_iterator)
        server = self.server  # a move swaps self.server; this session stays on its span
        assembler = activation_assembler(self.framing, server.check_activation, hold)
        opened: node_pb2.InferenceOpen | None = None
        session, scope, signer = None, None, None
        step_position: int | None = None  # position carried by the chunks of the step in progress
        try:
            while True:
                what = f"session {opened.session_id if opened else '?'}"
                nxt = self._next(requests, what)
                handoff = session.handoff if session is not None else None
                req = await (handoff.next_or_moved(nxt, session.session_id) if handoff is not None else nxt)
                if req is None:
                    break
                if opened is None:
                    if not req.HasField("open"):
                        raise InvalidRequest("Inference: the first message must carry `open`")
                    opened = req.open
                    server.check_blocks(opened.blocks.start, opened.blocks.end)
                    check_reply_codec(opened.reply_codec, "Inference")
                    if opened.job:  # generation with a job's adapter; the job must exist here
                        scope = self.jobs.scope(self.jobs.existing(opened.job, what=f"session {opened.session_id}"))
                    if opened.max_length <= 0:
                        raise InvalidRequest("Inference: max_length must be > 0")
                    if opened.resume_digest and len(opened.resume_digest) != DIGEST_BYTES:
                        raise InvalidRequest(f"Inference: resume_digest must be {DIGEST_BYTES} bytes (SHA-256)")
                    prefix = None
                    if opened.resume_secret:  # a session another replica handed to this node
                        session = self.handoffs.claim(server, opened.session_id, opened.resume_secret, opened.job)
                        if session.max_length != opened.max_length:
                            server.close_session(session.session_id)
                            raise InvalidRequest(f"session {opened.session_id}: max_length {opened.max_length} "
                                                 f"differs from the handed-off session's {session.max_length}")
                        self._allow_handoff(session, opened, resumed=True)
                        # what it was prefilled with (a recompute handoff): the signed transcript
                        # starts from it, so the call can be shown to the coordinator
                        handed, session.handed_inputs = session.handed_inputs, None
                        if handed and self.identity is not None:
                            prefix = await asyncio.to_thread(prefix_of, handed)
                    signer = AnswerSigner.maybe(self.identity, "inference", job=opened.job,
                                                start=opened.blocks.start, end=opened.blocks.end, prefix=prefix)
                elif req.HasField("open"):
                    raise InvalidRequest(f"session {opened.session_id}: `open` sent twice")
                if not req.HasField("tensor"):
                    continue
                if step_position is None:
                    step_position = req.position
                elif req.position != step_position:
                    raise InvalidRequest(
                        f"session {opened.session_id}: chunks of one step carry positions "
                        f"{step_position} and {req.position}"
                    )
                encoded = assembler.feed(req.tensor)
                if encoded is None:
                    continue
                position, step_position = step_position, None
                hidden = await asyncio.to_thread(encoded.decode)
                server.check_hidden(hidden)
                if session is None:
                    session = server.open_session(
                        opened.session_id, max_length=opened.max_length, batch_size=hidden.shape[0],
                        peer=peer_host(context.peer() or ""),
                    )
                    self._allow_handoff(session, opened)
                if session.handoff is None:
                    out = await server.step(session, hidden, position, scope=scope)
                else:  # the sender snapshots the cache only between steps (node/handoff.py)
                    await session.handoff.before_step(session.session_id)
                    with session.handoff.stepping():
                        out = await server.step(session, hidden, position, scope=scope)
                reply = await _encode(out, opened.reply_codec or encoded.codec)
                signature = signer.sign(position, [encoded, reply]) if signer is not None else None
                for msg in signed([node_pb2.InferenceReply(position=position, tensor=c)
                                   for c in reply.chunks(self.framing)], signature):
                    yield msg
            assembler.close()
        finally:
            if session is not None:
                server.close_session(session.session_id)

    def _allow_handoff(self, session, opened, *, resumed: bool = False) -> None:
        if opened.resume_digest:
            session.resume_digest, session.job = bytes(opened.resume_digest), opened.job
            session.handoff = HandoffState()
            if not resumed and self.handoffs.config.recompute:  # a resumed one kept its own (or none)
                session.inputs = []

    async def HandOff(self, request_iterator, context):
        """A replica hands over a session (node/handoff_inbox.py): read at most the bytes the header
        announces, which the header's checks bound; decode, check and hold it."""
        if not self.serving:
            raise FailedPrecondition("HandOff: this node is leaving")
        requests = aiter(request_iterator)
        server = self.server
        first = await self._next(requests, "HandOff")
        if first is None or not first.HasField("header"):
            raise InvalidRequest("HandOff: the first message must carry the header")
        header = first.header
        expected = self.handoffs.check_header(server, header)
        data = bytearray(first.data)
        while len(data) <= expected:
            req = await self._next(requests, "HandOff")
            if req is None:
                break
            if req.HasField("header"):
                raise InvalidRequest("HandOff: header sent twice")
            data += req.data
        if len(data) != expected:
            raise InvalidRequest(f"HandOff of {header.session_id}: header announced {expected} bytes, "
                                 f"{'more' if len(data) > expected else len(data)} arrived")
        # the job's adapter must be here: a recompute runs the inputs through it, and the
        # client's resume names the job
        scope = self.jobs.scope(self.jobs.existing(header.job, what=f"handoff of {header.session_id}")) \
            if header.job else None
        await self.handoffs.receive(server, header, bytes(data), scope=scope,
                                     peer=peer_host(context.peer() or ""))
        return node_pb2.HandOffReply(position=header.position, hold_s=self.handoffs.config.hold_s)


def add_to_server(rpc_server, servicer: NodeServicer) -> None:
    rpc_server.add(node_pb2_grpc.add_NodeServicer_to_server, servicer)


__all__ = ["NodeServicer", "add_to_server", "grpc"]
