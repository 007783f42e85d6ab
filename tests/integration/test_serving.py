"""Serving with real processes on loopback: nodes host the tiny model's spans, clients generate.

Swarm (module-scoped): A [0:1] (DHT bootstrap), B1 and B2 [1:3] (replicas), C [3:4].
Clients run as their own processes (tests/integration/serving_client.py): a hivemind DHT
forks, and it must do so before any gRPC object exists in the process. fp32 on the wire,
so remote tokens must equal the local model's exactly. The SIGKILL test runs last: it
takes a replica away.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from procs import ProcGroup  # tests/integration is on sys.path (pytest rootdir-less import)

CLIENT = Path(__file__).with_name("serving_client.py")
PROMPT = [1, 5, 9, 33, 70]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, tiny_model_dir, tiny_model_files, tiny_cache_dir):
    work = tmp_path_factory.mktemp("serving")
    group = ProcGroup(work)
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir), "--torch-threads", "1"]
    try:
        a = group.start("A", ["node", "--blocks", "0:1", "--throughput", "100", *common])
        group.wait_ready([a], timeout=90)
        peers = ["--initial-peers", a.info["dht_maddrs"][0]]
        b1 = group.start("B1", ["node", "--blocks", "1:3", "--throughput", "100", *common, *peers])
        b2 = group.start("B2", ["node", "--blocks", "1:3", "--throughput", "100", *common, *peers])
        c = group.start("C", ["node", "--blocks", "3:4", "--throughput", "100", *common, *peers])
        group.wait_ready([b1, b2, c], timeout=120)
        yield {"group": group, "A": a, "B1": b1, "B2": b2, "C": c, "maddr": a.info["dht_maddrs"][0],
               "common": common, "model": str(tiny_model_dir), "cache": str(tiny_cache_dir)}
    except BaseException:
        print(group.dump_logs(), file=sys.stderr)
        raise
    finally:
        group.stop_all()


def client_cmd(swarm, prompt, *extra) -> list[str]:
    return [sys.executable, str(CLIENT), "--model", swarm["model"], "--cache-dir", swarm["cache"],
            "--initial-peers", swarm["maddr"], "--prompt-ids", ",".join(map(str, prompt)),
            "--max-new-tokens", str(NEW_TOKENS), *extra]


def start_client(swarm, prompt, *extra) -> subprocess.Popen:
    return subprocess.Popen(client_cmd(swarm, prompt, *extra), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, swarm, timeout=120) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise AssertionError(f"client failed ({proc.returncode}):\n{err[-3000:]}\n{swarm['group'].dump_logs()}")
    return json.loads(out.strip().splitlines()[-1])


def wait_paused(proc: subprocess.Popen) -> list:
    line = proc.stdout.readline()
    assert line.startswith("PAUSED "), f"client said {line!r}; stderr: {proc.stderr.read()[-3000:]}"
    return json.loads(line[len("PAUSED "):])


def local_generate(model, prompt, *, sample_seed=None) -> list[int]:
    ids = torch.tensor([prompt])
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    if sample_seed is not None:
        torch.manual_seed(sample_seed)
        kwargs.update(do_sample=True, top_k=20, temperature=1.0)
    with torch.inference_mode():
        return model.generate(ids, **kwargs)[0, len(prompt):].tolist()


def test_remote_greedy_and_sampling_equal_local(swarm, tiny_reference_model):
    greedy = finish(start_client(swarm, PROMPT, "--sample-seed", "7"), swarm)
    assert greedy["tokens"] == local_generate(tiny_reference_model, PROMPT)
    assert [h[1:] for h in greedy["route"]] == [[0, 1], [1, 3], [3, 4]]
    assert greedy["failovers"] == 0
    assert greedy["sampled_tokens"] == local_generate(tiny_reference_model, PROMPT, sample_seed=7)
    assert greedy["sampled_tokens"] != greedy["tokens"]


def test_two_concurrent_clients_stay_independent(swarm, tiny_reference_model):
    other = [1, 200, 17, 4]
    p1 = start_client(swarm, PROMPT, "--pause-after", "3")
    p2 = start_client(swarm, other, "--pause-after", "3")
    # Both sessions are open on the nodes at once, with caches at different positions.
    wait_paused(p1)
    wait_paused(p2)
    for p in (p1, p2):
        p.stdin.write("go\n")
        p.stdin.flush()
    r1, r2 = finish(p1, swarm), finish(p2, swarm)
    assert r1["tokens"] == local_generate(tiny_reference_model, PROMPT)
    assert r2["tokens"] == local_generate(tiny_reference_model, other)


def test_node_refusing_session_for_memory_is_skipped(swarm, tiny_reference_model):
    group = swarm["group"]
    # Announces a far higher throughput, so routing tries it first; 4 cache tokens refuse
    # any session of PROMPT + NEW_TOKENS.
    greedy = group.start("G", ["node", "--blocks", "1:3", "--throughput", "1000000", "--cache-tokens", "4",
                               *swarm["common"], "--initial-peers", swarm["maddr"]])
    try:
        group.wait_ready([greedy], timeout=120)
        result = finish(start_client(swarm, PROMPT), swarm)
        assert result["tokens"] == local_generate(tiny_reference_model, PROMPT)
        assert result["route"][1][0] in (swarm["B1"].info["address"], swarm["B2"].info["address"])
        # refused on the first step: a reroute with nothing to replay, not a failover
        assert (result["reroutes"], result["failovers"]) == (1, 0)
        assert "RESOURCE_EXHAUSTED" in greedy.log_path.read_text()
    finally:
        assert greedy.stop() == 0  # graceful: announces offline, exits 0
    assert "announced offline" in greedy.log_path.read_text()


async def test_bad_input_gets_clear_status_and_node_keeps_serving(swarm, tiny_model_files):
    import grpc

    from pollinate.protocol.channels import ChannelConfig, open_channel
    from pollinate.protocol.tensors import encode_tensor
    from pollinate.protocol.v1 import common_pb2, node_pb2, node_pb2_grpc

    address = swarm["C"].info["address"]
    channel = open_channel(address)
    stub = node_pb2_grpc.NodeStub(channel)

    def step(t, position, open_=None):
        chunks = list(encode_tensor(t, codec="none", name="hidden_states").chunks())
        reqs = [node_pb2.InferenceRequest(position=position, tensor=c) for c in chunks]
        if open_ is not None:
            reqs[0].open.CopyFrom(open_)
        return reqs

    async def session(*steps):
        """Run the steps on one stream; the status the node ended it with."""
        call = stub.Inference()
        try:
            for reqs in steps:
                for r in reqs:
                    await call.write(r)
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    break
            await call.done_writing()
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()
        return await call.code(), await call.details()

    op = node_pb2.InferenceOpen(session_id="bad", max_length=4, blocks=common_pb2.Span(start=3, end=4))
    try:
        code, msg = await session(step(torch.randn(1, 2, 63), 0, op))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "hidden size 63" in msg
        code, msg = await session(step(torch.randn(1, 2, 64), 0, op), step(torch.randn(1, 1, 64), 5))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "position 5 does not follow the 2 tokens" in msg
        code, msg = await session(step(torch.randn(1, 3, 64), 0, op), step(torch.randn(1, 2, 64), 3))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "exceed the declared max_length 4" in msg
        code, msg = await session(step(torch.randn(1, 1, 64), 0, None))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "first message must carry `open`" in msg
        wrong = node_pb2.InferenceOpen(session_id="w", max_length=4, blocks=common_pb2.Span(start=1, end=3))
        code, msg = await session(step(torch.randn(1, 1, 64), 0, wrong))
        assert code == grpc.StatusCode.ABORTED and "serves blocks 3:4" in msg
        # a chunk over 1 MiB: refused by the framing check with a message naming the limit
        over = (1 << 20) + 1000
        chunk = common_pb2.Tensor(dtype="float32", shape=[1, over // 256, 64], codec="none", data=b"\0" * over,
                                  total_bytes=over, num_chunks=1)
        code, msg = await session([node_pb2.InferenceRequest(open=op, tensor=chunk)])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "over max_message_bytes" in msg
        # a pseudo-gradient codec as activations: refused from the header, nothing decoded (a
        # 625-byte cocktail tensor declaring [1, 2^20, 64] cost a node 1.34 GB before, issue 18)
        from pollinate.compression.codec import get_codec

        bomb = get_codec("cocktail").encode(torch.zeros(1, 1 << 12, 64))
        chunk = common_pb2.Tensor(dtype="float32", shape=[1, 1 << 20, 64], codec="cocktail", data=bomb,
                                  total_bytes=len(bomb), num_chunks=1)
        code, msg = await session([node_pb2.InferenceRequest(open=op, tensor=chunk)])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not an activation codec" in msg, msg
        call = stub.Forward()
        await call.write(node_pb2.ForwardRequest(header=node_pb2.ForwardHeader(reply_codec="cocktail")))
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in call:
                pass
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reply_codec 'cocktail'" in e.value.details()
        # bytes that do not parse as a ForwardRequest: INVALID_ARGUMENT saying so (was UNKNOWN
        # with a traceback in the node's log)
        raw = channel.stream_stream("/pollinate.v1.Node/Forward", request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in raw(iter([b"\xff\xff\xff\xff\x0f"]), timeout=30):
                pass
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
        assert "undecodable ForwardRequest message" in e.value.details()
        # a message over the transport limit: refused by gRPC before any handler runs
        big_channel = open_channel(address, ChannelConfig(max_message_bytes=8 << 20))
        try:
            call = node_pb2_grpc.NodeStub(big_channel).Inference()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call.write(node_pb2.InferenceRequest(open=op, tensor=common_pb2.Tensor(data=b"x" * (3 << 20))))
                await call.read()
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await big_channel.close()

        # still serving, and Forward equals the same block run locally
        health = await stub.Health(common_pb2.HealthRequest(), timeout=10)
        assert health.status == common_pb2.HealthReply.SERVING
        x = torch.randn(2, 5, 64)
        call = stub.Forward()
        chunks = list(encode_tensor(x, codec="none", name="hidden_states").chunks())
        await call.write(node_pb2.ForwardRequest(header=node_pb2.ForwardHeader(), tensor=chunks[0]))
        await call.done_writing()
        from pollinate.protocol.tensors import chunks_to_tensor

        got = chunks_to_tensor([r.tensor async for r in call])
        with torch.inference_mode():
            want = tiny_model_files.load_span(3, 4)(x)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    finally:
        await channel.close()


def test_sigkill_of_replica_in_use_after_5th_token_keeps_tokens(swarm, tiny_reference_model):
    proc = start_client(swarm, PROMPT, "--pause-after", "5")
    route = wait_paused(proc)
    in_use = route[1][0]
    victim = next(swarm[n] for n in ("B1", "B2") if swarm[n].info["address"] == in_use)
    survivor = next(swarm[n] for n in ("B1", "B2") if swarm[n] is not victim)
    victim.kill()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    result = finish(proc, swarm)
    assert result["tokens"] == local_generate(tiny_reference_model, PROMPT)
    assert result["failovers"] == 1
    assert result["route"][1] == [survivor.info["address"], 1, 3]
    assert [h[0] for h in result["route"]][::2] == [swarm["A"].info["address"], swarm["C"].info["address"]]


async def test_one_peer_cannot_hold_the_whole_kv_budget(swarm):
    """Issue 18, item 5: a node with 64 cache tokens and --cache-peer-share 0.5, listening on
    IPv4 and IPv6, so this process is two peers (127.0.0.1 and ::1). The greedy peer holds two
    sessions of 16 tokens and is refused a third with RESOURCE_EXHAUSTED naming its share; the
    other peer still opens two, and its steps answer what the greedy peer's did."""
    import grpc

    from pollinate.protocol.channels import open_channel
    from pollinate.protocol.tensors import TensorAssembler, encode_tensor
    from pollinate.protocol.v1 import common_pb2, node_pb2, node_pb2_grpc

    group = swarm["group"]
    node = group.start("K", ["node", "--host", "::", "--blocks", "3:4", "--throughput", "100", "--cache-tokens", "64",
                             "--cache-peer-share", "0.5", *swarm["common"]])
    channels = []
    try:
        group.wait_ready([node], timeout=120)
        port = node.info["address"].rpartition(":")[2]
        hidden = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(0))

        async def hold(address: str, sid: str):
            """Open a 16-token session and take one step: (the open stream, its output)."""
            channel = open_channel(address)
            channels.append(channel)
            call = node_pb2_grpc.NodeStub(channel).Inference()
            chunks = list(encode_tensor(hidden, codec="none", name="hidden_states").chunks())
            first = node_pb2.InferenceRequest(position=0, tensor=chunks[0], open=node_pb2.InferenceOpen(
                session_id=sid, max_length=16, blocks=common_pb2.Span(start=3, end=4)))
            for req in [first] + [node_pb2.InferenceRequest(position=0, tensor=c) for c in chunks[1:]]:
                await call.write(req)
            assembler, out = TensorAssembler(), None
            while out is None:
                reply = await call.read()
                assert reply is not grpc.aio.EOF, await call.details()
                out = assembler.feed(reply.tensor)
            return call, out.decode()

        greedy, honest = f"127.0.0.1:{port}", f"[::1]:{port}"
        held = [await hold(greedy, f"greedy-{i}") for i in range(2)]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await hold(greedy, "greedy-2")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
        assert "already holds 32 of the 32 one peer may hold" in refused.value.details(), refused.value.details()
        served = [await hold(honest, f"honest-{i}") for i in range(2)]  # the other half of the budget
        assert all(torch.equal(out, held[0][1]) for _, out in served + held)
        for call, _ in held + served:
            await call.done_writing()
    finally:
        for channel in channels:
            await channel.close()
        node.stop()


async def test_one_peer_cannot_hold_a_node_with_half_sent_tensors(swarm):
    """Issue 18, bounded state per peer: each tensor's declared size (encoded and decoded) is
    held against the caller's share of --receive-peer-mb from its first chunk until it is whole
    or its stream ends. With 8 MiB per peer, a peer that starts four 1 MiB + 1 MiB tensors and
    sends only their first chunk gets three held and the fourth refused with RESOURCE_EXHAUSTED;
    the other peer (::1) is still answered; once the held streams end, the first peer is too."""
    import grpc

    from pollinate.protocol.channels import open_channel
    from pollinate.protocol.tensors import TensorAssembler, encode_tensor
    from pollinate.protocol.v1 import common_pb2, node_pb2, node_pb2_grpc

    group = swarm["group"]
    node = group.start("R", ["node", "--host", "::", "--blocks", "3:4", "--throughput", "100",
                             "--receive-peer-mb", "8", *swarm["common"]])
    channels = []
    try:
        group.wait_ready([node], timeout=120)
        port = node.info["address"].rpartition(":")[2]
        big = list(encode_tensor(torch.zeros(1, 4096, 64), codec="none", name="hidden_states").chunks())
        small = list(encode_tensor(torch.randn(1, 3, 64), codec="none", name="hidden_states").chunks())
        header = node_pb2.ForwardRequest(header=node_pb2.ForwardHeader(blocks=common_pb2.Span(start=3, end=4)))

        def forward(address: str):
            channel = open_channel(address)
            channels.append(channel)
            return node_pb2_grpc.NodeStub(channel).Forward()

        async def answer(call, chunks) -> torch.Tensor:
            for req in [header] + [node_pb2.ForwardRequest(tensor=c) for c in chunks]:
                await call.write(req)
            await call.done_writing()
            assembler, out = TensorAssembler(), None
            while out is None:
                reply = await call.read()
                assert reply is not grpc.aio.EOF, await call.details()
                out = assembler.feed(reply.tensor)
            return out.decode()

        greedy, honest = f"127.0.0.1:{port}", f"[::1]:{port}"
        calls = [forward(greedy) for _ in range(4)]
        for call in calls:
            await call.write(header)
            await call.write(node_pb2.ForwardRequest(tensor=big[0]))  # and not the second chunk
        reads = {asyncio.ensure_future(call.read()): call for call in calls}
        done, pending = await asyncio.wait(reads, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and len(pending) == 3, "one of the four streams is refused, three wait"
        refused = reads[done.pop()]
        assert await refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, await refused.details()
        assert "per address" in await refused.details()
        out = await answer(forward(honest), small)  # another peer's share is its own
        assert out.shape == (1, 3, 64)
        for task in pending:
            reads[task].cancel()  # the held tensors' streams end: what they held is given back
        out = await answer(forward(greedy), big)
        assert out.shape == (1, 4096, 64)
    finally:
        for channel in channels:
            await channel.close()
        node.stop()
