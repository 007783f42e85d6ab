"""What large and half-sent requests cost a coordinator and a node (issue 18: bounded state
per peer), as peak RSS growth of the server process while a client on loopback sends them.

Cases (one JSON object per line: case, concurrent, codes, peak_rss_growth_mb):
- coordinator_unary_60mib: CommitRounds of 60 MiB in one message, 4 at once (refused by gRPC
  before they are read: the coordinator takes 1 MiB + 64 KiB per message);
- coordinator_pieces_60mib: the same in pieces (protocol/pieces.py), 8 at once (the budget
  for large requests holds some, refuses the rest);
- node_hidden_256mib: Forward streams of a 256 MiB hidden-states tensor, 4 at once (refused at
  the first chunk for its shape);
- node_half_sent: 200 Forward streams, each sending the first 1 MiB of a request at the
  node's token limit and then waiting (the peer's --receive-peer-mb holds a few).

    python benchmarks/bench_receive.py [--streams 200]

The numbers before these bounds (session 15's measurements on the same machine) are in
benchmarks/results/2026-12-07-bounded-receive.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz import TOKEN, Call, Rpc, RssPeak, methods_of, start_swarm  # noqa: E402
from procs import ProcGroup  # noqa: E402

from pollinate.protocol.auth import TOKEN_METADATA_KEY  # noqa: E402
from pollinate.protocol.pieces import to_pieces  # noqa: E402
from pollinate.protocol.v1 import common_pb2, coordinator_pb2, node_pb2, node_pb2_grpc  # noqa: E402


def concurrently(rpc: Rpc, call: Call, n: int, pid: int) -> tuple[list[str], float]:
    with RssPeak(pid) as rss, ThreadPoolExecutor(n) as pool:
        codes = list(pool.map(lambda _: rpc.call(call)[0], range(n)))
    return codes, rss.growth_mb


def coordinator_cases(coord) -> list[dict]:
    rpc = Rpc(coord.info["grpc"], methods_of(coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"]), 120)
    commit = coordinator_pb2.CommitRoundRequest(job="j", member_id="m", checksum="0" * 64, state=bytes(60 << 20))
    out = []
    for case, call, n in (
            ("coordinator_unary_60mib", Call("/pollinate.v1.Coordinator/CommitRound", [commit.SerializeToString()]), 4),
            ("coordinator_pieces_60mib", Call("/pollinate.v1.Coordinator/CommitRoundInPieces",
                                              [p.SerializeToString() for p in to_pieces(commit)]), 8)):
        codes, growth = concurrently(rpc, call, n, coord.pid)
        out.append({"case": case, "concurrent": n, "codes": codes, "peak_rss_growth_mb": round(growth, 1)})
    rpc.close()
    return out


def node_hidden(node, hidden_size: int) -> dict:
    rpc = Rpc(node.info["address"], methods_of(node_pb2.DESCRIPTOR.services_by_name["Node"]), 120)
    n = 256
    seq = (n << 20) // (2 * hidden_size)
    payloads = [node_pb2.ForwardRequest(header=node_pb2.ForwardHeader()).SerializeToString()] + [
        node_pb2.ForwardRequest(tensor=common_pb2.Tensor(
            dtype="float16", shape=[1, seq, hidden_size], codec="none", name="hidden_states", data=bytes(1 << 20),
            total_bytes=n << 20, chunk_index=i, num_chunks=n)).SerializeToString() for i in range(n)]
    codes, growth = concurrently(rpc, Call("/pollinate.v1.Node/Forward", payloads), 4, node.pid)
    rpc.close()
    return {"case": "node_hidden_256mib", "concurrent": 4, "codes": codes, "peak_rss_growth_mb": round(growth, 1)}


async def node_half_sent(node, hidden_size: int, streams: int) -> dict:
    import grpc

    channel = grpc.aio.insecure_channel(node.info["address"])
    stub = node_pb2_grpc.NodeStub(channel)
    total = 8192 * hidden_size * 4  # a request at the node's default token limit, fp32
    chunk0 = common_pb2.Tensor(dtype="float32", shape=[1, 8192, hidden_size], codec="none", name="hidden_states",
                               data=bytes(1 << 20), total_bytes=total, chunk_index=0, num_chunks=-(-total // (1 << 20)))
    release = asyncio.Event()

    async def requests():
        yield node_pb2.ForwardRequest(header=node_pb2.ForwardHeader())
        yield node_pb2.ForwardRequest(tensor=chunk0)
        await release.wait()  # and never the rest

    calls = [stub.Forward(requests(), metadata=((TOKEN_METADATA_KEY, TOKEN),)) for _ in range(streams)]
    reads = [asyncio.ensure_future(call.read()) for call in calls]
    with RssPeak(node.pid) as rss:
        # every stream is answered (refused) or waiting for its second chunk once the refusals
        # stop coming: wait for them, then for a quiet second
        while True:
            done = sum(r.done() for r in reads)
            await asyncio.wait(reads, timeout=1.0)
            if sum(r.done() for r in reads) == done:
                break
    release.set()
    await asyncio.gather(*reads, return_exceptions=True)
    codes = {}
    for call in calls:
        code = (await call.code()).name
        codes[code] = codes.get(code, 0) + 1
    await channel.close()
    return {"case": "node_half_sent", "concurrent": streams, "codes": codes, "peak_rss_growth_mb": round(rss.growth_mb, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=200, help="half-sent streams (default %(default)s)")
    p.add_argument("--workdir", type=Path, help="logs go here (default: a temporary directory)")
    args = p.parse_args()
    from pollinate.node.model_files import open_model

    hidden_size = open_model("smollm2", show_progress=False).config.hidden_size
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-receive-"))
    with ProcGroup(workdir) as group:
        coord, node = start_swarm(group, workdir, "smollm2", None, 30, 2)
        for row in coordinator_cases(coord):
            print(json.dumps(row), flush=True)
        print(json.dumps(node_hidden(node, hidden_size)), flush=True)
        print(json.dumps(asyncio.run(node_half_sent(node, hidden_size, args.streams))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
