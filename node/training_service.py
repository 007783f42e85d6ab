"""The Node service's training RPCs (Backward, GetState), mixed into NodeServicer.

Decode, call the JobManager (node/training.py), encode. Backward's request stream carries
"hidden_states" (the span's forward input) and "grad_outputs", in either order, per
micro-batch; each complete pair is answered with "grad_inputs" (job "": the base span's,
nothing trained). With BackwardHeader.keep_id the stream carries one "grad_outputs" only
and the input is the one this node kept at Forward (node/kept_inputs.py); it is forgotten
once the Backward succeeded, and kept when the request was refused. With
skip_grad_inputs the reply carries no tensor. GetState with round 0 streams the job's spec (first reply), its current
adapter on this node (PEFT names) and its counters; committed
DiLoCo rounds are node/diloco.py's business.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from pollinate.compression.codec import ACTIVATION_CODECS, get_activation_codec
from pollinate.node.kept_inputs import check_keep_id
from pollinate.node.training import JobManager
from pollinate.protocol.addresses import peer_host
from pollinate.protocol.answers import AnswerSigner, signed
from pollinate.protocol.errors import FailedPrecondition, InvalidRequest, NotFound
from pollinate.protocol.tensors import (ADAPTER_FLAT, GRAD_INPUTS, GRAD_OUTPUTS, HIDDEN_STATES, TensorAssembler,
                                        encode_tensor)
from pollinate.protocol.v1 import node_pb2

logger = logging.getLogger(__name__)

HIDDEN, GRAD_OUT, GRAD_IN = HIDDEN_STATES, GRAD_OUTPUTS, GRAD_INPUTS


def check_reply_codec(codec_id: str, what: str) -> None:
    """A reply codec a client asked for must be an activation codec ("" = the request's)."""
    if codec_id and codec_id not in ACTIVATION_CODECS:
        raise InvalidRequest(f"{what}: reply_codec {codec_id[:40]!r} is not an activation codec "
                             f"(allowed: {', '.join(sorted(ACTIVATION_CODECS))})")


def activation_assembler(framing, check, hold) -> TensorAssembler:
    """A TensorAssembler for hidden states and their gradients: activation codecs only, each
    tensor's name and shape checked (`check`) and its bytes held against the caller's share
    (`hold`, a StreamHold) before they are kept."""
    return TensorAssembler(framing, lookup=get_activation_codec, check=check, hold=hold)


def holds_what_it_receives(handler):
    """A streaming handler given `hold=`: the caller's share (by address) of the node's
    `receiving` budget, for the tensor in progress; given back when the stream ends."""
    @functools.wraps(handler)
    async def wrapped(self, request_iterator, context):
        with self.receiving.stream(peer_host(context.peer() or ""), handler.__name__) as hold:
            async for reply in handler(self, request_iterator, context, hold=hold):
                yield reply
    return wrapped


class TrainingRpcs:
    """Needs self.server (SpanServer), self.jobs (JobManager), self.framing, self.identity, self._next,
    self.receiving (ByteBudget)."""

    jobs: JobManager

    @holds_what_it_receives
    async def Backward(self, request_iterator, context, *, hold):
        requests = aiter(request_iterator)
        header, job, done = None, None, 0

        def check(chunk) -> None:  # a check_only Backward's adapter: the job's, else activations
            if chunk.name == ADAPTER_FLAT and header.check_only:
                if list(chunk.shape) != [job.numel]:
                    raise InvalidRequest(f"adapter.flat: shape {list(chunk.shape)[:8]}, the job's adapter here "
                                         f"has {job.numel} values")
            else:
                self.server.check_activation(chunk, (HIDDEN, GRAD_OUT))

        assembler = activation_assembler(self.framing, check, hold)
        pair: dict[str, object] = {}
        flat = None  # check_only: the checked replica's adapter, if sent: (as sent, decoded once)
        signer = None  # a checked Backward's answer is signed (protocol/answers.py)
        while True:
            req = await self._next(requests, "Backward")
            if req is None:
                break
            if header is None:
                if not req.HasField("header"):
                    raise InvalidRequest("Backward: the first message must carry the header")
                header = req.header
                self.server.check_blocks(header.blocks.start, header.blocks.end)
                check_reply_codec(header.reply_codec, "Backward")
                if header.job:  # "": the base span's input gradient only (client-side prompt tuning)
                    job = self.jobs.job(header.job, header.spec if header.HasField("spec") else None)
                if header.keep_id:
                    if job is None:
                        raise InvalidRequest("Backward: keep_id is for training and needs a job")
                    check_keep_id(header.keep_id)
                if header.skip_grad_inputs and job is None:
                    raise InvalidRequest("Backward: skip_grad_inputs needs a job (nothing else is computed)")
                if header.check_only and (job is None or header.keep_id or header.skip_grad_inputs):
                    raise InvalidRequest("Backward: check_only needs a job and both tensors (no keep_id, "
                                         "no skip_grad_inputs)")
                if header.return_adapter and (job is None or header.check_only or header.skip_grad_inputs):
                    raise InvalidRequest("Backward: return_adapter needs a job and the input gradient "
                                         "(no check_only, no skip_grad_inputs)")
                if header.check_only or header.return_adapter:
                    signer = AnswerSigner.maybe(self.identity, "backward", job=header.job,
                                                start=header.blocks.start, end=header.blocks.end,
                                                spec=header.spec if header.HasField("spec") else None)
            elif req.HasField("header"):
                raise InvalidRequest("Backward: header sent twice")
            if not req.HasField("tensor"):
                continue
            encoded = assembler.feed(req.tensor)
            if encoded is None:
                continue
            if header.check_only and encoded.name == ADAPTER_FLAT and flat is None and not pair:
                flat = (encoded, await asyncio.to_thread(encoded.decode))
                continue
            if encoded.name not in (HIDDEN, GRAD_OUT):
                raise InvalidRequest(f"Backward: unexpected tensor {encoded.name!r}, want {HIDDEN!r} or {GRAD_OUT!r}")
            if encoded.name in pair:
                raise InvalidRequest(f"Backward: {encoded.name!r} sent twice for one micro-batch")
            if header.keep_id:
                if encoded.name == HIDDEN:
                    raise InvalidRequest(f"Backward: keep_id {header.keep_id!r} names the input; "
                                         f"send {HIDDEN!r} only without keep_id")
                if done:
                    raise InvalidRequest(f"Backward: keep_id {header.keep_id!r} names one micro-batch, "
                                         f"got a second {GRAD_OUT!r}")
                pair[HIDDEN] = self.jobs.kept.get(header.keep_id, header.job)  # InputNotKept: re-send
            pair[encoded.name] = encoded
            if len(pair) < 2:
                continue
            hidden_enc, grad_enc = pair.pop(HIDDEN), pair.pop(GRAD_OUT)
            hidden = await asyncio.to_thread(hidden_enc.decode)
            grad_out = await asyncio.to_thread(grad_enc.decode)
            adapter = None  # the adapter a checked Backward computed with, encoded
            if header.check_only:
                adapter = flat[0] if flat is not None else None
                grad_in = await self.jobs.check_backward(job, hidden, grad_out, flat[1] if flat is not None else None)
            elif header.return_adapter:  # a spot check's copy of the adapter this Backward used
                used, grad_in = await self.jobs.backward(job, hidden, grad_out, with_adapter=True)
                adapter = await asyncio.to_thread(encode_tensor, used, codec="none", name=ADAPTER_FLAT)
                for chunk in adapter.chunks(self.framing):
                    yield node_pb2.BackwardReply(tensor=chunk)
            else:
                grad_in = await self.jobs.backward(job, hidden, grad_out, input_grad=not header.skip_grad_inputs)
            done += 1
            if header.keep_id:  # used: forget it (a refused Backward above left it in place)
                self.jobs.kept.forget(header.keep_id)
            if grad_in is None:
                continue
            codec = header.reply_codec or grad_enc.codec
            reply = await asyncio.to_thread(encode_tensor, grad_in, codec=codec, name=GRAD_IN)
            signature = None
            if signer is not None and adapter is not None:
                signature = signer.sign(0, [adapter, hidden_enc, grad_enc, reply])
            for msg in signed([node_pb2.BackwardReply(tensor=c) for c in reply.chunks(self.framing)], signature):
                yield msg
        if pair:
            raise InvalidRequest(f"Backward: stream ended with only {sorted(pair)} of a micro-batch")
        if header is not None and header.keep_id and not done:
            raise InvalidRequest(f"Backward: stream ended before {GRAD_OUT!r} of keep_id {header.keep_id!r}")
        assembler.close()

    @holds_what_it_receives
    async def ExchangeShard(self, request_iterator, context, *, hold):
        """A group member's CONTRIBUTION to this node's shard; answered with the RESULT
        (node/shard_exchange.py: the owner's inbox and the traffic counts)."""
        if self.jobs.rounds is None:
            raise FailedPrecondition("ExchangeShard: this node runs no DiLoCo rounds (no coordinator)")
        exchange = self.jobs.rounds.exchange
        requests = aiter(request_iterator)
        assembler = TensorAssembler(self.framing, hold=hold)
        first, payload = None, None
        while payload is None:
            msg = await self._next(requests, "ExchangeShard")
            if msg is None:
                raise InvalidRequest("ExchangeShard: stream ended before the contribution was complete")
            if msg.kind != node_pb2.ShardMessage.CONTRIBUTION:
                raise InvalidRequest("ExchangeShard: only CONTRIBUTION messages are accepted")
            if first is None:  # before its bytes are kept: a round in progress here, a size it can have
                exchange.admit(msg.job, msg.round, msg.attempt or 1, msg.tensor.total_bytes)
                first = msg
            exchange.count(msg.job, msg.round, msg.attempt or 1, received=msg.ByteSize())
            encoded = assembler.feed(msg.tensor)
            if encoded is not None:
                payload = encoded.payload
        result = await exchange.receive(first.job, first.round, first.sender_id, first.shard_index,
                                        first.weight, payload, first.attempt or 1)
        for reply in exchange.result_messages(first, result):
            yield reply

    async def GetState(self, request, context):
        if (request.span.start, request.span.end) != (0, 0):
            self.server.check_blocks(request.span.start, request.span.end)
        if request.round != 0:  # the committed DiLoCo state (θ_global, momentum) of that round
            if self.jobs.rounds is None:
                raise NotFound(f"GetState: job {request.job!r}: this node runs no DiLoCo rounds")
            committed, shared = self.jobs.rounds.committed(request.job)
            if request.round != committed:
                raise NotFound(f"GetState: job {request.job!r}: round {request.round} asked, "
                               f"round {committed} is the last committed here")
            for name, tensor in shared.items():
                encoded = await asyncio.to_thread(encode_tensor, tensor, codec="none", name=f"diloco.{name}")
                for chunk in encoded.chunks(self.framing):
                    yield node_pb2.GetStateReply(round=committed, tensor=chunk)
            return
        spec, state = await self.jobs.state(request.job)
        spec_msg = spec.to_proto(node_pb2)  # in the first reply only
        for name, tensor in state.items():
            encoded = await asyncio.to_thread(encode_tensor, tensor, codec="none", name=name)
            for chunk in encoded.chunks(self.framing):
                yield node_pb2.GetStateReply(round=0, tensor=chunk, spec=spec_msg)
                spec_msg = None
