"""Server and channel helpers: config validation, and TLS being one setting away."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import grpc
import grpc.aio
import pytest
import torch

from pollinate.protocol.channels import DEFAULT_MAX_MESSAGE_BYTES, ChannelConfig, RpcServer, ServerConfig, open_channel
from pollinate.protocol.errors import PeerUnavailable, translate_rpc_errors
from pollinate.protocol.tensors import MiB, tensor_to_chunks
from pollinate.protocol.v1 import common_pb2, node_pb2, node_pb2_grpc

TOKEN = "tls-swarm-token"


class HealthyNode(node_pb2_grpc.NodeServicer):
    async def Health(self, request, context):
        return common_pb2.HealthReply(status=common_pb2.HealthReply.SERVING, protocol="v1")

    async def Forward(self, request_iterator, context):
        async for request in request_iterator:
            yield node_pb2.ForwardReply(tensor=request.tensor)


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_with_token_round_trip(self_signed):
    cert, key = self_signed
    server = RpcServer(ServerConfig(token=TOKEN, tls_cert_file=cert, tls_key_file=key))
    server.add(node_pb2_grpc.add_NodeServicer_to_server, HealthyNode())
    async with server:
        config = ChannelConfig(token=TOKEN, tls=True, tls_root_cert_file=cert)
        async with open_channel(f"localhost:{server.port}", config) as channel:
            stub = node_pb2_grpc.NodeStub(channel)
            assert (await stub.Health(common_pb2.HealthRequest(), timeout=5)).protocol == "v1"
            requests = iter([node_pb2.ForwardRequest(tensor=common_pb2.Tensor(name="x", data=b"abc"))])
            assert [r.tensor.data async for r in stub.Forward(requests, timeout=5)] == [b"abc"]
        # A plaintext client cannot talk to a TLS server.
        async with open_channel(f"localhost:{server.port}", ChannelConfig(token=TOKEN)) as channel:
            with pytest.raises(PeerUnavailable):
                with translate_rpc_errors():
                    await node_pb2_grpc.NodeStub(channel).Health(common_pb2.HealthRequest(), timeout=5)


async def test_full_size_chunks_pass_and_oversized_messages_do_not():
    server = RpcServer(ServerConfig())
    server.add(node_pb2_grpc.add_NodeServicer_to_server, HealthyNode())
    async with server:
        async with open_channel(server.address) as channel:
            stub = node_pb2_grpc.NodeStub(channel)
            chunks = tensor_to_chunks(torch.zeros(3 * 256 * 1024), codec="raw", lookup=lambda _: _Raw())
            assert [len(c.data) for c in chunks] == [MiB] * 3
            requests = iter([node_pb2.ForwardRequest(tensor=c) for c in chunks])
            echoed = [r.tensor async for r in stub.Forward(requests, timeout=10)]
            assert [e.data for e in echoed] == [c.data for c in chunks]
        # A client whose own limit is higher still cannot push a larger message into the server.
        async with open_channel(server.address, ChannelConfig(max_message_bytes=4 * MiB)) as channel:
            stub = node_pb2_grpc.NodeStub(channel)
            too_big = iter([node_pb2.ForwardRequest(tensor=common_pb2.Tensor(data=bytes(DEFAULT_MAX_MESSAGE_BYTES)))])
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [r async for r in stub.Forward(too_big, timeout=10)]
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


class _Raw:
    def encode(self, tensor, *, seed=0):
        return tensor.numpy().tobytes()

    def decode(self, data, *, seed=None):  # not used here
        raise NotImplementedError


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (ServerConfig, {"port": 70000}, "port"),
        (ServerConfig, {"tls_cert_file": Path("c.pem")}, "tls_key_file"),
        (ServerConfig, {"max_message_bytes": MiB}, "max_message_bytes"),
        (ServerConfig, {"keepalive_time_s": 0}, "keepalive_time_s"),
        (ServerConfig, {"grace_s": -1}, "grace_s"),
        (ChannelConfig, {"tls_root_cert_file": Path("c.pem")}, "tls=True"),
        (ChannelConfig, {"max_message_bytes": 100}, "max_message_bytes"),
        (ChannelConfig, {"keepalive_timeout_s": -1}, "keepalive_timeout_s"),
    ],
)
def test_config_validation(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_token_is_not_in_repr():
    assert TOKEN not in repr(ServerConfig(token=TOKEN))
    assert TOKEN not in repr(ChannelConfig(token=TOKEN))


async def test_add_after_start_is_refused():
    server = RpcServer(ServerConfig())
    async with server:
        with pytest.raises(RuntimeError, match="before start"):
            server.add(node_pb2_grpc.add_NodeServicer_to_server, HealthyNode())


async def test_idle_keepalive_pings_at_the_permitted_rate_keep_the_connection():
    """A client pinging an idle connection as often as the server permits is not cut off.

    gRPC servers count a ping that arrives sooner than their minimum interval as a strike
    and after two strikes close the connection with GOAWAY "too_many_pings". With the
    server's minimum at 0.5 s and the client pinging every 1 s, the connection must stay
    READY through several pings with no call in flight."""
    server = RpcServer(ServerConfig(min_client_ping_interval_s=0.5))
    server.add(node_pb2_grpc.add_NodeServicer_to_server, HealthyNode())
    async with server:
        config = ChannelConfig(keepalive_time_s=1.0, keepalive_timeout_s=1.0)
        async with open_channel(server.address, config) as channel:
            stub = node_pb2_grpc.NodeStub(channel)
            await stub.Health(common_pb2.HealthRequest(), timeout=5)
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            # Six idle pings: any state change in that window is the server hanging up.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 6.5)
