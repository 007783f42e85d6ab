"""The coordinator over real gRPC and HTTP on loopback, in one process (no DHT), with
CoordinatorClients as nodes."""

from __future__ import annotations

import asyncio
import logging
import json
import urllib.request

import grpc
import pytest

from pollinate.coordinator.client import CoordinatorClient, CoordinatorClientConfig
from pollinate.coordinator.config import (
    CoordinatorConfig,
    DhtConfig,
    MembershipConfig,
    StoreConfig,
)
from pollinate.coordinator.server import CoordinatorServer
from pollinate.protocol.channels import ChannelConfig, open_channel
from pollinate.protocol.identity import NodeIdentity
from pollinate.protocol.shared import Span
from pollinate.protocol.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

TOKEN = "test-token"


def config(data_dir, port=0, coordinator: dict | None = None, **membership) -> CoordinatorConfig:
    return CoordinatorConfig(
        membership=MembershipConfig(**{"heartbeat_period_s": 0.1, "lease_s": 0.6,
                                       "eviction_interval_s": 0.05, "restart_grace_s": 0.5,
                                       **membership}),
        store=StoreConfig(data_dir=data_dir), dht=DhtConfig(enabled=False),
        port=port, http_port=0, token=TOKEN, **(coordinator or {}),
    )


@pytest.fixture
async def server(tmp_path):
    srv = CoordinatorServer(config(tmp_path / "data"))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(0)


def client_for(srv, port: int, capacity=10, **kw) -> CoordinatorClient:
    return CoordinatorClient(CoordinatorClientConfig(
        coordinator=srv.grpc_address, token=TOKEN, address=f"127.0.0.1:{port}",
        capacity_blocks=capacity, throughput=kw.pop("throughput", 10.0),
        retry_initial_s=0.05, retry_max_s=0.2, rpc_timeout_s=2.0, **kw))


async def wait_for(predicate, timeout=5.0, what="condition"):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def signed(identity: NodeIdentity, method: str, request=None) -> tuple[tuple[str, str], ...]:
    """Metadata that signs one call of the coordinator's `method` by `identity`."""
    return identity.call_metadata(f"/pollinate.v1.Coordinator/{method}", request)


async def raw_call(srv, method: str, request, token=TOKEN, signer: NodeIdentity | None = None):
    """One call; signed by `signer` (a node's key: Join and calls in a member's name need it)."""
    channel = open_channel(srv.grpc_address, ChannelConfig(token=token))
    try:
        return await getattr(coordinator_pb2_grpc.CoordinatorStub(channel), method)(
            request, timeout=5, metadata=signed(signer, method, request) if signer is not None else None)
    finally:
        await channel.close()


async def join(srv, signer: NodeIdentity | None = None, **request):
    """A signed Join (by `signer`, or a new key)."""
    return await raw_call(srv, "Join", coordinator_pb2.JoinRequest(**request),
                          signer=signer or NodeIdentity.generate())


async def test_nodes_get_spans_that_cover_the_model(server):
    clients = [client_for(server, 7000 + i) for i in range(3)]
    try:
        assignments = [await c.start() for c in clients]
        assert sorted(a.span for a in assignments) == [Span(0, 10), Span(10, 20), Span(20, 30)]
        assert [a.epoch for a in assignments] == [1, 2, 3]
        assert assignments[0].num_blocks == 30 and assignments[0].heartbeat_period_s == 0.1
        await wait_for(lambda: all(c.heartbeats_ok >= 2 for c in clients), what="heartbeats")
        status = await raw_call(server, "Status", coordinator_pb2.StatusRequest())
        assert status.epoch == 3 and len(status.members) == 3
        assert all(b.replicas == 1 for b in status.blocks)
        assert {m.state for m in status.members} == {"online"}
    finally:
        for c in clients:
            await c.stop()
    assert server.membership.epoch == 6 and server.membership.members == {}


async def test_wrong_token_is_unauthenticated_and_records_nothing(server):
    request = coordinator_pb2.JoinRequest(address="127.0.0.1:7000", capacity_blocks=5,
                                          throughput=1.0)
    for token in ("wrong", None):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw_call(server, "Join", request, token=token, signer=NodeIdentity.generate())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert server.membership.members == {} and server.membership.epoch == 0
    assert server.store.load_members() == (0, [])
    # Health needs no token.
    reply = await raw_call(server, "Health", common_pb2.HealthRequest(), token=None)
    assert reply.status == common_pb2.HealthReply.SERVING and reply.protocol == "v1"


async def test_an_unsigned_or_badly_signed_join_is_unauthenticated_and_changes_nothing(server):
    owner = NodeIdentity.generate()
    member = await join(server, owner, address="127.0.0.1:7000", capacity_blocks=10, throughput=1.0)
    before = (server.membership.epoch, server.store.load_members())
    takeover = coordinator_pb2.JoinRequest(address="127.0.0.1:7000", capacity_blocks=10, throughput=1.0)
    newcomer = coordinator_pb2.JoinRequest(address="127.0.0.1:7001", capacity_blocks=10, throughput=1.0)
    other = NodeIdentity.generate()
    used = signed(other, "Join", newcomer)
    attempts = {
        "unsigned, for the member's address": (takeover, None),
        "unsigned, for a new address": (newcomer, None),
        "signed for another request": (newcomer, signed(other, "Join", takeover)),
        "signed as another method": (newcomer, signed(other, "Heartbeat", newcomer)),
        "a key that did not sign it": (newcomer, ((used[0][0], owner.public_key), used[1])),
    }
    for what, (request, metadata) in attempts.items():
        channel = open_channel(server.grpc_address, ChannelConfig(token=TOKEN))
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await coordinator_pb2_grpc.CoordinatorStub(channel).Join(request, timeout=5, metadata=metadata)
        finally:
            await channel.close()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, what
        assert "Join must be signed by the node's identity key" in err.value.details(), what
    assert (server.membership.epoch, server.store.load_members()) == before
    assert list(server.membership.members) == [member.member_id]
    assert server.membership.members[member.member_id].member_key == owner.public_key
    assert server.membership.counters["joins"] == 1


@pytest.mark.parametrize(
    "request_kwargs, code, message",
    [
        (dict(address="127.0.0.1:7000", capacity_blocks=0, throughput=1.0),
         grpc.StatusCode.INVALID_ARGUMENT, "capacity_blocks"),
        (dict(address="not an address", capacity_blocks=3, throughput=1.0),
         grpc.StatusCode.INVALID_ARGUMENT, "host:port"),
        (dict(address="127.0.0.1:7000", capacity_blocks=3, throughput=1.0,
              requested_span=common_pb2.Span(start=28, end=31)),
         grpc.StatusCode.INVALID_ARGUMENT, "outside the model"),
        (dict(address="127.0.0.1:7000", capacity_blocks=3, throughput=1.0,
              requested_span=common_pb2.Span(start=5, end=2)),
         grpc.StatusCode.INVALID_ARGUMENT, "empty or reversed"),
        (dict(address="127.0.0.1:7000", capacity_blocks=3, throughput=1.0, model_id="x/y"),
         grpc.StatusCode.FAILED_PRECONDITION, "serves"),
    ],
)
async def test_bad_joins_get_clear_errors(server, request_kwargs, code, message):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await join(server, **request_kwargs)
    assert err.value.code() == code and message in err.value.details()
    assert server.membership.epoch == 0


async def test_unknown_member_heartbeat_is_not_found(server):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw_call(server, "Heartbeat", coordinator_pb2.HeartbeatRequest(member_id="ghost"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def heartbeat_stream(srv, requests, token=TOKEN, signer: NodeIdentity | None = None) -> list:
    """Send `requests` on one HeartbeatStream (signed by `signer`), one at a time; the replies
    (AioRpcError raised)."""
    channel = open_channel(srv.grpc_address, ChannelConfig(token=token))
    try:
        call = coordinator_pb2_grpc.CoordinatorStub(channel).HeartbeatStream(
            timeout=5, metadata=signed(signer, "HeartbeatStream") if signer is not None else None)
        replies = []
        for request in requests:
            await call.write(request)
            replies.append(await call.read())
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        return replies
    finally:
        await channel.close()


async def test_heartbeat_stream_renews_the_lease_and_is_bound_to_one_member(server):
    key = NodeIdentity.generate()
    a, b = [await join(server, key, address=f"127.0.0.1:{7000 + i}", capacity_blocks=10, throughput=1.0)
            for i in range(2)]
    beat = coordinator_pb2.HeartbeatRequest(member_id=a.member_id, serving_span=a.span,
                                            throughput=4.0)
    before = server.membership.members[a.member_id].lease_deadline
    replies = await heartbeat_stream(server, [beat] * 3, signer=key)
    assert [r.epoch for r in replies] == [2, 2, 2] and replies[0].span == a.span
    assert replies[0].instruction.kind == coordinator_pb2.Instruction.NONE
    member = server.membership.members[a.member_id]
    assert member.lease_deadline > before and member.state == "online" and member.throughput == 4.0
    # A second member on the same stream ends it; the first member's beats were counted.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await heartbeat_stream(server, [beat, coordinator_pb2.HeartbeatRequest(member_id=b.member_id)], signer=key)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "belongs to member" in err.value.details()
    assert server.membership.counters["heartbeats"] == 4


async def test_heartbeat_stream_unknown_member_is_not_found_and_wrong_token_unauthenticated(server):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await heartbeat_stream(server, [coordinator_pb2.HeartbeatRequest(member_id="ghost")])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "join again" in err.value.details()
    key = NodeIdentity.generate()
    joined = await join(server, key, address="127.0.0.1:7000", capacity_blocks=10, throughput=1.0)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await heartbeat_stream(server, [coordinator_pb2.HeartbeatRequest(member_id=joined.member_id)],
                               token="wrong", signer=key)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert server.membership.counters["heartbeats"] == 0
    # The server keeps serving: the same member's stream with the right token works.
    assert len(await heartbeat_stream(
        server, [coordinator_pb2.HeartbeatRequest(member_id=joined.member_id)], signer=key)) == 1


async def test_join_flood_is_capped_per_source_address(tmp_path):
    srv = CoordinatorServer(config(tmp_path, max_members_per_address=2))
    await srv.start()
    try:
        for i in range(2):
            await join(srv, address=f"127.0.0.1:{7000 + i}", capacity_blocks=5, throughput=1.0)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await join(srv, address="127.0.0.1:7009", capacity_blocks=5, throughput=1.0)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(srv.membership.members) == 2
    finally:
        await srv.stop(0)


async def test_silent_member_is_evicted_and_its_last_replica_span_moves(server):
    a, b, c = (client_for(server, 7000 + i) for i in range(3))
    spare = client_for(server, 7003)  # joins 0:10 as a second replica
    for x in (a, b, c, spare):
        await x.start()
    assert spare.span == Span(0, 10)
    epoch = server.membership.epoch
    lost = c.span
    await c.stop(leave=False)  # goes silent: no leave, no heartbeats
    try:
        # Evicted within the lease (0.6 s) plus a scan; then the spare is told to move.
        await wait_for(lambda: c.member_id not in server.membership.members, timeout=2.0,
                       what="eviction")
        assert server.membership.epoch >= epoch + 2  # eviction, then the move
        await wait_for(lambda: any(x.serving_span == lost for x in (a, spare)), timeout=2.0,
                       what="the lost span to be served again")
        assert server.membership.holes() == []
    finally:
        for x in (a, b, spare):
            await x.stop()


async def test_client_rejoins_after_coordinator_loses_its_state_and_keeps_its_span(tmp_path):
    srv = CoordinatorServer(config(tmp_path / "one"))
    await srv.start()
    port = int(srv.grpc_address.rsplit(":", 1)[1])
    other = client_for(srv, 7000, capacity=5)
    await other.start()  # takes 0:5
    await other.stop(leave=False)
    node = client_for(srv, 7001, capacity=5)
    await node.start()
    first_id, span = node.member_id, node.span
    assert span == Span(5, 10)  # a fresh join on an empty swarm would get 0:5
    await srv.stop(0)
    # A brand-new coordinator (empty data dir) on the same port knows nobody.
    srv2 = CoordinatorServer(config(tmp_path / "two", port=port))
    await srv2.start()
    try:
        await wait_for(lambda: node.rejoins >= 1, timeout=5.0, what="re-join")
        assert node.member_id != first_id and node.connected
        assert node.span == span  # offered its current span and kept it
        assert list(srv2.membership.members) == [node.member_id]
    finally:
        await node.stop()
        await srv2.stop(0)


async def test_restart_on_same_data_dir_keeps_members_and_epoch(tmp_path):
    srv = CoordinatorServer(config(tmp_path))
    await srv.start()
    port = int(srv.grpc_address.rsplit(":", 1)[1])
    nodes = [client_for(srv, 7000 + i) for i in range(3)]
    for n in nodes:
        await n.start()
    ids, epoch = {n.member_id for n in nodes}, srv.membership.epoch
    await srv.stop(0)
    await asyncio.sleep(0.3)  # the nodes' heartbeats fail meanwhile: they keep trying
    assert not all(n.connected for n in nodes)
    srv2 = CoordinatorServer(config(tmp_path, port=port))
    await srv2.start()
    try:
        assert set(srv2.membership.members) == ids and srv2.membership.epoch == epoch
        await wait_for(lambda: all(n.connected and n.heartbeats_ok > 3 for n in nodes),
                       timeout=5.0, what="heartbeats to resume")
        beats = [n.heartbeats_ok for n in nodes]
        await asyncio.sleep(1.0)  # longer than lease + grace: nobody is evicted
        assert [n.heartbeats_ok for n in nodes] > beats
        assert set(srv2.membership.members) == ids and srv2.membership.epoch == epoch
        assert all(n.rejoins == 0 for n in nodes)
    finally:
        for n in nodes:
            await n.stop()
        await srv2.stop(0)


async def test_http_status_json_html_and_metrics(server):
    node = client_for(server, 7000, capacity=12)
    await node.start()
    try:
        base = f"http://{server.http_address}"

        def get(path):
            with urllib.request.urlopen(base + path, timeout=5) as r:
                return r.status, r.headers["Content-Type"], r.read().decode()

        status, ctype, body = await asyncio.to_thread(get, "/api/v1/status")
        data = json.loads(body)
        assert ctype == "application/json" and data["epoch"] == 1
        assert data["holes"] == list(range(12, 30))
        assert data["members"][0]["span"] == [0, 12]
        _, ctype, page = await asyncio.to_thread(get, "/")
        assert ctype.startswith("text/html") and page.count('<rect class="unserved"') >= 18  # 12:30 have nobody
        assert '<rect class="unserved" data-block="29"' in page and "–29" in page
        _, _, metrics = await asyncio.to_thread(get, "/metrics")
        assert "pollinate_coordinator_epoch 1\n" in metrics
        assert "pollinate_coordinator_holes 18\n" in metrics
        assert 'pollinate_coordinator_block_replicas{block="0"} 1\n' in metrics
        with pytest.raises(urllib.error.HTTPError) as err:
            await asyncio.to_thread(get, "/nope")
        assert err.value.code == 404
    finally:
        await node.stop()


async def test_client_falls_back_to_unary_heartbeats_on_a_coordinator_without_the_stream(tmp_path):
    from pollinate.coordinator.service import CoordinatorServicer

    class OlderServicer(CoordinatorServicer):  # what a coordinator before HeartbeatStream serves
        HeartbeatStream = coordinator_pb2_grpc.CoordinatorServicer.HeartbeatStream

    srv = CoordinatorServer(config(tmp_path))
    import pollinate.coordinator.service as service_module

    original = service_module.CoordinatorServicer
    service_module.CoordinatorServicer = OlderServicer
    try:
        await srv.start()
    finally:
        service_module.CoordinatorServicer = original
    node = client_for(srv, 7000)
    try:
        await node.start()
        await wait_for(lambda: node.heartbeats_ok >= 3, what="unary heartbeats")
        assert node._unary and srv.membership.counters["heartbeats"] >= 3
    finally:
        await node.stop()
        await srv.stop(0)


async def test_a_committed_state_over_one_message_travels_in_pieces(server):
    """LoRA rank 8 on 15 SmolLM2 blocks commits a 1.8 MB state: over the coordinator's 1.1 MB
    per message (as nodes'), so it travels in pieces (protocol/pieces.py) and comes back
    byte for byte; in one message it is refused by gRPC before a handler sees it, also on a
    channel that would send it. (Round 1: the coordinator has nothing to rebuild from, so
    BeginRound asks for the whole state.)"""
    import torch

    from pollinate.compression.outer import state_checksum, state_to_bytes
    from pollinate.protocol.channels import COORDINATOR_MAX_MESSAGE_BYTES, DEFAULT_MAX_MESSAGE_BYTES
    from pollinate.protocol.errors import FailedPrecondition, ResourceExhausted, translate_rpc_errors
    from pollinate.protocol.pieces import get_committed_state, to_pieces

    node = client_for(server, 7100)
    try:
        assigned = await node.start()
        span = common_pb2.Span(start=assigned.span.start, end=assigned.span.end)
        theta = torch.randn(DEFAULT_MAX_MESSAGE_BYTES // 4, generator=torch.Generator().manual_seed(0))
        momentum = torch.zeros_like(theta)
        state, checksum = state_to_bytes(theta, momentum), state_checksum(theta, momentum)  # ~2.2 MB
        commit = coordinator_pb2.CommitRoundRequest(job="big", span=span, round=1, member_id=node.member_id,
                                                    checksum=checksum, state=state)
        def mine(method: str, request):  # calls in the member's name are signed by its key, each once
            return node.config.identity.call_metadata(f"/pollinate.v1.Coordinator/{method}", request)

        big = open_channel(server.grpc_address, ChannelConfig(token=TOKEN,
                                                              max_message_bytes=COORDINATOR_MAX_MESSAGE_BYTES))
        try:
            stub = coordinator_pb2_grpc.CoordinatorStub(big)
            with pytest.raises(ResourceExhausted), translate_rpc_errors():
                await stub.CommitRound(commit, timeout=5, metadata=mine("CommitRound", commit))
            begin = coordinator_pb2.BeginRoundRequest(job="big", span=span, round=1, member_id=node.member_id,
                                                      tokens=1)
            formed = await stub.BeginRound(begin, timeout=10, metadata=mine("BeginRound", begin))
            assert [m.member_id for m in formed.members] == [node.member_id] and formed.send_state
            pieces = list(to_pieces(commit))
            assert len(pieces) == 3 and all(p.ByteSize() < DEFAULT_MAX_MESSAGE_BYTES for p in pieces)
            done = await stub.CommitRoundInPieces(iter(pieces), timeout=10, metadata=mine("CommitRound", commit))
            assert done.committed and done.committed_round == 1, done.reason
            assert server._servicer.pieces.held == 0  # released once answered
            asked = coordinator_pb2.GetCommittedStateRequest(job="big", span=span)
            with pytest.raises(FailedPrecondition, match="GetCommittedStateInPieces"), translate_rpc_errors():
                await stub.GetCommittedState(asked, timeout=10)  # whole, it would cost a state per caller
            got = await get_committed_state(stub, asked, timeout_s=10)
            assert (got.round, got.checksum, got.state == state) == (1, checksum, True)
        finally:
            await big.close()
    finally:
        await node.stop()


async def test_requests_in_pieces_are_bounded_before_they_are_read(server):
    """What a caller declares over one piece is held against the coordinator's budget for large
    requests before it sends it: past the budget RESOURCE_EXHAUSTED at once (a one-piece request
    still passes), a size over the method's limit or pieces that do not add up INVALID_ARGUMENT;
    a stream that gives up frees what it held."""
    from pollinate.coordinator.service import COMMIT_MAX_BYTES
    from pollinate.protocol.errors import InvalidRequest, ResourceExhausted, translate_rpc_errors
    from pollinate.protocol.pieces import PIECE_BYTES

    budget = server._servicer.pieces
    channel = open_channel(server.grpc_address, ChannelConfig(token=TOKEN))
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    piece = coordinator_pb2.Piece
    try:
        for pieces, why in (([piece(total_bytes=COMMIT_MAX_BYTES + 1, data=b"x")], "declares"),
                            ([piece(total_bytes=10, data=b"x")], "end after 1 of the 10"),
                            ([piece(total_bytes=2, data=b"xy"), piece(data=b"z")], "more than"),
                            ([piece(total_bytes=3, data=b"\xff\xff\xff")], "not a CommitRoundRequest")):
            with pytest.raises(InvalidRequest, match=why), translate_rpc_errors():
                await stub.CommitRoundInPieces(iter(pieces), timeout=10)
        # callers that declare the largest commit and then hold it: two fit the budget, not a third
        held = []
        for _ in range(2):
            queue: asyncio.Queue = asyncio.Queue()
            await queue.put(piece(total_bytes=COMMIT_MAX_BYTES, data=b"x"))

            async def pieces(queue=queue):
                while (p := await queue.get()) is not None:
                    yield p
            held.append((stub.CommitRoundInPieces(pieces(), timeout=30), queue))
        await wait_for(lambda: budget.held == 4 * COMMIT_MAX_BYTES, what="two large requests held")
        with pytest.raises(ResourceExhausted, match="try again later"), translate_rpc_errors():
            await stub.ReportLiarInPieces(iter([piece(total_bytes=PIECE_BYTES + 1, data=b"x")]), timeout=10)
        # one piece costs what a unary message does, and holds nothing: it still gets through
        with pytest.raises(InvalidRequest, match="end after 1 of the 1000"), translate_rpc_errors():
            await stub.ReportLiarInPieces(iter([piece(total_bytes=1000, data=b"x")]), timeout=10)
        for call, queue in held:
            await queue.put(None)  # the stream ends early: INVALID_ARGUMENT, and what it held is freed
            with pytest.raises(InvalidRequest), translate_rpc_errors():
                await call
        assert budget.held == 0
    finally:
        await channel.close()


async def test_a_member_stored_without_a_key_loads_and_must_join_again_signed(tmp_path):
    """A row an older coordinator stored for an unsigned Join: it loads, every call in its
    name is refused until its node joins again, signed."""
    from pollinate.coordinator.membership import JoinParams

    srv = CoordinatorServer(config(tmp_path))
    await srv.start()
    port = int(srv.grpc_address.rsplit(":", 1)[1])
    legacy = srv.membership.join(JoinParams(address="127.0.0.1:7000", model_id="", capacity=10, throughput=1.0))
    await srv.stop(0)
    srv = CoordinatorServer(config(tmp_path, port=port))
    await srv.start()
    key = NodeIdentity.generate()
    try:
        assert srv.membership.members[legacy.member_id].member_key == ""  # loaded, keyless
        beat = coordinator_pb2.HeartbeatRequest(member_id=legacy.member_id)
        for signer in (key, None):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await raw_call(srv, "Heartbeat", beat, signer=signer)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "join again" in err.value.details()
        rejoined = await join(srv, key, address="127.0.0.1:7000", capacity_blocks=10, throughput=1.0)
        assert list(srv.membership.members) == [rejoined.member_id]
        assert srv.membership.members[rejoined.member_id].member_key == key.public_key
        assert (await raw_call(srv, "Heartbeat", coordinator_pb2.HeartbeatRequest(member_id=rejoined.member_id),
                               signer=key)).epoch == srv.membership.epoch
    finally:
        await srv.stop(0)


async def test_data_tls_certificates_go_to_current_members_at_their_address_only(tmp_path):
    """--data-tls: a member gets a certificate for its address, valid for the configured
    lifetime; not for another address, not in another key's name, not once it left or was
    quarantined."""
    from cryptography import x509

    from pollinate.coordinator.config import QuarantineConfig
    from pollinate.protocol.data_tls import tls_name

    srv = CoordinatorServer(config(tmp_path, coordinator=dict(
        data_tls=True, data_tls_cert_validity_s=60.0, quarantine=QuarantineConfig(reporters=1, unverified=True))))
    await srv.start()
    nodes = [client_for(srv, 7000 + i) for i in range(2)]
    try:
        for node in nodes:
            await node.start()
        chain, valid_s = await nodes[0].data_tls_certificate()
        cert = x509.load_pem_x509_certificate(chain.encode())
        assert valid_s == 60.0
        assert (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() == 60 + 300  # + clock skew
        assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName) == [tls_name("127.0.0.1:7000")]

        def ask(node, identity=None, **request):
            request = coordinator_pb2.DataTlsCertificateRequest(member_id=node.member_id, **request)
            return raw_call(srv, "IssueDataTlsCertificate", request, signer=identity or node.config.identity)

        refusals = {}
        for what, call in {"another address": ask(nodes[0], address="127.0.0.1:7001"),
                           "another key": ask(nodes[0], identity=nodes[1].config.identity)}.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            refusals[what] = err.value.code()
        assert refusals == {"another address": grpc.StatusCode.FAILED_PRECONDITION,
                            "another key": grpc.StatusCode.UNAUTHENTICATED}
        assert (await ask(nodes[0], address="127.0.0.1:7000")).valid_s == 60.0  # its own: yes

        left = nodes[0].member_id
        await nodes[0].stop()  # leaves
        reported = await raw_call(srv, "ReportLiar", coordinator_pb2.ReportLiarRequest(
            address="127.0.0.1:7001", peer_id="12D3KooWliar", blocks=common_pb2.Span(start=0, end=10),
            distance=0.5, tolerance=0.03))
        assert reported.quarantined
        for node, member_id in ((nodes[0], left), (nodes[1], nodes[1].member_id)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await raw_call(srv, "IssueDataTlsCertificate",
                               coordinator_pb2.DataTlsCertificateRequest(member_id=member_id),
                               signer=node.config.identity)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "join (again) first" in err.value.details()
    finally:
        for node in nodes:
            await node.stop()
        await srv.stop(0)


async def test_a_quarantined_members_key_cannot_join_at_another_address(tmp_path, caplog):
    """Quarantine binds the key as well as the address (Joins are signed): the liar's key
    joining at a new port is refused, and so is its old address with a new key; a new key at
    a new address is a new node (what Sybils can always do: docs/security.md)."""
    from pollinate.coordinator.config import QuarantineConfig

    srv = CoordinatorServer(config(tmp_path, coordinator=dict(quarantine=QuarantineConfig(reporters=1, unverified=True))))
    await srv.start()
    liar = client_for(srv, 7001)
    try:
        await liar.start()
        reported = await raw_call(srv, "ReportLiar", coordinator_pb2.ReportLiarRequest(
            address="127.0.0.1:7001", peer_id="12D3KooWliar", blocks=common_pb2.Span(start=0, end=10),
            distance=0.5, tolerance=0.03))
        assert reported.quarantined
        refused = {}
        for what, address, signer in (("its key, a new port", "127.0.0.1:7002", liar.config.identity),
                                      ("its address, a new key", "127.0.0.1:7001", None)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await join(srv, signer, address=address, model_id=srv.config.membership.model_id, capacity_blocks=10,
                           throughput=10.0)
            refused[what] = (err.value.code(), err.value.details())
        assert refused["its key, a new port"][0] == grpc.StatusCode.FAILED_PRECONDITION
        assert "key" in refused["its key, a new port"][1] and "quarantined" in refused["its key, a new port"][1]
        assert refused["its address, a new key"][0] == grpc.StatusCode.FAILED_PRECONDITION
        fresh = await join(srv, address="127.0.0.1:7003", model_id=srv.config.membership.model_id, capacity_blocks=10,
                           throughput=10.0)
        assert fresh.member_id
        listed = await raw_call(srv, "ListQuarantined", coordinator_pb2.ListQuarantinedRequest())
        assert [n.address for n in listed.nodes] == ["127.0.0.1:7001"]
        # the quarantined node's own client (heartbeats refused, re-joins refused) backs off and
        # says so once, instead of a Join and an error line every beat (0.1 s) for a day
        await wait_for(lambda: liar._refused is not None, timeout=5.0, what="a refused re-join")
        caplog.clear()
        with caplog.at_level(logging.INFO):
            await asyncio.sleep(2.5)  # 25 beats: the window whose Joins and log lines are counted
        joins = [r for r in caplog.records if "Join answered FAILED_PRECONDITION" in r.getMessage()]
        assert len(joins) <= 3, [r.getMessage() for r in joins]  # tries after 1 s and 2 s (then 4 s)
        assert not [r for r in caplog.records if "re-join refused" in r.getMessage()]  # logged before, once
    finally:
        await liar.stop()
        await srv.stop(0)


async def test_liar_reports_without_the_nodes_signature_are_refused_and_change_nothing(tmp_path):
    """Default settings: a report with no evidence (anyone with the token can make one) is
    refused, and so is evidence the member did not sign (here: another key's signature of
    a well-formed Forward); nothing is recorded, the member stays."""
    import torch

    from pollinate.protocol.answers import AnswerSigner, Transcript
    from pollinate.protocol.identity import NodeIdentity
    from pollinate.protocol.tensors import HIDDEN_STATES, encode_tensor

    srv = CoordinatorServer(config(tmp_path))
    await srv.start()
    node = client_for(srv, 7001)
    try:
        await node.start()
        x = encode_tensor(torch.randn(1, 3, 8), codec="fp16", name=HIDDEN_STATES)
        signer = AnswerSigner(NodeIdentity.generate(), "forward", job="", start=0, end=10)
        forged = Transcript("forward", job="", start=0, end=10)
        forged.record(0, [x, x], signer.sign(0, [x, x]))
        codes = []
        for evidence in (None, forged.evidence()):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await raw_call(srv, "ReportLiar", coordinator_pb2.ReportLiarRequest(
                    address="127.0.0.1:7001", peer_id="12D3KooWhonest", blocks=common_pb2.Span(start=0, end=10),
                    distance=0.5, tolerance=0.03, evidence=evidence))
            codes.append((err.value.code(), err.value.details()))
        assert codes[0][0] == grpc.StatusCode.FAILED_PRECONDITION and "signed answer" in codes[0][1], codes
        assert codes[1][0] == grpc.StatusCode.INVALID_ARGUMENT and "not signed by the key" in codes[1][1], codes
        listed = await raw_call(srv, "ListQuarantined", coordinator_pb2.ListQuarantinedRequest())
        assert list(listed.nodes) == [] and list(listed.member_addresses) == ["127.0.0.1:7001"]
        assert srv.store.liar_reports(0.0) == []
    finally:
        await node.stop()
        await srv.stop(0)


async def test_heartbeats_report_training_steps_and_too_many_jobs_are_refused(server):
    """Issue 18, item 4: a beat's trained_steps make its member a voter of the job's rounds on
    its span while nobody has standing; a beat naming more jobs than MAX_TRAINED_JOBS is
    INVALID_ARGUMENT and renews nothing."""
    from pollinate.coordinator.rounds import MAX_TRAINED_JOBS

    key = NodeIdentity.generate()
    a = await join(server, key, address="127.0.0.1:7000", capacity_blocks=10, throughput=1.0)
    job_key = ("j", a.span.start, a.span.end)
    assert server._servicer.rounds.voters(job_key) == set()
    await raw_call(server, "Heartbeat", coordinator_pb2.HeartbeatRequest(member_id=a.member_id,
                                                                         trained_steps={"j": 2}), signer=key)
    assert server._servicer.rounds.voters(job_key) == {a.member_id}
    before = server.membership.members[a.member_id].lease_deadline
    too_many = coordinator_pb2.HeartbeatRequest(member_id=a.member_id,
                                                trained_steps={f"j{i}": 1 for i in range(MAX_TRAINED_JOBS + 1)})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw_call(server, "Heartbeat", too_many, signer=key)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most" in err.value.details()
    assert server.membership.members[a.member_id].lease_deadline == before
    assert server._servicer.rounds.voters(job_key) == {a.member_id}  # the last good beat's report stands
