"""A session resumed after a recompute handoff can be shown to the coordinator (issues 16 and
18), in process: the replica that resumes it signs a transcript that starts from the span
inputs it was prefilled with (protocol/answers.py prefix_of), the client rebuilds exactly
those from what it sent to the node that left, whatever that node computed in, and the
coordinator re-runs the prefix and the steps as one input."""

import os
from types import SimpleNamespace

import pytest
import torch
from test_handoff import span_server

from pollinate.client.routing import Hop, PeerSpan
from pollinate.client.session import HopStream
from pollinate.coordinator.evidence import _decode_steps
from pollinate.node.handoff import HandoffConfig, HandoffState, digest_of, hand_off_sessions
from pollinate.node.handoff_inbox import HandoffInbox
from pollinate.protocol.answers import prefix_of, tensor_digest
from pollinate.protocol.errors import InvalidRequest
from pollinate.protocol.tensors import HIDDEN_STATES, encode_tensor
from pollinate.protocol.v1 import node_pb2


@pytest.mark.parametrize("sender_dtype", [torch.float32, torch.bfloat16])
async def test_the_resumed_node_and_the_client_build_the_same_prefix(tiny_model_files, sender_dtype):
    """fp16 on the wire; the node that leaves computes in fp32 or bf16 (which cannot hold the
    fp16 values). Its history goes while the session runs, one more step follows while it is
    frozen (a follow-up frame): the replica's prefix is the client's, byte for byte."""
    sender = span_server(tiny_model_files.load_span(1, 3, dtype=sender_dtype))
    receiver = span_server(tiny_model_files.load_span(1, 3))
    inbox, secret = HandoffInbox(HandoffConfig()), os.urandom(32)
    x = torch.randn(1, 11, sender.hidden_size)
    history = []  # what the client sent, as its HopStream keeps it

    async def step(at: int, n: int) -> None:
        wire = encode_tensor(x[:, at:at + n], codec="fp16", name=HIDDEN_STATES)
        await sender.step(session, wire.decode(), at)  # as the servicer decodes it
        history.append(x[:, at:at + n])

    session = sender.open_session("s-1", max_length=32, batch_size=1)
    session.inputs, session.resume_digest, session.handoff = [], digest_of(secret), HandoffState()
    await step(0, 9)
    await step(9, 1)

    class Stub:  # the servicer's HandOff, and a client step during the history's
        async def HandOff(self, requests):
            reqs = list(requests)
            data = b"".join(r.data for r in reqs)
            assert inbox.check_header(receiver, reqs[0].header) == len(data)
            await inbox.receive(receiver, reqs[0].header, data)
            if reqs[0].header.from_position == 0:
                with session.handoff.stepping():
                    await step(10, 1)
            return node_pb2.HandOffReply(position=reqs[0].header.position)

    try:
        report = await hand_off_sessions(sender, [("replica:1", "peer-r")], lambda address: Stub(), HandoffConfig())
        assert report.kinds == {"recompute": 1}
        moved = inbox.claim(receiver, "s-1", secret, "")
        assert moved.position == 11 and len(moved.handed_inputs) == 2  # the history, then the follow-up
        node_prefix = prefix_of(moved.handed_inputs)  # what node/servicer.py signs from
    finally:
        sender.worker.stop()
        receiver.worker.stop()
    swarm = SimpleNamespace(config=SimpleNamespace(wire_codec="fp16"), keeps_evidence=True)
    hop = Hop(peer=PeerSpan(peer_id="p", address="replica:1", start=1, end=3, throughput=1.0), start=1, end=3)
    stream = HopStream(swarm, hop, session_id="s-1", max_length=32, resume_secret=secret, history=history)
    client_prefix = stream.transcript.prefix
    assert (client_prefix.dtype, client_prefix.shape) == ("float32", (1, 11, sender.hidden_size))
    assert tensor_digest(client_prefix) == tensor_digest(node_prefix)
    assert stream.transcript.prefix_digest == tensor_digest(node_prefix)


def test_the_coordinator_reruns_the_prefix_then_the_steps():
    prefix = prefix_of([torch.randn(1, 4, 8)])
    x = encode_tensor(torch.randn(1, 1, 8), codec="fp16", name=HIDDEN_STATES)
    y = encode_tensor(torch.randn(1, 1, 8), codec="fp16", name=HIDDEN_STATES)
    got = _decode_steps("inference", [(4, [x, y]), (5, [x, y])], prefix)
    assert torch.equal(got[HIDDEN_STATES], torch.cat([prefix.decode(), x.decode(), x.decode()], dim=1))
    assert torch.equal(got["answer"], y.decode())
    with pytest.raises(InvalidRequest, match="position 0, want 4"):  # the steps go after the prefix
        _decode_steps("inference", [(0, [x, y])], prefix)
    with pytest.raises(InvalidRequest, match="position 4, want 0"):  # no prefix: from position 0
        _decode_steps("inference", [(4, [x, y])])
    wide = prefix_of([torch.randn(1, 4, 16)])
    with pytest.raises(InvalidRequest, match="do not fit"):
        _decode_steps("inference", [(4, [x, y])], wide)
