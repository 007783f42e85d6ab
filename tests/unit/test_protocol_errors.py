"""Error mapping: each error type has one status code, a servicer raising it gives the client
that code and message (and from_rpc_error gives the type back), the server keeps serving."""

from __future__ import annotations

import asyncio
import socket

import grpc
import grpc.aio
import pytest

from pollinate.protocol import errors
from pollinate.protocol.channels import RpcServer, ServerConfig, open_channel
from pollinate.protocol.errors import (
    FailedPrecondition,
    InternalError,
    InvalidRequest,
    NotFound,
    PeerUnavailable,
    PollinateError,
    ProtocolMismatch,
    ResourceExhausted,
    RpcTimeout,
    SpanMoved,
    Unauthenticated,
    from_rpc_error,
    status_code_for,
    translate_rpc_errors,
)
from pollinate.protocol.v1 import common_pb2, node_pb2, node_pb2_grpc

EXPECTED_CODES = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    SpanMoved: grpc.StatusCode.ABORTED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PeerUnavailable: grpc.StatusCode.UNAVAILABLE,
    RpcTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    ProtocolMismatch: grpc.StatusCode.UNIMPLEMENTED,
    InternalError: grpc.StatusCode.INTERNAL,
}


def test_table_maps_each_error_to_one_code():
    assert errors.STATUS_CODES == EXPECTED_CODES
    for cls, code in EXPECTED_CODES.items():
        assert status_code_for(cls("x")) == code

    class SessionGone(NotFound):
        pass

    assert status_code_for(SessionGone("s")) == grpc.StatusCode.NOT_FOUND  # subclasses inherit
    assert status_code_for(ZeroDivisionError()) == grpc.StatusCode.INTERNAL
    assert status_code_for(ValueError("plain")) == grpc.StatusCode.INTERNAL  # not a domain error


def test_compression_error_maps_to_invalid_argument(monkeypatch):
    class FakeCompressionError(ValueError):
        pass

    monkeypatch.setattr(errors, "_compression_error_type", lambda: FakeCompressionError)
    assert status_code_for(FakeCompressionError("truncated frame")) == grpc.StatusCode.INVALID_ARGUMENT
    assert errors.is_domain_error(FakeCompressionError("x"))


def test_real_compression_error_if_present():
    try:
        from pollinate.compression.codec import CompressionError
    except ImportError:
        pytest.skip("pollinate.compression.codec.CompressionError not there yet")
    assert status_code_for(CompressionError("bad frame")) == grpc.StatusCode.INVALID_ARGUMENT


class RaisingNode(node_pb2_grpc.NodeServicer):
    """Raises whatever the test puts in `raise_next` (once), from a unary and a streaming method."""

    def __init__(self) -> None:
        self.raise_next: BaseException | None = None

    def _maybe_raise(self) -> None:
        exc, self.raise_next = self.raise_next, None
        if exc is not None:
            raise exc

    async def Health(self, request, context):
        return common_pb2.HealthReply(status=common_pb2.HealthReply.SERVING)

    async def Info(self, request, context):
        self._maybe_raise()
        return node_pb2.InfoReply(model_id="ok")

    async def GetState(self, request, context):
        yield node_pb2.GetStateReply(round=1)
        self._maybe_raise()  # mid-stream, after one message went out
        yield node_pb2.GetStateReply(round=2)

    async def Backward(self, request_iterator, context):
        async for request in request_iterator:  # refused at the first message, as a bad header is
            raise InvalidRequest(f"Backward: refused {request.tensor.name!r}")
        yield node_pb2.BackwardReply()

    async def Forward(self, request_iterator, context):
        async for request in request_iterator:
            if request.tensor.name == "slow":
                await asyncio.sleep(10)
            yield node_pb2.ForwardReply(tensor=request.tensor)


@pytest.fixture
async def raising():
    servicer = RaisingNode()
    server = RpcServer(ServerConfig(grace_s=0))
    server.add(node_pb2_grpc.add_NodeServicer_to_server, servicer)
    async with server:
        async with open_channel(server.address) as channel:
            yield node_pb2_grpc.NodeStub(channel), servicer, server


@pytest.mark.parametrize("cls", list(EXPECTED_CODES))
async def test_each_error_reaches_the_client_with_its_code_and_message(raising, cls):
    stub, servicer, server = raising
    message = f"{cls.__name__} for job 'sst2' span 10:20"
    servicer.raise_next = cls(message)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Info(node_pb2.InfoRequest(), timeout=5)
    assert info.value.code() == EXPECTED_CODES[cls]
    assert info.value.details() == message
    mapped = from_rpc_error(info.value, peer=server.address)
    assert type(mapped) is cls
    assert message in str(mapped)
    # The server keeps serving after the error.
    assert (await stub.Info(node_pb2.InfoRequest(), timeout=5)).model_id == "ok"


async def test_unexpected_exception_becomes_internal_and_server_keeps_serving(raising):
    stub, servicer, _ = raising
    servicer.raise_next = ZeroDivisionError("division by zero in block 3")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Info(node_pb2.InfoRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "ZeroDivisionError: division by zero in block 3" in info.value.details()
    assert isinstance(from_rpc_error(info.value), InternalError)
    assert (await stub.Info(node_pb2.InfoRequest(), timeout=5)).model_id == "ok"


async def test_error_in_the_middle_of_a_response_stream(raising):
    stub, servicer, _ = raising
    servicer.raise_next = NotFound("round 7 of job 'sst2' is not committed")
    received = []
    with pytest.raises(NotFound, match="round 7"):
        with translate_rpc_errors():
            async for reply in stub.GetState(node_pb2.GetStateRequest(), timeout=5):
                received.append(reply.round)
    assert received == [1]
    assert [r.round async for r in stub.GetState(node_pb2.GetStateRequest(), timeout=5)] == [1, 2]


async def test_deadline_becomes_rpc_timeout(raising):
    stub, _, server = raising
    slow = iter([node_pb2.ForwardRequest(tensor=common_pb2.Tensor(name="slow"))])
    with pytest.raises(RpcTimeout, match="DEADLINE_EXCEEDED"):
        with translate_rpc_errors(peer=server.address):
            [r async for r in stub.Forward(slow, timeout=0.2)]


async def test_unknown_method_becomes_protocol_mismatch(raising):
    _, _, server = raising
    async with open_channel(server.address) as channel:
        call = channel.unary_unary("/pollinate.v1.Node/NoSuchMethod")
        with pytest.raises(ProtocolMismatch):
            with translate_rpc_errors():
                await call(b"", timeout=5)


async def test_unreachable_peer_becomes_peer_unavailable():
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with open_channel(f"127.0.0.1:{port}") as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        with pytest.raises(PeerUnavailable, match=f"UNAVAILABLE from 127.0.0.1:{port}"):
            with translate_rpc_errors(peer=f"127.0.0.1:{port}"):
                await stub.Health(common_pb2.HealthRequest(), timeout=5)


async def test_asyncio_timeout_around_a_call_becomes_rpc_timeout():
    with pytest.raises(RpcTimeout, match="timed out waiting for peer-a"):
        with translate_rpc_errors(peer="peer-a"):
            await asyncio.wait_for(asyncio.sleep(10), timeout=0.01)


def test_every_client_error_is_a_pollinate_error():
    class FakeRpcError(grpc.RpcError):
        def __init__(self, code):
            self._code = code

        def code(self):
            return self._code

        def details(self):
            return "d"

    for code in grpc.StatusCode:
        if code is grpc.StatusCode.OK:
            continue
        assert isinstance(from_rpc_error(FakeRpcError(code)), PollinateError)
    assert isinstance(from_rpc_error(FakeRpcError(grpc.StatusCode.CANCELLED)), PeerUnavailable)


async def test_server_binds_port_0_and_reports_the_address():
    server = RpcServer(ServerConfig())
    server.add(node_pb2_grpc.add_NodeServicer_to_server, RaisingNode())
    address = await server.start()
    try:
        assert server.port > 0 and address == f"127.0.0.1:{server.port}" == server.address
        # A second server on the same port must fail, not share it (SO_REUSEPORT is off).
        clash = RpcServer(ServerConfig(port=server.port))
        with pytest.raises(OSError, match="cannot listen"):
            await clash.start()
        await clash.stop()
    finally:
        await server.stop()
    await server.stop()  # twice is fine


def test_bad_input_is_one_short_line_and_a_flood_of_it_is_rate_limited():
    from pollinate.protocol.errors import MAX_DETAILS_CHARS, RateLimitedLog, _details_for, one_line

    assert one_line("node\n03:00 INFO forged line") == "node\\n03:00 INFO forged line"
    assert one_line("x" * 500, 100).endswith("... (500 chars)")
    assert len(_details_for(InvalidRequest("y" * 20000))) < MAX_DETAILS_CHARS + 40
    lines = []
    log = RateLimitedLog(period_s=3600)
    for i in range(1000):
        log(lambda msg, *args: lines.append(msg % args), "Forward", "bad %d", i)
    log(lambda msg, *args: lines.append(msg % args), "Backward", "bad %d", 0)
    assert lines == ["bad 0", "bad 0"]
    log.period_s = 0
    log(lambda msg, *args: lines.append(msg % args), "Forward", "bad %d", 1000)
    assert lines[-1] == "bad 1000 (999 more like it in the last 0 s not logged)"


def test_undecodable_requests_become_invalid_request_when_touched():
    from pollinate.protocol.errors import tolerant_deserializer
    from pollinate.protocol.v1 import node_pb2

    parse = tolerant_deserializer(node_pb2.ForwardRequest.FromString)
    assert parse(node_pb2.ForwardRequest(header=node_pb2.ForwardHeader(job="j")).SerializeToString()).header.job == "j"
    bad = parse(b"\xff\xff\xff\xff\x0f")
    with pytest.raises(InvalidRequest, match="undecodable ForwardRequest message \\(5 bytes\\)"):
        bad.HasField("header")
    assert tolerant_deserializer(None) is None


async def test_a_stream_refused_early_reaches_a_client_still_sending_with_its_status(raising):
    """The server refuses at the first message while the client still writes the rest: the
    client must see INVALID_ARGUMENT and the reason, not grpc.aio's INTERNAL "Internal error
    from Core" for its failed write (grpc/grpc#36066; map_errors drains what is still sent)."""
    stub, _, _ = raising
    chunk = node_pb2.BackwardRequest(tensor=common_pb2.Tensor(name="grad_outputs", data=b"x" * 65536))
    for _ in range(20):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _reply in stub.Backward(iter([chunk] * 64), timeout=10):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert info.value.details() == "Backward: refused 'grad_outputs'"
