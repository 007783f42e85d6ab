"""How many heartbeating members one coordinator sustains, and how fast it notices a death.

    python benchmarks/bench_coordinator.py            # 2000 nodes at 1 Hz for 20 s
    python benchmarks/bench_coordinator.py --quick    # 200 nodes for 3 s, a few seconds total

Starts a real coordinator process (`python -m pollinate coordinator`, port 0, ready file)
and a separate load process that joins N simulated nodes over real gRPC on loopback, then
has each send one heartbeat per period on its own HeartbeatStream (`--rpc unary`: the
unary Heartbeat RPC) (phases spread evenly), measuring each call's
latency. At the end one node goes silent; failure_detect_s is the time from its last
heartbeat to the first heartbeat reply (of any other node) that shows the epoch bumped by
its eviction. Prints one JSON object: nodes, heartbeats_per_s, p50_ms, p99_ms, max_ms,
errors, failure_detect_s, lease_s, join_s, coordinator_cpu_pct (while the nodes join and
beat) and load_cpu_pct (each load process, over the measured window).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOKEN = "bench-token"


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# ---- the load process ------------------------------------------------------------------


async def load(args: argparse.Namespace) -> dict:
    import grpc

    from pollinate.protocol.auth import token_metadata
    from pollinate.protocol.channels import ChannelConfig, open_channel
    from pollinate.protocol.identity import NodeIdentity
    from pollinate.protocol.v1 import coordinator_pb2, coordinator_pb2_grpc

    # The token goes in per-call metadata rather than a client interceptor: interceptors
    # cost the load generator CPU that this 2-core machine needs for the coordinator.
    meta = token_metadata(TOKEN)
    channels = [open_channel(args.target, ChannelConfig()) for _ in range(args.channels)]
    stubs = [coordinator_pb2_grpc.CoordinatorStub(c) for c in channels]
    sem = asyncio.Semaphore(32)

    def signed(identity: NodeIdentity, method: str, request=None) -> tuple[tuple[str, str], ...]:
        """The token and a member's signature of one call, as a real node sends them."""
        return meta + identity.call_metadata(f"/pollinate.v1.Coordinator/{method}", request)

    async def join(i: int, identity: NodeIdentity) -> tuple[str, "coordinator_pb2.JoinReply"]:
        async with sem:
            request = coordinator_pb2.JoinRequest(
                address=f"10.{args.worker_index}.{(i // 250) % 250}.{i % 250 + 1}:7000",
                capacity_blocks=1 + i % 12, throughput=10.0 + i % 7, name=f"sim{i}")
            reply = await stubs[i % len(stubs)].Join(request, metadata=signed(identity, "Join", request),
                                                     timeout=30)
            return reply.member_id, reply

    latencies: list[float] = []
    errors: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    all_joined = asyncio.Event()
    joined_count = 0
    window: dict[str, float] = {}  # start, stop: the measured interval (loop time)
    victim = 0 if args.worker_index == 0 else -1  # worker 0's node 0 goes silent at the end
    state = {"epoch": 0, "silent_since": None, "bumped_at": None, "period": 1.0, "lease": 5.0}

    async def node(i: int) -> None:
        # Each simulated node heartbeats from the moment it has joined, as a real one does;
        # only beats inside the measured window (after every node joined) are counted.
        nonlocal joined_count
        identity = NodeIdentity.generate()  # each node's key: it signs the Join and the heartbeats
        member_id, reply = await join(i, identity)
        stub = stubs[i % len(stubs)]
        period = state["period"] = reply.heartbeat_period_s
        state["lease"] = reply.lease_s
        joined_count += 1
        if joined_count == args.nodes:
            window["start"] = loop.time() + 1.0
            window["stop"] = window["start"] + args.duration
            all_joined.set()
        request = coordinator_pb2.HeartbeatRequest(member_id=member_id, serving_span=reply.span)
        stream = None  # --rpc stream: this node's HeartbeatStream, opened at its first beat

        async def beat():
            nonlocal stream
            if args.rpc == "unary":  # each beat signed, as CoordinatorClient's unary fallback does
                return await stub.Heartbeat(request, metadata=signed(identity, "Heartbeat", request), timeout=5)
            if stream is None:  # one signature per stream
                stream = stub.HeartbeatStream(metadata=signed(identity, "HeartbeatStream"))
            try:
                await stream.write(request)
                answer = await asyncio.wait_for(stream.read(), timeout=5)
            except BaseException:
                stream.cancel()
                stream = None
                raise
            if answer is grpc.aio.EOF:
                stream = None
                raise RuntimeError("heartbeat stream ended")
            return answer

        t = loop.time() + period * (i % 1000) / 1000  # spread phases over one period
        while True:
            await asyncio.sleep(max(0.0, t - loop.time()))
            t += period
            if all_joined.is_set():
                if (i == victim and loop.time() > window["stop"] or state["bumped_at"] is not None
                        or loop.time() > window["stop"] + state["lease"] + 5.0):
                    # The victim goes silent (its last beat is state["silent_since"]); the
                    # others stop once its eviction was seen, or (never seen) after a while.
                    if stream is not None:
                        await stream.done_writing()
                    return
            sent = time.perf_counter()
            try:
                reply = await beat()
            except grpc.aio.AioRpcError as e:
                errors[e.code().name] = errors.get(e.code().name, 0) + 1
                continue
            except (asyncio.TimeoutError, asyncio.InvalidStateError, RuntimeError) as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                continue
            done = time.perf_counter()
            now = loop.time()
            if all_joined.is_set() and window["start"] <= now <= window["stop"]:
                latencies.append(done - sent)
            if not all_joined.is_set():
                continue
            if i == victim:
                state["silent_since"] = done
                state["epoch"] = reply.epoch
            elif (state["silent_since"] is not None and now > window["stop"]
                  and reply.epoch > state["epoch"]):
                state["bumped_at"] = done

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(node(i)) for i in range(args.nodes)]
    await asyncio.wait_for(all_joined.wait(), timeout=300)
    join_s = time.perf_counter() - t0
    # This process's own CPU over the measured window: is the load generator the limit?
    await asyncio.sleep(max(0.0, window["start"] - loop.time()))
    cpu0 = time.process_time()
    await asyncio.sleep(max(0.0, window["stop"] - loop.time()))
    load_cpu = (time.process_time() - cpu0) / args.duration
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.duration + 60)
    lease = state["lease"]
    silent, bumped = state["silent_since"], state["bumped_at"]
    detect = bumped - silent if silent is not None and bumped is not None else None
    for c in channels:
        await c.close()
    return {"latencies": latencies, "errors": errors, "failure_detect_s": detect,
            "lease_s": lease, "join_s": join_s, "load_cpu": load_cpu}


def merge(results: list[dict], args: argparse.Namespace) -> dict:
    latencies = sorted(x for r in results for x in r["latencies"])
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    detect = results[0]["failure_detect_s"]
    return {
        "nodes": args.nodes,
        "duration_s": args.duration,
        "rpc": args.rpc,
        "load_processes": args.load_procs,
        "heartbeats": len(latencies),
        "heartbeats_per_s": round(len(latencies) / args.duration, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1e3, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1e3, 2),
        "max_ms": round(latencies[-1] * 1e3, 2) if latencies else None,
        "errors": errors,
        "failure_detect_s": round(detect, 3) if detect is not None else None,
        "lease_s": results[0]["lease_s"],
        "join_s": round(max(r["join_s"] for r in results), 2),
        "load_cpu_pct": [round(100 * r["load_cpu"], 1) for r in results],
    }


# ---- the driver ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(path: Path, proc: subprocess.Popen, timeout: float) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"coordinator exited with {proc.returncode} before it was ready")
        time.sleep(0.05)
    raise TimeoutError(f"coordinator not ready after {timeout} s")


def drive(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-coordinator-") as tmp:
        tmp = Path(tmp)
        (tmp / "token").write_text(TOKEN)
        ready = tmp / "ready.json"
        log = open(tmp / "coordinator.log", "w")
        cmd = [sys.executable, "-m", "pollinate", "coordinator", "--data-dir", str(tmp / "data"),
               "--port", "0", "--http-port", "-1", "--token-file", str(tmp / "token"),
               "--ready-file", str(ready), "--max-members-per-address", "0",
               "--heartbeat-period", str(args.heartbeat_period), "--lease", str(args.lease)]
        if args.no_dht:
            cmd.append("--no-dht")
        coord = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            target = wait_ready(ready, coord, timeout=120)["grpc"]
            cpu0, wall0 = cpu_seconds(coord.pid), time.monotonic()
            share = args.nodes // args.load_procs
            workers = [
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", "--target", target,
                     "--worker-index", str(k), "--duration", str(args.duration),
                     "--nodes", str(share + (args.nodes % args.load_procs if k == 0 else 0)),
                     "--channels", str(args.channels), "--rpc", args.rpc],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for k in range(args.load_procs)
            ]
            outputs = []
            for w in workers:
                out, err = w.communicate(timeout=args.duration + args.lease + 300)
                if w.returncode != 0:
                    raise RuntimeError(f"load process failed:\n{err[-3000:]}")
                outputs.append(json.loads(out.strip().splitlines()[-1]))
            cpu = (cpu_seconds(coord.pid) - cpu0) / (time.monotonic() - wall0)
            result = merge(outputs, args)
            result["coordinator_cpu_pct"] = round(100 * cpu, 1)
            result["machine_cpus"] = os.cpu_count()
            return result
        except BaseException:
            log.flush()
            sys.stderr.write((tmp / "coordinator.log").read_text()[-3000:])
            raise
        finally:
            coord.send_signal(signal.SIGTERM)
            try:
                coord.wait(timeout=10)
            except subprocess.TimeoutExpired:
                coord.kill()
                coord.wait(timeout=10)
            log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 nodes, 3 s, 1.5 s lease, no DHT")
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--heartbeat-period", type=float, default=1.0)
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--channels", type=int, default=8, help="gRPC connections of the load process")
    parser.add_argument("--load-procs", type=int, default=2,
                        help="load processes sharing the nodes (one Python process cannot "
                             "drive 2000 RPC/s on this machine)")
    parser.add_argument("--rpc", choices=("stream", "unary"), default="stream",
                        help="heartbeat over one HeartbeatStream per node (what nodes do) or "
                             "the unary Heartbeat RPC (default %(default)s)")
    parser.add_argument("--no-dht", action="store_true", help="skip the bootstrap DHT peer")
    parser.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(asyncio.run(load(args))))
        return 0
    if args.quick:
        args.nodes, args.duration, args.lease, args.no_dht = 200, 3.0, 1.5, True
        args.load_procs = 1
    print(json.dumps(drive(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
