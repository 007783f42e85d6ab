"""Member keys (issue 18: identity) with a real coordinator and a real node (the tiny model):
a token holder with another key pair (or none: an unsigned Join is UNAUTHENTICATED) can
neither take a live node's address with a Join of its own nor leave or heartbeat in its
member's name, and a signature read off the wire opens no second call; a node that crashed
and restarts on its port with its identity file takes its place back at once, under the
same identity."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request

import pytest

from procs import ProcGroup

TOKEN = "member-keys-token"


def status_members(coord) -> list[dict]:
    with urllib.request.urlopen(f"http://{coord.info['http']}/api/v1/status", timeout=5) as r:
        return json.loads(r.read())["members"]


def members(coord) -> dict[str, str]:
    return {m["member_id"]: m["address"] for m in status_members(coord)}


def signed(identity, method: str, request):
    return identity.call_metadata(f"/pollinate.v1.Coordinator/{method}", request)


async def call(address: str, method: str, request, metadata=()):
    from pollinate.protocol.auth import token_metadata
    from pollinate.protocol.channels import ChannelConfig, open_channel
    from pollinate.protocol.errors import translate_rpc_errors
    from pollinate.protocol.v1 import coordinator_pb2_grpc

    channel = open_channel(address, ChannelConfig())
    try:
        with translate_rpc_errors(peer=address):
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            return await getattr(stub, method)(request, timeout=10, metadata=token_metadata(TOKEN) + tuple(metadata))
    finally:
        await channel.close()


def test_a_token_holder_cannot_take_a_live_nodes_membership(tmp_path, tiny_model_dir, tiny_model_files,
                                                            tiny_cache_dir):
    from pollinate.protocol.errors import FailedPrecondition, Unauthenticated
    from pollinate.protocol.identity import NodeIdentity
    from pollinate.protocol.v1 import coordinator_pb2

    (tmp_path / "token").write_text(TOKEN + "\n")
    with socket.socket() as s:  # a fixed port, so the node can come back on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node_args = ["node", "--coordinator", "", "--token-file", str(tmp_path / "token"), "--model", str(tiny_model_dir),
                 "--cache-dir", str(tiny_cache_dir), "--num-blocks", "4", "--port", str(port), "--throughput", "10",
                 "--torch-threads", "1", "--identity-file", str(tmp_path / "node.pem")]
    with ProcGroup(tmp_path) as group:
        coord = group.start("coordinator", [
            "coordinator", "--data-dir", str(tmp_path / "coord-data"), "--port", "0", "--http-port", "0",
            "--token-file", str(tmp_path / "token"), "--model", str(tiny_model_dir), "--num-blocks", "4"])
        group.wait_ready([coord], timeout=60)
        address = coord.info["grpc"]
        node_args[2] = address
        node = group.start("node-1", node_args)
        group.wait_ready([node], timeout=90)
        victim = node.info["member_id"]
        assert members(coord) == {victim: f"127.0.0.1:{port}"}
        identity = NodeIdentity.load_or_create(tmp_path / "node.pem")  # the file the node made
        assert [m["identity"] for m in status_members(coord)] == [identity.fingerprint]

        join = coordinator_pb2.JoinRequest(address=f"127.0.0.1:{port}", capacity_blocks=4, throughput=1e9,
                                           name="impostor")
        impostor = NodeIdentity.generate()
        with pytest.raises(FailedPrecondition, match="still serves there"):  # another key: the node proves it is there
            asyncio.run(call(address, "Join", join, signed(impostor, "Join", join)))
        with pytest.raises(Unauthenticated, match="Join must be signed by the node's identity key"):
            asyncio.run(call(address, "Join", join))  # no key at all: refused before anything is dialled
        leave, heartbeat = coordinator_pb2.LeaveRequest(member_id=victim), coordinator_pb2.HeartbeatRequest(
            member_id=victim)
        with pytest.raises(Unauthenticated, match="member key"):
            asyncio.run(call(address, "Leave", leave))
        with pytest.raises(Unauthenticated, match="member key"):
            asyncio.run(call(address, "Heartbeat", heartbeat, signed(impostor, "Heartbeat", heartbeat)))
        # The victim's own signatures, as read off the wire: one used once is not accepted again,
        # one made for a Heartbeat does not sign a Leave, nor one for another request.
        beat = signed(identity, "Heartbeat", heartbeat)
        asyncio.run(call(address, "Heartbeat", heartbeat, beat))
        for method, request, metadata in (
                ("Heartbeat", heartbeat, beat), ("Leave", leave, signed(identity, "Heartbeat", leave)),
                ("Leave", leave, signed(identity, "Leave", coordinator_pb2.LeaveRequest(member_id="other")))):
            with pytest.raises(Unauthenticated, match="member key"):
                asyncio.run(call(address, method, request, metadata))
        assert members(coord) == {victim: f"127.0.0.1:{port}"}  # untouched

        node.kill()  # SIGKILL: its ghost holds the address until the lease runs out
        again = group.start("node-2", node_args)
        group.wait_ready([again], timeout=90)
        assert members(coord) == {again.info["member_id"]: f"127.0.0.1:{port}"}
        assert [m["identity"] for m in status_members(coord)] == [identity.fingerprint]  # kept across the restart
