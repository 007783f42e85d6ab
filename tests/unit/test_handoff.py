"""The receiving side of a session handoff (node/handoff.py) on a tiny span, in process:
a handed-off cache continues exactly like the original; a recompute handoff (span inputs,
prefilled on arrival) continues exactly like a replay, sliding-window spans included; what
a stranger sends is checked."""

import asyncio
import os

import pytest
import torch

from pollinate.compression.kv_codec import KVCodecConfig, encode_kv
from pollinate.node.config import ServingConfig
from pollinate.node.handoff import HandoffConfig, cache_layers, digest_of, session_payload
from pollinate.node.handoff_inbox import HandoffInbox
from pollinate.node.sessions import SessionConfig
from pollinate.node.span_server import SpanServer
from pollinate.protocol.errors import (
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    ResourceExhausted,
    SessionHandedOff,
    SpanMoved,
    Unauthenticated,
    from_rpc_error,
)
from pollinate.protocol.v1 import common_pb2, node_pb2


def span_server(span, num_blocks: int = 4) -> SpanServer:
    return SpanServer(span, model_id="tiny", num_blocks=num_blocks, hidden_size=span.hidden_size,
                      serving=ServingConfig(), sessions=SessionConfig(budget_tokens=64))


@pytest.fixture
def server(tiny_model_files):
    s = span_server(tiny_model_files.load_span(1, 3))
    yield s
    s.worker.stop()


def prefill(server, tokens: int, seed: int = 0):
    """A span cache after `tokens` tokens, and the next step's input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens + 1, server.hidden_size, generator=g)
    cache = server.span.new_cache(1, 32)
    with torch.inference_mode():
        server.span(x[:, :tokens], cache=cache)
    return cache, x[:, tokens:]


def header(server, cache, secret: bytes, blob: bytes, **over):
    fields = dict(session_id="s-1", blocks=common_pb2.Span(start=1, end=3), max_length=32, batch_size=1,
                  position=cache.length, resume_digest=digest_of(secret), job="", payload_bytes=len(blob))
    fields.update(over)
    return node_pb2.HandOffHeader(**fields)


async def test_handed_off_cache_continues_exactly_and_only_its_owner_claims_it(server):
    inbox = HandoffInbox(HandoffConfig())
    cache, nxt = prefill(server, 9)
    secret = os.urandom(32)
    blob = encode_kv(cache_layers(cache))
    h = header(server, cache, secret, blob)
    assert inbox.check_header(server, h) == len(blob)
    await inbox.receive(server, h, blob)
    assert server.sessions.tokens_left == 64 - 32  # its budget is reserved
    with pytest.raises(Unauthenticated, match="resume secret does not match"):
        inbox.claim(server, "s-1", os.urandom(32), "")
    with pytest.raises(InvalidRequest, match="job"):
        inbox.claim(server, "s-1", secret, "other-job")
    session = inbox.claim(server, "s-1", secret, "")
    with pytest.raises(NotFound):  # once only
        inbox.claim(server, "s-1", secret, "")
    got = await server.step(session, nxt, 9)
    with torch.inference_mode():
        want = server.span(nxt, torch.tensor([[9]]), cache=cache)
    assert torch.equal(got, want)
    server.close_session("s-1")


async def test_a_live_session_cannot_be_taken_over_by_its_id(server):
    inbox = HandoffInbox(HandoffConfig())
    server.open_session("live", max_length=8, batch_size=1)
    with pytest.raises(NotFound, match="no handed-off session live"):
        inbox.claim(server, "live", b"x" * 32, "")
    cache, _ = prefill(server, 4)
    blob = encode_kv(cache_layers(cache))
    with pytest.raises(FailedPrecondition, match="already open"):  # nor overwritten by a handoff
        await inbox.receive(server, header(server, cache, b"s" * 32, blob, session_id="live"), blob)


async def test_unclaimed_sessions_are_freed_after_the_hold(server):
    inbox = HandoffInbox(HandoffConfig(hold_s=0.05))
    cache, _ = prefill(server, 4)
    blob = encode_kv(cache_layers(cache), KVCodecConfig(mode="lossy", bits=4))
    await inbox.receive(server, header(server, cache, b"s" * 32, blob), blob)
    assert len(server.sessions) == 1
    await asyncio.sleep(0.2)  # the hold itself is what is tested
    assert len(server.sessions) == 0 and len(inbox) == 0 and server.sessions.tokens_left == 64


async def test_bad_handoffs_are_refused_and_change_nothing(server):
    inbox = HandoffInbox(HandoffConfig())
    cache, _ = prefill(server, 6)
    blob = encode_kv(cache_layers(cache))
    secret = b"s" * 32
    bad_headers = {
        "blocks": (SpanMoved, dict(blocks=common_pb2.Span(start=0, end=3))),
        "digest": (InvalidRequest, dict(resume_digest=b"short")),
        "max_length": (InvalidRequest, dict(max_length=10_000)),
        "position": (InvalidRequest, dict(position=33)),
        "batch": (InvalidRequest, dict(batch_size=3)),
        "payload": (InvalidRequest, dict(payload_bytes=10 << 20)),
        "session_id": (InvalidRequest, dict(session_id="a\nb")),
    }
    for name, (error, over) in bad_headers.items():
        with pytest.raises(error):
            inbox.check_header(server, header(server, cache, secret, blob, **over))
    # a frame for another position or another span's layers: the shapes say so
    other, _ = prefill(server, 5)
    wrong = encode_kv(cache_layers(other))
    with pytest.raises(InvalidRequest, match="want"):
        await inbox.receive(server, header(server, cache, secret, wrong, position=6), wrong)
    one_layer = encode_kv(cache_layers(cache)[:1])
    with pytest.raises(InvalidRequest, match="1 layers"):
        await inbox.receive(server, header(server, cache, secret, one_layer), one_layer)
    with pytest.raises(InvalidRequest, match="not a handoff frame"):
        await inbox.receive(server, header(server, cache, secret, b"junk" * 10), b"junk" * 10)
    assert len(server.sessions) == 0 and len(inbox) == 0
    # the budget is reserved like a new session's: a full node refuses, from the header already
    server.open_session("big", max_length=60, batch_size=1)
    with pytest.raises(ResourceExhausted, match="needs 32 cache tokens, this node has 4 left"):
        inbox.check_header(server, header(server, cache, secret, blob))
    with pytest.raises(ResourceExhausted):
        await inbox.receive(server, header(server, cache, secret, blob), blob)


def test_the_handoff_notice_names_the_new_node_across_the_wire():
    import grpc

    class Failed(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "session handed off: to 127.0.0.1:5000 peer 12D3Koo (session s-10)"

    err = from_rpc_error(Failed(), peer="127.0.0.1:4000")
    assert isinstance(err, SessionHandedOff)
    assert (err.address, err.peer_id) == ("127.0.0.1:5000", "12D3Koo")


class IntoInbox:
    """A replica's HandOff, in process: the servicer's checks, then the inbox."""

    def __init__(self, inbox, server):
        self.inbox, self.server, self.calls = inbox, server, 0

    async def HandOff(self, requests):
        self.calls += 1
        reqs = list(requests)
        head = reqs[0].header
        data = b"".join(r.data for r in reqs)
        assert len(data) == self.inbox.check_header(self.server, head)
        await self.inbox.receive(self.server, head, data)
        return node_pb2.HandOffReply(position=head.position, hold_s=self.inbox.config.hold_s)


class Full:
    async def HandOff(self, requests):
        raise ResourceExhausted("no room")


async def test_sender_skips_a_refusing_replica_and_the_session_continues_exactly_on_the_next(
        server, tiny_model_files):
    from pollinate.node.handoff import HandoffState, hand_off_sessions

    span = tiny_model_files.load_span(1, 3)
    receiver = SpanServer(span, model_id="tiny", num_blocks=4, hidden_size=span.hidden_size,
                          serving=ServingConfig(), sessions=SessionConfig(budget_tokens=64))
    try:
        secret = os.urandom(32)
        session = server.open_session("s-2", max_length=32, batch_size=1)
        session.resume_digest, session.handoff = digest_of(secret), HandoffState()
        x = torch.randn(1, 8, server.hidden_size, generator=torch.Generator().manual_seed(3))
        await server.step(session, x[:, :7], 0)
        inbox = HandoffInbox(HandoffConfig())
        replica = IntoInbox(inbox, receiver)
        stubs = {"full:1": Full(), "ok:2": replica}
        report = await hand_off_sessions(server, [("full:1", "p1"), ("ok:2", "p2")], stubs.__getitem__,
                                         HandoffConfig(chunk_bytes=1000))  # several HandOff messages
        assert report.moved == {"s-2": "ok:2"} and report.failed == {} and replica.calls == 1
        assert session.handoff.result.result() == ("ok:2", "p2")
        with pytest.raises(SessionHandedOff, match="to ok:2 peer p2") as moved:
            await session.handoff.before_step("s-2")  # the stream's next step ends it
        assert moved.value.address == "ok:2"
        resumed = inbox.claim(receiver, "s-2", secret, "")
        got = await receiver.step(resumed, x[:, 7:], 7)
        with torch.inference_mode():
            want = server.span(x[:, 7:], torch.tensor([[7]]), cache=session.cache)
        assert torch.equal(got, want)
    finally:
        receiver.worker.stop()


async def test_with_no_replica_taking_it_the_session_stays_and_steps_on(server):
    from pollinate.node.handoff import HandoffState, hand_off_sessions

    session = server.open_session("s-3", max_length=32, batch_size=1)
    session.resume_digest, session.handoff = digest_of(b"k" * 32), HandoffState()
    x = torch.randn(1, 4, server.hidden_size)
    await server.step(session, x[:, :3], 0)
    report = await hand_off_sessions(server, [("full:1", "p1")], lambda a: Full(), HandoffConfig())
    assert "no room" in report.failed["s-3"] and report.moved == {}
    assert session.handoff.result.result() is None and not session.handoff.frozen
    await session.handoff.before_step("s-3")  # returns: the step may run here as before
    await server.step(session, x[:, 3:], 3)


def wire_inputs(server, tokens: int, seed: int = 0) -> torch.Tensor:
    """Span inputs as a node decodes them from an fp16 wire: fp32 holding fp16 values."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, server.hidden_size, generator=g).half().float()


async def recompute_continues_like_a_replay(server) -> None:
    """A session of a 9-token prefill and 3 decode steps keeps its inputs, hands off by recompute
    to a second session id, and its next step there equals a replay's bit for bit."""
    x = wire_inputs(server, 13)
    session = server.open_session("s-1", max_length=32, batch_size=1)
    session.inputs = []  # what the servicer does for a client that allows handoff
    for at, n in ((0, 9), (9, 1), (10, 1), (11, 1)):
        await server.step(session, x[:, at:at + n], at)
    assert [t.dtype for t in session.inputs] == [torch.float16] * 4  # kept at the wire's width
    frame, kind = await session_payload(server, session, HandoffConfig())
    assert kind == "recompute"
    assert len(frame) < 12 * server.hidden_size * 2 + 64  # the fp16 inputs, not the cache
    original = await server.step(session, x[:, 12:], 12)
    server.close_session("s-1")

    inbox, secret = HandoffInbox(HandoffConfig()), os.urandom(32)
    h = node_pb2.HandOffHeader(session_id="s-2", blocks=common_pb2.Span(start=server.start, end=server.end),
                               max_length=32, batch_size=1, position=12, resume_digest=digest_of(secret),
                               payload_bytes=len(frame))
    assert inbox.check_header(server, h) == len(frame)
    await inbox.receive(server, h, frame)
    moved = inbox.claim(server, "s-2", secret, "")
    assert moved.position == 12 and sum(t.shape[1] for t in moved.inputs) == 12  # it can move again
    got = await server.step(moved, x[:, 12:], 12)
    server.close_session("s-2")

    replay = server.open_session("r", max_length=32, batch_size=1)
    await server.step(replay, x[:, :12], 0)
    want = await server.step(replay, x[:, 12:], 12)
    server.close_session("r")
    assert torch.equal(got, want)
    # and what the session would have given on the node it left, to the last bits of one
    # prefill against several steps
    assert (got - original).abs().max() <= 1e-5 * original.abs().max()


async def test_recompute_handoff_continues_exactly_like_a_replay(server):
    await recompute_continues_like_a_replay(server)


async def test_recompute_handoff_of_a_sliding_window_span(tmp_path):
    """Gemma 2 alternates sliding-window (5 tokens) and global layers: its cache cannot travel,
    its inputs can."""
    from test_families import make_tiny

    from pollinate.node.model_files import open_model

    files = open_model(make_tiny("gemma2", tmp_path / "gemma2"), cache_dir=tmp_path / "cache", show_progress=False)
    span = files.load_span(1, 3)
    assert "sliding_attention" in span.layer_types
    s = span_server(span)
    try:
        await recompute_continues_like_a_replay(s)
    finally:
        s.worker.stop()


async def test_a_recompute_frame_for_another_position_is_refused(server):
    from pollinate.compression.kv_codec import encode_inputs

    frame = encode_inputs(wire_inputs(server, 5))
    h = node_pb2.HandOffHeader(session_id="s-3", blocks=common_pb2.Span(start=1, end=3), max_length=32,
                               batch_size=1, position=6, resume_digest=digest_of(b"s" * 32), payload_bytes=len(frame))
    with pytest.raises(InvalidRequest, match=r"span inputs \[1, 5, 64\], want \[1, 6, 64\]"):
        await HandoffInbox(HandoffConfig()).receive(server, h, frame)
    assert len(server.sessions) == 0


async def test_pre_copy_sends_the_history_then_only_the_steps_run_meanwhile(tiny_model_files):
    """hand_off_sessions with --handoff recompute, sender and receiver in process: the history
    goes while the session still runs (a step arrives during the replica's prefill), then the
    session is frozen and only that step's inputs follow; it resumes at its final position and
    continues like a replay."""
    from pollinate.node.handoff import HandoffState, hand_off_sessions

    sender, receiver = span_server(tiny_model_files.load_span(1, 3)), span_server(tiny_model_files.load_span(1, 3))
    inbox, secret = HandoffInbox(HandoffConfig()), os.urandom(32)
    x = wire_inputs(sender, 12)
    session = sender.open_session("s-4", max_length=32, batch_size=1)
    session.inputs, session.resume_digest, session.handoff = [], digest_of(secret), HandoffState()
    for at, n in ((0, 9), (9, 1)):
        await sender.step(session, x[:, at:at + n], at)
    headers = []

    class Stub:  # what the servicer's HandOff does, plus the client's step 10 during the first one
        async def HandOff(self, requests):
            reqs = list(requests)
            header, data = reqs[0].header, b"".join(r.data for r in reqs)
            headers.append((header.from_position, header.position))
            assert inbox.check_header(receiver, header) == len(data)
            await inbox.receive(receiver, header, data)
            if len(headers) == 1:
                with session.handoff.stepping():
                    await sender.step(session, x[:, 10:11], 10)
            return node_pb2.HandOffReply(position=header.position)

    try:
        report = await hand_off_sessions(sender, [("replica:1", "peer-r")], lambda address: Stub(), HandoffConfig())
        assert report.moved == {"s-4": "replica:1"} and report.kinds == {"recompute": 1}
        assert headers == [(0, 10), (10, 11)]  # the history, then the one step run meanwhile
        assert session.handoff.result.result() == ("replica:1", "peer-r")
        moved = inbox.claim(receiver, "s-4", secret, "")
        assert moved.position == 11
        got = await receiver.step(moved, x[:, 11:], 11)
        replay = receiver.open_session("r", max_length=32, batch_size=1)
        await receiver.step(replay, x[:, :10], 0)  # the same passes: 10 tokens, then 1, then 1
        await receiver.step(replay, x[:, 10:11], 10)
        assert torch.equal(got, await receiver.step(replay, x[:, 11:], 11))
    finally:
        sender.worker.stop()
        receiver.worker.stop()


async def test_a_follow_up_needs_the_held_session_at_its_position_and_a_bad_one_frees_it(server):
    from pollinate.compression.kv_codec import encode_inputs

    inbox, secret = HandoffInbox(HandoffConfig()), b"s" * 32
    first = encode_inputs(wire_inputs(server, 6))
    h = node_pb2.HandOffHeader(
        session_id="s-5", blocks=common_pb2.Span(start=1, end=3), max_length=32, batch_size=1, position=6,
        resume_digest=digest_of(secret), payload_bytes=len(first))
    await inbox.receive(server, h, first)
    more = encode_inputs(wire_inputs(server, 2, seed=1))

    def follow(**over):
        f = node_pb2.HandOffHeader()
        f.CopyFrom(h)
        f.from_position, f.position, f.payload_bytes = 6, 8, len(more)
        for k, v in over.items():
            setattr(f, k, v)
        return f

    with pytest.raises(NotFound, match="no such session"):  # another sender (digest) cannot append
        inbox.check_header(server, follow(resume_digest=digest_of(b"x" * 32)))
    with pytest.raises(FailedPrecondition, match="held here is at 6"):
        inbox.check_header(server, follow(from_position=5, position=7))
    with pytest.raises(InvalidRequest, match="payload bytes"):
        inbox.check_header(server, follow(payload_bytes=1 << 20))
    assert inbox.check_header(server, follow()) == len(more)
    with pytest.raises(InvalidRequest, match=r"want \[1, 3, 64\]"):  # 2 tokens sent, 3 announced
        await inbox.receive(server, follow(position=9), more)
    assert len(server.sessions) == 0 and len(inbox) == 0  # the held session is freed: its client replays


async def test_several_sessions_hand_off_together(tiny_model_files):
    """Two sessions (one recompute, one that kept no inputs and goes as a lossless cache) are
    handed off concurrently; both resume on the replica with a replay's outputs."""
    from pollinate.node.handoff import HandoffState, hand_off_sessions

    sender, receiver = span_server(tiny_model_files.load_span(1, 3)), span_server(tiny_model_files.load_span(1, 3))
    inbox = HandoffInbox(HandoffConfig())
    x = wire_inputs(sender, 8)
    secrets = {}
    for sid, keep in (("a", True), ("b", False)):
        session = sender.open_session(sid, max_length=16, batch_size=1)
        secrets[sid] = os.urandom(32)
        session.inputs = [] if keep else None
        session.resume_digest, session.handoff = digest_of(secrets[sid]), HandoffState()
        await sender.step(session, x[:, :7], 0)

    class Stub:
        async def HandOff(self, requests):
            reqs = list(requests)
            header, data = reqs[0].header, b"".join(r.data for r in reqs)
            inbox.check_header(receiver, header)
            await inbox.receive(receiver, header, data)
            return node_pb2.HandOffReply(position=header.position)

    try:
        report = await hand_off_sessions(sender, [("replica:1", "peer-r")], lambda address: Stub(), HandoffConfig())
        assert set(report.moved) == {"a", "b"} and report.kinds == {"recompute": 1, "lossless": 1}
        replay = receiver.open_session("r", max_length=16, batch_size=1)
        await receiver.step(replay, x[:, :7], 0)
        want = await receiver.step(replay, x[:, 7:], 7)
        for sid in ("a", "b"):
            moved = inbox.claim(receiver, sid, secrets[sid], "")
            assert torch.equal(await receiver.step(moved, x[:, 7:], 7), want)
    finally:
        sender.worker.stop()
        receiver.worker.stop()
