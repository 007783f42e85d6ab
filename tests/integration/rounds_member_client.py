"""A misbehaving member of a DiLoCo round, taking a replica's place through the real RPCs.

It joins the coordinator as a third replica of span 0:4 (Join + heartbeats), serves
ExchangeShard with the node's own servicer code (TrainingRpcs) and runs rounds with the
node's own RoundDriver, so only its inputs are faulty:

- round 2: its pseudo-gradient is 1e6 x an honest one (the round-1 outer update),
  sent through ExchangeShard to every owner; the owners must reject it and the round commit.
- round 3: its contribution stream to node 0 is cancelled before the payload is
  through; that owner drops it after contribution_wait_s and averages the other two, this
  member (lacking that owner's result) gives the attempt up, the two nodes commit the round
  as a group of two, and this member adopts the coordinator's committed state.
- round 4: it applies the round honestly but reports another checksum: the two nodes agree,
  so the round commits for them and this member is outvoted (not a veto, issue 18); told so,
  it adopts the committed state.

Meanwhile it trains the two real nodes (rounds_client.train_steps). Prints one JSON line:
the nodes' report (rounds_client.replicas_report) plus this member's id and outcomes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from types import SimpleNamespace

from rounds_client import coordinator_state, job_spec, replicas_report, train_steps, wait_for_round

POISON = 1e6
LIE_ROUND = 4  # the round whose checksum this member misreports
COORDINATOR = "/pollinate.v1.Coordinator/"  # + a method: what a member's call signature covers


async def main_async(args) -> dict:
    import torch

    from pollinate.node.diloco import DiLoCoMember, assign_flat, job_diloco_config
    from pollinate.node.rounds import RoundConfig, RoundDriver, JobRounds
    from pollinate.node.servicer import NodeServicer
    from pollinate.protocol.shared import JobSpec
    from pollinate.node.config import ServingConfig
    from pollinate.node.training_service import TrainingRpcs
    from pollinate.protocol.budget import ByteBudget
    from pollinate.protocol.channels import ChannelConfig, RpcServer, ServerConfig, open_channel
    from pollinate.protocol.errors import PeerUnavailable
    from pollinate.protocol.framing import DEFAULT_FRAMING
    from pollinate.protocol.identity import NodeIdentity
    from pollinate.protocol.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, node_pb2_grpc

    cfg = ChannelConfig(token=args.token)
    spec = job_spec(args.round_steps, args.overlap)
    nodes = args.nodes.split(",")
    gens = [torch.Generator().manual_seed(100 + i) for i in range(len(nodes))]

    async def train_nodes() -> None:
        await asyncio.gather(*(train_steps(cfg, a, args.job, spec, seed=0, steps=args.round_steps,
                                           timeout=args.step_timeout, gen=gens[i])
                               for i, a in enumerate(nodes)))

    await train_nodes()  # round 1: the two nodes alone (overlapped: it may still be out)
    await wait_for_round(cfg, args.coordinator, nodes, args.job, args.num_blocks, 1, args.step_timeout)
    rnd, shared, _ = await coordinator_state(cfg, args.coordinator, args.job, args.num_blocks)
    assert rnd == 1, rnd
    honest = shared["diloco.momentum"].clone()  # round 1's averaged pseudo-gradient

    break_round = 0  # the round in which our stream to node 0 breaks

    async def send(job, span, r, attempt, me, j, tokens, payload, address):
        """The node's ExchangeShard sender, except that in break_round our stream to node 0 breaks."""
        if r != break_round or address != nodes[0]:
            return await real_send(job, span, r, attempt, me, j, tokens, payload, address)

        # The fault: the call to this owner is opened and cancelled before the payload is
        # through (as a sender whose connection drops mid-stream looks to the owner).
        channel = open_channel(address, cfg)
        try:
            call = node_pb2_grpc.NodeStub(channel).ExchangeShard(timeout=10)
            call.cancel()
        finally:
            await channel.close()
        raise PeerUnavailable(f"ExchangeShard to {address}: injected: the contribution stream broke")

    member_id = ""
    identity = NodeIdentity.generate()  # signs its Join and every call in its member's name
    driver = RoundDriver(RoundConfig(contribution_wait_s=args.contribution_wait, exchange_timeout_s=60.0),
                         coordinator_address=args.coordinator, token=args.token,
                         member_id=lambda: member_id, framing=DEFAULT_FRAMING, identity=identity)
    real_send, driver.exchange.send = driver.exchange.send, send
    # the job's DiLoCo settings, as a node derives them from the job spec it is sent
    member = DiLoCoMember(shared["diloco.global"].clone(), job_diloco_config(JobSpec.from_proto(spec)))
    member.load_shared_state({"global": shared["diloco.global"], "momentum": shared["diloco.momentum"]})
    state = driver.jobs[args.job] = JobRounds(member=member, committed_round=1)

    class Servicer(TrainingRpcs, node_pb2_grpc.NodeServicer):  # the node's ExchangeShard handler
        _next = NodeServicer._next

        def __init__(self):
            self.jobs = SimpleNamespace(rounds=driver)
            self.framing = DEFAULT_FRAMING
            self.server = SimpleNamespace(serving=SimpleNamespace(step_timeout_s=60.0))
            self.receiving = ByteBudget(total=None, per_host=ServingConfig().receive_peer_bytes)

    rpc = RpcServer(ServerConfig(port=0, token=args.token))
    rpc.add(node_pb2_grpc.add_NodeServicer_to_server, Servicer())
    address = await rpc.start()
    coord_channel = open_channel(args.coordinator, cfg)
    coord = coordinator_pb2_grpc.CoordinatorStub(coord_channel)
    span = common_pb2.Span(start=0, end=args.num_blocks)
    join = coordinator_pb2.JoinRequest(address=address, capacity_blocks=args.num_blocks, throughput=10.0,
                                       requested_span=span, name="rounds-member-client")
    joined = await coord.Join(join, timeout=10, metadata=identity.call_metadata(f"{COORDINATOR}Join", join))
    member_id = joined.member_id

    async def heartbeat() -> None:
        while True:
            beat = coordinator_pb2.HeartbeatRequest(member_id=member_id, serving_span=span)
            await coord.Heartbeat(beat, timeout=5, metadata=identity.call_metadata(f"{COORDINATOR}Heartbeat", beat))
            await asyncio.sleep(0.5)  # the heartbeat period, not a readiness wait

    beating = asyncio.create_task(heartbeat())

    async def run(poisoned: bool) -> bool:
        param = torch.nn.Parameter(member.global_flat.clone())
        if poisoned:  # θ_local = θ_global − 1e6 × an honest update: Δ = 1e6 × honest
            with torch.no_grad():
                assign_flat([param], member.global_flat - POISON * honest)
        job = SimpleNamespace(name=args.job, tokens=state.tokens_at_round + 8 * args.round_steps,
                              inner_steps=state.steps_at_round + args.round_steps,
                              adapter=SimpleNamespace(parameters=lambda: [param]))

        async def run_in_thread(fn, *a):
            return await asyncio.to_thread(fn, *a)

        manager = SimpleNamespace(server=SimpleNamespace(start=0, end=args.num_blocks, run_torch=run_in_thread))
        return await driver.run_round(manager, job, state)

    out = {"member_id": member_id}
    try:
        ok, _ = await asyncio.gather(run(poisoned=True), train_nodes())
        out["poison_round_committed_here"] = ok
        out["round_after_poison"] = (await coordinator_state(cfg, args.coordinator, args.job, args.num_blocks))[0]
        break_round = 3
        ok, _ = await asyncio.gather(run(poisoned=False), train_nodes())
        out["break_round_committed_here"] = ok
        out["member_committed_round"] = state.committed_round
        real_apply = member.apply

        def lying_apply(results, *, round_index, num_shards):  # the state is right, the report is not
            checksum = real_apply(results, round_index=round_index, num_shards=num_shards)
            return "0" * 64 if round_index == LIE_ROUND else checksum

        member.apply = lying_apply
        ok, _ = await asyncio.gather(run(poisoned=False), train_nodes())
        out["lie_round_adopted_here"] = ok
        out["member_round_after_lie"] = state.committed_round
        rnd, final, _ = await coordinator_state(cfg, args.coordinator, args.job, args.num_blocks)
        out["member_equals_coordinator"] = bool(
            torch.equal(member.global_flat, final["diloco.global"])
            and torch.equal(member.momentum, final["diloco.momentum"]))
    finally:
        beating.cancel()
        leave = coordinator_pb2.LeaveRequest(member_id=member_id)
        await coord.Leave(leave, timeout=10, metadata=identity.call_metadata(f"{COORDINATOR}Leave", leave))
        await coord_channel.close()
        await rpc.stop(0)
        await driver.close()
    await wait_for_round(cfg, args.coordinator, nodes, args.job, args.num_blocks, LIE_ROUND, args.step_timeout)
    return {**await replicas_report(cfg, args.coordinator, nodes, args.job, args.num_blocks), **out}



def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--coordinator", required=True)
    p.add_argument("--nodes", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--job", default="rounds")
    p.add_argument("--round-steps", type=int, default=3)
    p.add_argument("--num-blocks", type=int, default=4)
    p.add_argument("--step-timeout", type=float, default=180.0)
    p.add_argument("--contribution-wait", type=float, default=10.0)
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="the job's overlap_rounds (default: unset, the nodes' default)")
    args = p.parse_args()
    print(json.dumps(asyncio.run(main_async(args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
