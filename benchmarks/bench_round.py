"""A whole DiLoCo round's bytes and time, commit included, against hivemind's averager (issue 12).

    python benchmarks/bench_round.py [--quick] [--lab] [--rate MBIT]

For each N in (2, 4) replicas and each size (~1.2M and ~8M trainable elements, LoRA-job
settings), in the same run and each case in its own network namespace (so the loopback
counter counts this case's traffic only):

- Pollinate: a real coordinator process (`pollinate coordinator --no-dht`) and N member
  processes, each running the node's own round code: ``RoundDriver.run_round`` (BeginRound,
  ExchangeShard to every other owner, apply, CommitRound) and the node's ExchangeShard handler
  (``TrainingRpcs``), joined through Join and heartbeats like a node. What they average is a
  flat fp32 vector of the size with the DiLoCo settings a LoRA job gets by default
  (``job_diloco_config(JobSpec(method="lora"))``: cocktail codec, p 0.73, outer lr 1.2 /
  momentum 0.7); each round every member moves its local copy by its own random step first
  (in place of H inner steps). Round 1
  carries the whole state to the coordinator once (it has nothing to rebuild from); the
  figures are of the rounds after it.
- hivemind 1.1 ``DecentralizedAverager`` on N processes (own DHT each, first one the
  bootstrap), the same tensor size, fp16 and uniform 8-bit compression, group size N. Each
  step is matched first (``require_trigger``) and then triggered on every peer at once, so
  ``hivemind_round_s`` is the all-reduce alone (matchmaking, ~``min_matchmaking_time``, is
  ``hivemind_step_s``). After each step the peer checks that its tensor really is the group
  mean (hivemind 1.1.12's 8-bit quantization returns without averaging under numpy 2).

``round_s``: the slowest member's ``run_round`` (BeginRound to the commit reply), median
over the rounds after the first; ``commit_s`` its CommitRound part.

Bytes: transmitted bytes of ``lo`` in the case's namespace (/proc/self/net/dev) from the moment the round starts until
every member finished it (every packet once: TCP/IP headers included, heartbeats of the
window too), divided by N. Pollinate's own count (serialized gRPC messages, what status and
the node logs show) is ``message_bytes_per_member``.

Prints one JSON object per (N, size) and one summary line. Needs `unshare` with root (or
unprivileged user namespaces) for the private loopback; without it the counter is the
machine's shared loopback and ``private_loopback`` is false.

``--rate MBIT`` caps the case's loopback with ``tc tbf`` (benchmarks/netlab.py's settings): a
home link's bandwidth, but one segment that every process of the case shares (each packet
crosses ``lo`` once), not one link per member as in the lab. Both sides meet the same cap, so
their ratio holds; absolute times are those of N members behind one link of that rate.

``--lab`` runs each process of a case in its own namespace of a benchmarks/netlab.py lab
instead (a host per member, hivemind's peer i on member i's host, one for the coordinator),
each link capped at ``--rate`` in both directions: home links, one per member. Bytes are then
the hosts' eth0 transmit counters summed. Needs root, ``ip`` and ``tc``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOKEN = "bench-round-token"
JOB = "bench-round"
NUM_BLOCKS = 30  # SmolLM2-135M's, the coordinator's default model; members claim all of it
SIZES = (1_200_000, 8_000_000)  # trainable elements: the LoRA jobs


def lo_bytes() -> int:
    """Bytes sent on this network namespace's loopback (/proc/self/net/dev is per namespace;
    /sys/class/net is the namespace sysfs was mounted in)."""
    for line in Path("/proc/self/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])  # transmit bytes
    raise RuntimeError("no loopback interface in /proc/self/net/dev")


class Loopback:
    """Every process of a case on this namespace's loopback; its bytes are lo's transmit counter."""

    def ip(self, role: str) -> str:
        return "127.0.0.1"

    def wrap(self, role: str) -> list[str]:
        return []

    def bytes(self) -> int:
        return lo_bytes()


class LabNet:
    """--lab: each process of a case in its own namespace of a NetLab (benchmarks/netlab.py),
    one host per role ("coord", "m0", "m1", ...; hivemind's peer i runs on member i's host),
    every link capped at the lab's rate in both directions. Its bytes: the transmit counters
    of every host's eth0, summed (each packet once, at its sender, as on the loopback)."""

    def __init__(self, lab) -> None:
        self.lab = lab

    def _host(self, role: str):
        return self.lab.hosts.get(role) or self.lab.add_host(role)

    def ip(self, role: str) -> str:
        return self._host(role).ip

    def wrap(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self._host(role).ns]

    def bytes(self) -> int:
        return sum(tx for _, tx in self.lab.counters().values())


# ---- Pollinate member process ----------------------------------------------------------

async def pollinate_member(args) -> None:
    """One replica: joins, serves ExchangeShard, runs a round per "go" line on stdin and prints
    {"round", "ok", "s", "checksum"} for it."""
    from types import SimpleNamespace

    import torch

    from pollinate.node.diloco import DiLoCoMember, assign_flat, job_diloco_config
    from pollinate.protocol.shared import JobSpec
    from pollinate.node.rounds import RoundConfig, RoundDriver, JobRounds
    from pollinate.node.servicer import NodeServicer
    from pollinate.node.config import ServingConfig
    from pollinate.node.training_service import TrainingRpcs
    from pollinate.protocol.budget import ByteBudget
    from pollinate.protocol.channels import ChannelConfig, RpcServer, ServerConfig, open_channel
    from pollinate.protocol.framing import DEFAULT_FRAMING
    from pollinate.protocol.identity import NodeIdentity
    from pollinate.protocol.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, node_pb2_grpc

    class Driver(RoundDriver):
        """The node's RoundDriver; only the time of its commit phase is noted."""
        commit_s = 0.0

        async def _commit(self, *a, **kw):
            t0 = time.monotonic()
            try:
                return await super()._commit(*a, **kw)
            finally:
                self.commit_s = time.monotonic() - t0

    member_id = ""
    identity = NodeIdentity.generate()  # signs the Join and every call in the member's name, as a node's does

    def signed(method: str, request) -> tuple[tuple[str, str], ...]:
        return identity.call_metadata(f"/pollinate.v1.Coordinator/{method}", request)

    driver = Driver(RoundConfig(), coordinator_address=args.coordinator, token=TOKEN,
                    member_id=lambda: member_id, framing=DEFAULT_FRAMING, identity=identity)
    initial = torch.randn(args.numel, generator=torch.Generator().manual_seed(0)) * 0.02  # same everywhere
    member = DiLoCoMember(initial, job_diloco_config(JobSpec(method="lora")))
    state = driver.jobs[JOB] = JobRounds(member=member, restored=True)

    class Servicer(TrainingRpcs, node_pb2_grpc.NodeServicer):  # the node's ExchangeShard handler
        _next = NodeServicer._next

        def __init__(self):
            self.jobs = SimpleNamespace(rounds=driver)
            self.framing = DEFAULT_FRAMING
            self.server = SimpleNamespace(serving=SimpleNamespace(step_timeout_s=120.0))
            self.receiving = ByteBudget(total=None, per_host=ServingConfig().receive_peer_bytes)

    rpc = RpcServer(ServerConfig(host=args.host, port=0, token=TOKEN))
    rpc.add(node_pb2_grpc.add_NodeServicer_to_server, Servicer())
    address = await rpc.start()
    channel = open_channel(args.coordinator, ChannelConfig(token=TOKEN))
    coord = coordinator_pb2_grpc.CoordinatorStub(channel)
    span = common_pb2.Span(start=0, end=NUM_BLOCKS)
    join = coordinator_pb2.JoinRequest(address=address, capacity_blocks=NUM_BLOCKS, throughput=10.0,
                                       requested_span=span, name=f"bench-member-{args.index}")
    joined = await coord.Join(join, timeout=30, metadata=signed("Join", join))
    member_id = joined.member_id

    async def heartbeat() -> None:
        while True:
            beat = coordinator_pb2.HeartbeatRequest(member_id=member_id, serving_span=span)
            await coord.Heartbeat(beat, timeout=10, metadata=signed("Heartbeat", beat))
            await asyncio.sleep(joined.heartbeat_period_s)  # the lease's period, not a readiness wait

    beating = asyncio.create_task(heartbeat())
    param = torch.nn.Parameter(member.local_start())
    gen = torch.Generator().manual_seed(1000 + args.index)

    async def run_in_thread(fn, *a):
        return await asyncio.to_thread(fn, *a)

    manager = SimpleNamespace(server=SimpleNamespace(start=0, end=NUM_BLOCKS, run_torch=run_in_thread))
    print(json.dumps({"ready": member_id}), flush=True)
    loop = asyncio.get_running_loop()
    try:
        while (line := await loop.run_in_executor(None, sys.stdin.readline)).strip() == "go":
            # in place of H inner steps: this member's own move away from where it started
            with torch.no_grad():
                assign_flat([param], member.local_start() - 1e-3 * torch.randn(args.numel, generator=gen))
            job = SimpleNamespace(name=JOB, tokens=state.tokens_at_round + 1000,
                                  inner_steps=state.steps_at_round + member.config.inner_steps,
                                  adapter=SimpleNamespace(parameters=lambda: [param]))
            t0 = time.monotonic()
            ok = await driver.run_round(manager, job, state)
            print(json.dumps({"round": state.committed_round, "ok": ok, "s": time.monotonic() - t0,
                              "commit_s": driver.commit_s, "checksum": member.checksum()}), flush=True)
    finally:
        beating.cancel()
        leave = coordinator_pb2.LeaveRequest(member_id=member_id)
        await coord.Leave(leave, timeout=10, metadata=signed("Leave", leave))
        await channel.close()
        await rpc.stop(0)
        await driver.close()


# ---- hivemind peer process --------------------------------------------------------------

def hivemind_peer(args) -> None:
    """One DecentralizedAverager peer: per "go" line, match a group, print {"matched"}; per
    "trigger" line, run the all-reduce and print {"s", "averaged", ...}."""
    import hivemind
    import torch
    from hivemind.averaging.control import AveragingStage
    from hivemind.compression import Float16Compression, Uniform8BitQuantization

    compression = {"fp16": Float16Compression(), "8bit": Uniform8BitQuantization()}[args.compression]
    dht = hivemind.DHT(initial_peers=args.peers.split(",") if args.peers else None, start=True,
                       host_maddrs=[f"/ip4/{args.host}/tcp/0"])
    mine = torch.randn(args.numel, generator=torch.Generator().manual_seed(args.index))
    expected = sum(torch.randn(args.numel, generator=torch.Generator().manual_seed(i))
                   for i in range(args.n)) / args.n  # the group mean every peer should end with
    averager = hivemind.averaging.DecentralizedAverager(
        [mine.clone()], dht, prefix=f"bench-round-{args.compression}", target_group_size=args.n,
        min_group_size=args.n, min_matchmaking_time=args.matchmaking_s, request_timeout=1.0,
        compression=compression, start=True)
    print(json.dumps({"ready": [str(m) for m in dht.get_visible_maddrs()]}), flush=True)
    try:
        while sys.stdin.readline().strip() == "go":
            with averager.get_tensors() as tensors:
                tensors[0].copy_(mine)  # every step averages the same tensors: checkable
            t0 = time.monotonic()
            control = averager.step(wait=False, require_trigger=True, timeout=120)
            while control.stage != AveragingStage.AWAITING_TRIGGER and not control.done():
                time.sleep(0.005)  # polling the step's stage (shared memory), not a readiness guess
            print(json.dumps({"matched": not control.done(), "s": time.monotonic() - t0}), flush=True)
            if sys.stdin.readline().strip() != "trigger":
                break
            t1 = time.monotonic()
            control.allow_allreduce()
            try:
                control.result(timeout=120)
                error = ""
            except Exception as exc:  # a failed step: reported, the check below says it did not average
                error = repr(exc)[:200]
            dt = time.monotonic() - t1
            with averager.get_tensors() as tensors:
                got = tensors[0].clone()
            off = float((got - expected).norm() / (mine - expected).norm())
            print(json.dumps({"s": dt, "step_s": time.monotonic() - t0, "error": error,
                              "off_from_mean": off, "averaged": off < 0.25}), flush=True)
    finally:
        averager.shutdown()
        dht.shutdown()


# ---- one case, inside its namespace ----------------------------------------------------

class Workers:
    """Worker processes spoken to by lines: a command to all, one JSON line back from each."""

    def __init__(self, procs: list[subprocess.Popen]) -> None:
        self.procs = procs

    def send(self, line: str) -> None:
        for p in self.procs:
            p.stdin.write(line + "\n")
            p.stdin.flush()

    def read(self) -> list[dict]:
        out = []
        for p in self.procs:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {p.pid} exited ({p.wait()}); see its log")
            out.append(json.loads(line))
        return out

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.stdin.close()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def spawn(args_list: list[str], log: Path, wrap: list[str] = ()) -> subprocess.Popen:
    return subprocess.Popen([*wrap, sys.executable, __file__, *args_list], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)


def wait_ready_file(path: Path, proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"coordinator exited with {proc.returncode}")
        if path.exists() and path.stat().st_size:
            return json.loads(path.read_text())
        time.sleep(0.05)  # polling the ready file the coordinator writes once it serves
    raise TimeoutError(f"coordinator not ready after {timeout} s")


async def coordinator_view(address: str) -> tuple[dict, str]:
    """(last committed round's traffic per member, its checksum) from Status/GetCommittedState."""
    from pollinate.protocol.channels import COORDINATOR_MAX_MESSAGE_BYTES, ChannelConfig, open_channel
    from pollinate.protocol.pieces import get_committed_state
    from pollinate.protocol.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

    channel = open_channel(address, ChannelConfig(token=TOKEN, max_message_bytes=COORDINATOR_MAX_MESSAGE_BYTES))
    try:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        status = await stub.Status(coordinator_pb2.StatusRequest(), timeout=30)
        got = await get_committed_state(stub, coordinator_pb2.GetCommittedStateRequest(
            job=JOB, span=common_pb2.Span(start=0, end=NUM_BLOCKS)), timeout_s=60)
        (rnd,) = [r for r in status.rounds if r.job == JOB]
        return {"round": rnd.round, "members": [
            {"sent": m.bytes_sent, "received": m.bytes_received, "to_coordinator": m.coordinator_bytes_sent,
             "from_coordinator": m.coordinator_bytes_received} for m in rnd.members]}, got.checksum
    finally:
        await channel.close()


def run_pollinate(net, n: int, numel: int, rounds: int, tmp: Path) -> dict:
    (tmp / "token").write_text(TOKEN)
    ready = tmp / "coordinator.ready.json"
    coord = subprocess.Popen(
        [*net.wrap("coord"), sys.executable, "-m", "pollinate", "coordinator", "--host", net.ip("coord"),
         "--data-dir", str(tmp / "coord-data"), "--port", "0",
         "--http-port", "-1", "--token-file", str(tmp / "token"), "--ready-file", str(ready), "--no-dht",
         "--max-members-per-address", "0", "--heartbeat-period", "5", "--lease", "60", "--round-window", "60"],
        stdout=open(tmp / "coordinator.log", "w"), stderr=subprocess.STDOUT)
    workers = None
    try:
        address = wait_ready_file(ready, coord, timeout=120)["grpc"]
        workers = Workers([spawn(["--worker", "pollinate", "--coordinator", address, "--numel", str(numel),
                                  "--index", str(i), "--host", net.ip(f"m{i}")], tmp / f"member-{i}.log",
                                 net.wrap(f"m{i}")) for i in range(n)])
        workers.read()  # every member joined and serves
        per_round = []
        for _ in range(rounds):
            before, t0 = net.bytes(), time.monotonic()
            workers.send("go")
            got = workers.read()
            per_round.append({"lo_bytes": net.bytes() - before, "wall_s": time.monotonic() - t0,
                              "round_s": max(g["s"] for g in got), "commit_s": max(g["commit_s"] for g in got),
                              "ok": all(g["ok"] for g in got),
                              "agree": len({g["checksum"] for g in got}) == 1, "checksum": got[0]["checksum"]})
        if net.wrap("coord"):  # the lab's namespaces are reachable only from inside
            done = subprocess.run([*net.wrap("coord"), sys.executable, __file__, "--view", address],
                                  stdout=subprocess.PIPE, text=True, check=True, timeout=120)
            view, checksum = json.loads(done.stdout)
        else:
            view, checksum = asyncio.run(coordinator_view(address))
    except BaseException:
        for log in sorted(tmp.glob("*.log")):
            sys.stderr.write(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}\n")
        raise
    finally:
        if workers is not None:
            workers.stop()
        coord.send_signal(signal.SIGTERM)
        try:
            coord.wait(timeout=15)
        except subprocess.TimeoutExpired:
            coord.kill()
    steady = per_round[1:]  # round 1 also carries the whole state once
    members = view["members"]
    # every message byte once: what the members sent plus what the coordinator sent them
    message = (sum(m["sent"] for m in members) + sum(m["from_coordinator"] for m in members)) / n
    return {
        "round_bytes_per_member": statistics.median(r["lo_bytes"] for r in steady) / n,
        "round_s": statistics.median(r["round_s"] for r in steady),
        # of which CommitRound (the coordinator rebuilds, checks and fsyncs the state before it replies)
        "commit_s": statistics.median(r["commit_s"] for r in steady),
        "message_bytes_per_member": message,
        "coordinator_bytes_per_member": sum(m["to_coordinator"] + m["from_coordinator"] for m in members) / n,
        "first_round_bytes_per_member": per_round[0]["lo_bytes"] / n,
        "first_round_s": per_round[0]["round_s"],
        "rounds": len(per_round),
        "all_committed": all(r["ok"] for r in per_round) and view["round"] == len(per_round),
        "members_agree": all(r["agree"] for r in per_round),
        "coordinator_state_matches": checksum == per_round[-1]["checksum"],
    }


def run_hivemind(net, n: int, numel: int, compression: str, steps: int, matchmaking_s: float, tmp: Path) -> dict:
    common = ["--worker", "hivemind", "--numel", str(numel), "--n", str(n), "--compression", compression,
              "--matchmaking-s", str(matchmaking_s)]

    def peer(i: int, *more: str) -> subprocess.Popen:  # on member i's host
        return spawn([*common, "--index", str(i), "--host", net.ip(f"m{i}"), *more],
                     tmp / f"hivemind-{compression}-{i}.log", net.wrap(f"m{i}"))

    first = peer(0)
    procs = [first]
    try:
        peers = ",".join(json.loads(first.stdout.readline())["ready"])
        procs += [peer(i, "--peers", peers) for i in range(1, n)]
        workers = Workers(procs)
        workers.procs = procs[1:]
        workers.read()
        workers.procs = procs
        results = []
        for _ in range(steps):
            step0 = net.bytes()
            workers.send("go")
            matched = workers.read()
            if not all(m["matched"] for m in matched):
                results.append({"matched": False})
                break
            before = net.bytes()
            workers.send("trigger")
            got = workers.read()
            after = net.bytes()
            results.append({"matched": True, "lo_bytes": after - before, "step_lo_bytes": after - step0,
                            "round_s": max(g["s"] for g in got), "step_s": max(g["step_s"] for g in got),
                            "averaged": all(g["averaged"] for g in got),
                            "off_from_mean": max(g["off_from_mean"] for g in got),
                            "error": next((g["error"] for g in got if g["error"]), "")})
    except BaseException:
        for log in sorted(tmp.glob(f"hivemind-{compression}-*.log")):
            sys.stderr.write(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}\n")
        raise
    finally:
        Workers(procs).stop()
    ok = [r for r in results if r.get("matched")]
    averaged = bool(ok) and all(r["averaged"] for r in ok)
    return {
        "averaged": averaged,
        "bytes_per_member": statistics.median(r["step_lo_bytes"] for r in ok) / n if ok else None,
        "allreduce_bytes_per_member": statistics.median(r["lo_bytes"] for r in ok) / n if ok else None,
        "round_s": statistics.median(r["round_s"] for r in ok) if ok else None,
        "step_s": statistics.median(r["step_s"] for r in ok) if ok else None,
        "off_from_mean": max(r["off_from_mean"] for r in ok) if ok else None,
        "error": next((r["error"] for r in ok if r["error"]), ""),
    }


def run_case(args) -> dict:
    private = os.environ.get("BENCH_ROUND_NETNS") == "1"
    if private:  # a fresh namespace has lo down
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        if args.rate_mbit:  # every process of the case shares this one capped segment
            from netlab import tbf_args

            subprocess.run(["tc", "qdisc", "replace", "dev", "lo", "root", *tbf_args(args.rate_mbit)], check=True)
    n, numel = args.n, args.numel
    with tempfile.TemporaryDirectory(prefix="bench-round-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        net = Loopback()
        if args.lab:  # its own namespaces: torn down on exit, failure and Ctrl-C
            from netlab import NetLab

            net = LabNet(stack.enter_context(NetLab(tmp / "lab", rate_mbit=args.rate_mbit)))
        ours = run_pollinate(net, n, numel, args.rounds, tmp)
        theirs = {c: run_hivemind(net, n, numel, c, args.hivemind_steps, args.matchmaking_s, tmp)
                  for c in ("fp16", "8bit")}
    fp16, q8 = theirs["fp16"], theirs["8bit"]

    def ratio(a, b):
        return round(a / b, 4) if a is not None and b else None

    return {
        "n": n, "numel": numel, "private_loopback": private, "lab": args.lab, "rate_mbit": args.rate_mbit,
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in ours.items()},
        "hivemind_bytes_per_member": fp16["bytes_per_member"],
        "hivemind_allreduce_bytes_per_member": fp16["allreduce_bytes_per_member"],
        "hivemind_round_s": fp16["round_s"] and round(fp16["round_s"], 4),
        "hivemind_step_s": fp16["step_s"] and round(fp16["step_s"], 4),
        "hivemind_averaged": fp16["averaged"], "hivemind_off_from_mean": fp16["off_from_mean"],
        "hivemind_8bit_averaged": q8["averaged"], "hivemind_8bit_off_from_mean": q8["off_from_mean"],
        "hivemind_8bit_bytes_per_member": q8["bytes_per_member"],
        "hivemind_8bit_round_s": q8["round_s"] and round(q8["round_s"], 4),
        "hivemind_8bit_error": q8["error"],
        "bytes_ratio": ratio(ours["round_bytes_per_member"], fp16["bytes_per_member"]),
        "bytes_ratio_allreduce_only": ratio(ours["round_bytes_per_member"], fp16["allreduce_bytes_per_member"]),
        "bytes_ratio_8bit": ratio(ours["round_bytes_per_member"], q8["bytes_per_member"]) if q8["averaged"] else None,
        "time_ratio": ratio(ours["round_s"], fp16["round_s"]),
        "time_ratio_step": ratio(ours["round_s"], fp16["step_s"]),  # vs matchmaking + all-reduce
        "time_ratio_8bit": ratio(ours["round_s"], q8["round_s"]) if q8["averaged"] else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 Pollinate rounds and 2 hivemind steps per case")
    p.add_argument("--replicas", default="2,4", help="comma-separated N (default 2,4)")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated element counts")
    p.add_argument("--rounds", type=int, default=5, help="Pollinate rounds per case (the first carries the state)")
    p.add_argument("--hivemind-steps", type=int, default=3, help="hivemind averaging steps per case")
    p.add_argument("--matchmaking-s", type=float, default=2.0, help="hivemind min_matchmaking_time, seconds")
    p.add_argument("--no-netns", action="store_true", help="count the shared loopback (no unshare)")
    p.add_argument("--rate", dest="rate_mbit", type=float, default=0.0,
                   help="cap each case's loopback at this many Mbit/s with tc tbf (0: unlimited): every "
                        "process of a case then shares one segment of that rate; needs the private namespace. "
                        "With --lab: each link's rate")
    p.add_argument("--lab", action="store_true",
                   help="run each process of a case in its own network namespace (benchmarks/netlab.py: one host "
                        "per member and one for the coordinator, each link capped at --rate in both directions); "
                        "needs root, ip and tc")
    # internal: one case in its namespace, or one worker process
    p.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=("pollinate", "hivemind"), help=argparse.SUPPRESS)
    p.add_argument("--coordinator", help=argparse.SUPPRESS)
    p.add_argument("--peers", default="", help=argparse.SUPPRESS)
    p.add_argument("--compression", default="fp16", help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--numel", type=int, default=SIZES[0], help=argparse.SUPPRESS)
    p.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    p.add_argument("--view", metavar="COORDINATOR", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.rounds, args.hivemind_steps = 3, 2
    if args.rounds < 2 or args.hivemind_steps < 1:
        p.error("--rounds must be >= 2 (round 1 carries the state) and --hivemind-steps >= 1")
    if args.rate_mbit < 0:
        p.error("--rate must be >= 0 (0: unlimited)")
    if args.view:  # --lab: the coordinator's view, asked from inside its namespace
        print(json.dumps(asyncio.run(coordinator_view(args.view))))
        return 0
    if args.worker == "pollinate":
        asyncio.run(pollinate_member(args))
        return 0
    if args.worker == "hivemind":
        hivemind_peer(args)
        return 0
    if args.case:
        print(json.dumps(run_case(args)), flush=True)
        return 0

    results = []
    for numel in map(int, args.sizes.split(",")):
        for n in map(int, args.replicas.split(",")):
            cmd = [sys.executable, __file__, "--case", "--n", str(n), "--numel", str(numel), "--rounds",
                   str(args.rounds), "--hivemind-steps", str(args.hivemind_steps), "--matchmaking-s",
                   str(args.matchmaking_s), "--rate", str(args.rate_mbit)] + (["--lab"] if args.lab else [])
            env = dict(os.environ)
            if args.lab:
                from netlab import unavailable

                if (why := unavailable()) is not None:
                    raise SystemExit(f"--lab: {why}")
            elif not args.no_netns and subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0:
                cmd, env["BENCH_ROUND_NETNS"] = ["unshare", "--net", *cmd], "1"
            elif args.rate_mbit:  # never shape the machine's own loopback
                raise SystemExit("--rate needs a private network namespace (unshare --net, as root); "
                                 "it is not available here" + (" (--no-netns given)" if args.no_netns else ""))
            if args.rate_mbit and shutil.which("tc") is None:
                raise SystemExit("--rate needs the `tc` tool (Debian package iproute2)")
            done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=1800)
            if done.returncode != 0:
                raise SystemExit(f"case N={n} numel={numel} failed ({done.returncode})")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            results.append(row)
    print(json.dumps({
        "summary": True, "cases": len(results),
        "max_bytes_ratio": max((r["bytes_ratio"] for r in results if r["bytes_ratio"] is not None), default=None),
        "max_time_ratio": max((r["time_ratio"] for r in results if r["time_ratio"] is not None), default=None),
        "bytes_target": 0.15, "time_target": 1.0, "rate_mbit": args.rate_mbit, "lab": args.lab,
        "hivemind_8bit_averaged_any": any(r["hivemind_8bit_averaged"] for r in results),
    }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
