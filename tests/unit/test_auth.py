"""The swarm-token interceptor on a real in-process grpc.aio server, for each call kind."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

from pollinate.protocol.auth import (TOKEN_METADATA_KEY, TokenServerInterceptor, token_client_interceptors, token_key,
                                     token_metadata)
from pollinate.protocol.channels import ChannelConfig, RpcServer, ServerConfig, open_channel
from pollinate.protocol.v1 import common_pb2, node_pb2, node_pb2_grpc

TOKEN = "swarm-secret-7f3a"


class EchoNode(node_pb2_grpc.NodeServicer):
    """Just enough of a node: Health, Info, an echoing Forward, a one-message GetState."""

    def __init__(self) -> None:
        self.calls = 0

    async def Health(self, request, context):
        return common_pb2.HealthReply(status=common_pb2.HealthReply.SERVING, protocol="v1")

    async def Info(self, request, context):
        self.calls += 1
        return node_pb2.InfoReply(model_id="tiny", hidden_size=64, span=common_pb2.Span(start=0, end=2))

    async def Forward(self, request_iterator, context):
        self.calls += 1
        async for request in request_iterator:
            yield node_pb2.ForwardReply(tensor=request.tensor)

    async def GetState(self, request, context):
        self.calls += 1
        yield node_pb2.GetStateReply(round=request.round or 1)


@pytest.fixture
async def node():
    servicer = EchoNode()
    server = RpcServer(ServerConfig(token=TOKEN))
    server.add(node_pb2_grpc.add_NodeServicer_to_server, servicer)
    async with server:
        yield server, servicer


def forward_requests():
    return iter([node_pb2.ForwardRequest(header=node_pb2.ForwardHeader(job="j"), tensor=common_pb2.Tensor(name="a"))])


async def call_all_kinds(stub: node_pb2_grpc.NodeStub, metadata=None) -> None:
    reply = await stub.Info(node_pb2.InfoRequest(), metadata=metadata, timeout=5)
    assert reply.model_id == "tiny"
    replies = [r async for r in stub.Forward(forward_requests(), metadata=metadata, timeout=5)]
    assert [r.tensor.name for r in replies] == ["a"]
    states = [r async for r in stub.GetState(node_pb2.GetStateRequest(round=4), metadata=metadata, timeout=5)]
    assert [s.round for s in states] == [4]


async def test_correct_token_on_the_channel_passes_every_call_kind(node):
    server, servicer = node
    async with open_channel(server.address, ChannelConfig(token=TOKEN)) as channel:
        await call_all_kinds(node_pb2_grpc.NodeStub(channel))
    assert servicer.calls == 3


async def test_correct_token_as_call_metadata(node):
    server, _ = node
    async with open_channel(server.address) as channel:
        await call_all_kinds(node_pb2_grpc.NodeStub(channel), metadata=token_metadata(TOKEN))


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", TOKEN[:-1], "SWARM-SECRET-7F3A"])
async def test_missing_or_wrong_token_is_unauthenticated_for_every_kind(node, token):
    server, servicer = node
    config = ChannelConfig(token=token)
    async with open_channel(server.address, config) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Info(node_pb2.InfoRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert TOKEN_METADATA_KEY in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [r async for r in stub.Forward(forward_requests(), timeout=5)]
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [r async for r in stub.GetState(node_pb2.GetStateRequest(), timeout=5)]
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert servicer.calls == 0  # no handler ran


async def test_two_tokens_in_metadata_are_refused(node):
    server, servicer = node
    async with open_channel(server.address) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Info(node_pb2.InfoRequest(), metadata=token_metadata(TOKEN) + token_metadata("x"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert servicer.calls == 0


async def test_health_needs_no_token_and_server_keeps_serving(node):
    server, _ = node
    async with open_channel(server.address) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        reply = await stub.Health(common_pb2.HealthRequest(), timeout=5)
        assert reply.status == common_pb2.HealthReply.SERVING
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Info(node_pb2.InfoRequest(), timeout=5)
        # The rejection did not disturb the server: authorised calls still work.
        assert (await stub.Info(node_pb2.InfoRequest(), metadata=token_metadata(TOKEN), timeout=5)).hidden_size == 64


def test_empty_tokens_are_configuration_errors():
    with pytest.raises(ValueError):
        TokenServerInterceptor("")
    with pytest.raises(ValueError):
        token_client_interceptors("")
    with pytest.raises(ValueError, match="token"):
        ServerConfig(token="")
    with pytest.raises(ValueError, match="token"):
        ChannelConfig(token="")


async def test_token_interceptor_on_a_bidi_stream_driven_with_write_and_read(node):
    # Inference sessions drive the stream step by step (write, read, write, ...) rather than
    # from an iterator; the client interceptor must attach the token on that path too.
    server, _ = node
    async with open_channel(server.address, ChannelConfig(token=TOKEN)) as channel:
        call = node_pb2_grpc.NodeStub(channel).Forward(timeout=5)
        for name in ("a", "b"):
            await call.write(node_pb2.ForwardRequest(tensor=common_pb2.Tensor(name=name)))
            assert (await call.read()).tensor.name == name
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK


def test_read_token_prefers_the_file_then_the_fallback_and_refuses_an_empty_file(tmp_path):
    from pollinate.protocol.auth import read_token

    f = tmp_path / "token"
    f.write_text("  s3cret\n")
    assert read_token(f, "from-env") == "s3cret"
    assert read_token(None, " from-env ") == "from-env"
    assert read_token(None, "") is None and read_token(None, None) is None
    f.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token(f, "from-env")


def test_token_keys_are_per_use_and_never_the_token():
    """A key derived for one use (DHT record tags) is not the token, nor another use's key."""
    tags = token_key(TOKEN, "dht-record-v1")
    assert len(tags) == 32 and TOKEN.encode() not in tags
    assert tags == token_key(TOKEN, "dht-record-v1")
    assert tags != token_key(TOKEN, "other-use") and tags != token_key(TOKEN + "x", "dht-record-v1")
    with pytest.raises(ValueError):
        token_key("", "dht-record-v1")
