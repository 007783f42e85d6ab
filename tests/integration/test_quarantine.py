"""Liar reports (issue 18) with a real coordinator listening on IPv4 and IPv6, so this process
is two reporters (127.0.0.1 and ::1), and a fake node (tests/integration/coordinator_fake_node.py)
as the reported member, the coordinator counting reports without evidence
(--quarantine-unverified). One reporter, however often it reports, does not quarantine a node;
a second one does: the member is removed, listed by ListQuarantined and Status, and its Join
is refused. A node that is no member cannot be reported."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import pytest
from procs import ProcGroup

FAKE_NODE = str(Path(__file__).with_name("coordinator_fake_node.py"))
TOKEN = "quarantine-token"


async def test_two_distinct_reporters_quarantine_a_node_one_does_not(tmp_path):
    from pollinate.protocol.addresses import free_port
    from pollinate.protocol.channels import ChannelConfig, open_channel
    from pollinate.protocol.identity import NodeIdentity
    from pollinate.protocol.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

    (tmp_path / "token").write_text(TOKEN + "\n")
    with ProcGroup(tmp_path) as group:
        coord = group.start("coordinator", [
            "coordinator", "--data-dir", str(tmp_path / "data"), "--port", "0", "--http-port", "-1",
            "--token-file", str(tmp_path / "token"), "--host", "::", "--announce-host", "127.0.0.1",
            "--heartbeat-period", "0.25", "--lease", "5", "--quarantine-unverified"])
        group.wait_ready([coord], timeout=90)
        port = coord.info["grpc_bound"].rpartition(":")[2]
        liar_address = f"127.0.0.1:{free_port('127.0.0.1')}"
        node = group.start("node", [], ready=True, cmd=[
            sys.executable, FAKE_NODE, "--coordinator", f"[::1]:{port}", "--token-file", str(tmp_path / "token"),
            "--address", liar_address, "--capacity", "30"])
        group.wait_ready([node], timeout=60)
        channels = {ip: open_channel(f"{ip}:{port}", ChannelConfig(token=TOKEN)) for ip in ("127.0.0.1", "[::1]")}
        try:
            stubs = {ip: coordinator_pb2_grpc.CoordinatorStub(c) for ip, c in channels.items()}

            def report(ip: str, address: str = liar_address):
                return stubs[ip].ReportLiar(coordinator_pb2.ReportLiarRequest(
                    address=address, peer_id="12D3KooWliar", blocks=common_pb2.Span(start=1, end=3),
                    distance=0.11, tolerance=0.03, checkers=["127.0.0.1:1", "127.0.0.1:2"]), timeout=10)

            first = await report("127.0.0.1")
            again = await report("127.0.0.1")  # the same reporter: still one
            assert (first.quarantined, first.reporters, first.needed) == (False, 1, 2), first
            assert (again.quarantined, again.reporters) == (False, 1), again
            listed = await stubs["127.0.0.1"].ListQuarantined(coordinator_pb2.ListQuarantinedRequest(), timeout=10)
            assert list(listed.nodes) == []
            assert listed.lists_members and list(listed.member_addresses) == [liar_address]  # clients route here
            status = await stubs["127.0.0.1"].Status(coordinator_pb2.StatusRequest(), timeout=10)
            assert [m.address for m in status.members] == [liar_address]

            second = await report("[::1]")  # a second reporter
            assert (second.quarantined, second.reporters) == (True, 2), second
            listed = await stubs["127.0.0.1"].ListQuarantined(coordinator_pb2.ListQuarantinedRequest(), timeout=10)
            assert [(n.address, n.peer_id, n.reporters) for n in listed.nodes] == [(liar_address, "12D3KooWliar", 2)]
            assert listed.lists_members and list(listed.member_addresses) == []  # ... and no longer
            assert listed.nodes[0].reason == ("blocks 1:3: distance 0.11 > tolerance 0.03 from the answers of "
                                              "127.0.0.1:1, 127.0.0.1:2 (the reporter's word; no evidence)"), listed
            assert second.verdict == "unverified", second
            status = await stubs["127.0.0.1"].Status(coordinator_pb2.StatusRequest(), timeout=10)
            assert list(status.members) == [] and [q.address for q in status.quarantined] == [liar_address]
            assert not status.quarantined[0].verified  # two reporters' word, no evidence judged
            rejoin = coordinator_pb2.JoinRequest(address=liar_address, capacity_blocks=30, throughput=10.0)
            with pytest.raises(grpc.aio.AioRpcError) as refused:  # it cannot join again, signed as it must be
                await stubs["[::1]"].Join(rejoin, timeout=10, metadata=NodeIdentity.generate().call_metadata(
                    "/pollinate.v1.Coordinator/Join", rejoin))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "quarantined" in refused.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await report("127.0.0.1", address="127.0.0.1:1")
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            for c in channels.values():
                await c.close()
