"""A newcomer that tries to commit a DiLoCo round alone (issue 18, item 4), through the real RPCs.

It trains the real node for all but one step of round 1 (its heartbeats report the steps),
joins the coordinator as a second replica of span 0:4 (Join + heartbeats, answering on a port
of its own), asks BeginRound(1) and, being the whole group after the window, commits a
well-formed state of its choosing (its checksum right): nobody has standing yet, but the node
is training the job. Then it trains the node's last step of round 1 (committed by the node
alone: the node gains standing), asks BeginRound(2) and commits θ_global + 1 the same way, and
trains the node for round 2. Prints one JSON line: rounds_client's replicas_report plus the
newcomer's id, its groups and the coordinator's answers to its commits.

--forge-first: the newcomer commits round 1 before the node ever saw the job (nobody is a
voter: the documented limit), with 1000 elements where the node's adapter has more; then two
Backward calls to the node, each refused (the node cannot adopt that state). Prints the
newcomer's group, whether its commit went through, and the node's refusals.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import grpc

from rounds_client import coordinator_state, job_spec, replicas_report, train_steps, wait_for_round

JOB, SPAN = "rounds", (0, 4)


async def main_async(args) -> dict:
    import torch

    from pollinate.compression.outer import state_checksum, state_to_bytes
    from pollinate.coordinator.client import CoordinatorClient, CoordinatorClientConfig
    from pollinate.protocol.shared import Span
    from pollinate.protocol.channels import ChannelConfig, open_channel
    from pollinate.protocol.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

    cfg = ChannelConfig(token=args.token)
    spec = job_spec(args.round_steps, False)
    gen = torch.Generator().manual_seed(100)
    if not args.forge_first:
        await train_steps(cfg, args.node, JOB, spec, seed=100, steps=args.round_steps - 1, timeout=120, gen=gen)

    port = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)  # answers a dial-back
    address = f"127.0.0.1:{port.sockets[0].getsockname()[1]}"
    newcomer = CoordinatorClient(CoordinatorClientConfig(
        coordinator=args.coordinator, token=args.token, address=address, capacity_blocks=4, throughput=10.0,
        requested_span=Span(*SPAN), name="newcomer"))
    me = (await newcomer.start()).member_id
    channel = open_channel(args.coordinator, cfg)
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)

    def md(method, request):  # signed in the newcomer's name, as its own calls are (protocol/identity.py)
        return newcomer.config.identity.call_metadata(f"/pollinate.v1.Coordinator/{method}", request)

    span = common_pb2.Span(start=SPAN[0], end=SPAN[1])

    async def forge(round_index: int, theta, momentum):
        """BeginRound alone, then CommitRound of (theta, momentum) whole: (its group, the answer)."""
        ask = coordinator_pb2.BeginRoundRequest(job=JOB, span=span, round=round_index, member_id=me, tokens=1000)
        begin = await stub.BeginRound(ask, metadata=md("BeginRound", ask), timeout=60)
        commit = coordinator_pb2.CommitRoundRequest(
            job=JOB, span=span, round=round_index, member_id=me, checksum=state_checksum(theta, momentum),
            state=state_to_bytes(theta, momentum), attempt=begin.attempt)
        return [m.member_id for m in begin.members], await stub.CommitRound(commit, metadata=md("CommitRound", commit),
                                                                            timeout=60)

    try:
        if args.forge_first:  # before the node ever saw the job: no voter, the newcomer decides round 1
            group1, forged1 = await forge(1, torch.full((1000,), 0.5), torch.zeros(1000))
            refused = []
            for _ in range(2):  # the node cannot adopt it: every call of the job is refused, saying why
                try:
                    await train_steps(cfg, args.node, JOB, spec, seed=100, steps=1, timeout=60, gen=gen)
                    refused.append("")
                except grpc.aio.AioRpcError as exc:
                    refused.append(f"{exc.code().name}: {exc.details()}")
            return {"newcomer": me, "round1_newcomer_group": group1, "round1_forged_committed": forged1.committed,
                    "refused": refused}
        group1, forged1 = await forge(1, torch.full((1000,), 0.5), torch.zeros(1000))  # any well-formed state
        await train_steps(cfg, args.node, JOB, spec, seed=100, steps=1, timeout=120, gen=gen)
        await wait_for_round(cfg, args.coordinator, [args.node], JOB, SPAN[1], 1, 60)

        _, shared, _ = await coordinator_state(cfg, args.coordinator, JOB, SPAN[1])
        theta = shared["diloco.global"] + 1.0
        group2, forged = await forge(2, theta, shared["diloco.momentum"])

        await train_steps(cfg, args.node, JOB, spec, seed=100, steps=args.round_steps, timeout=120, gen=gen)
        await wait_for_round(cfg, args.coordinator, [args.node], JOB, SPAN[1], 2, 60)
        report = await replicas_report(cfg, args.coordinator, [args.node], JOB, SPAN[1])
    finally:
        await channel.close()
        await newcomer.stop()
        port.close()
    _, coord, _ = await coordinator_state(cfg, args.coordinator, JOB, SPAN[1])
    return {**report, "newcomer": me, "newcomer_group": group2, "forged_committed": forged.committed,
            "forged_reason": forged.reason, "round1_newcomer_group": group1,
            "round1_forged_committed": forged1.committed, "round1_forged_reason": forged1.reason,
            "coordinator_holds_forged": bool(torch.equal(coord["diloco.global"], theta))}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--coordinator", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--round-steps", type=int, default=3)
    p.add_argument("--forge-first", action="store_true",
                   help="commit the forged round 1 before the node saw the job, then train: expect refusals")
    print(json.dumps(asyncio.run(main_async(p.parse_args()))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
