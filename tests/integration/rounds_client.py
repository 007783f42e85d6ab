"""Trains one job through two replicas of a span at once (one Backward stream per step per
replica, random hidden states and output gradients), then prints, as one JSON line, each
replica's committed DiLoCo state and the coordinator's, for test_rounds*.py to compare.

With --tolerate-dead a replica whose stream fails (the fault tests SIGKILL one) stops being
trained; the others go on, and only the replicas that finished every step are compared."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys


async def main_async(args) -> dict:
    import torch

    from pollinate.node.rounds import load_state
    from pollinate.node.training import JobSpec
    from pollinate.protocol.channels import ChannelConfig, open_channel
    from pollinate.protocol.tensors import TensorAssembler, encode_tensor
    from pollinate.protocol.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, node_pb2, node_pb2_grpc

    cfg = ChannelConfig(token=args.token)
    spec = JobSpec(rank=4, alpha=8.0, lr=1e-2, round_steps=args.round_steps, seed=3).to_proto(node_pb2)
    nodes = args.nodes.split(",")

    finished: dict[str, int] = {}  # address -> steps done, for the replicas that did them all

    async def train(i: int, address: str) -> None:
        try:
            await train_steps(i, address)
        except Exception as exc:
            if not args.tolerate_dead:
                raise
            print(f"replica {address} stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        else:
            finished[address] = args.steps

    async def train_steps(i: int, address: str) -> None:
        channel = open_channel(address, cfg)
        stub = node_pb2_grpc.NodeStub(channel)
        info = await stub.Info(node_pb2.InfoRequest(), timeout=10)
        gen = torch.Generator().manual_seed(100 + i)
        for step in range(args.steps):
            hidden = torch.randn(1, 8, info.hidden_size, generator=gen)
            grad = torch.randn(1, 8, info.hidden_size, generator=gen)
            msgs = [node_pb2.BackwardRequest(header=node_pb2.BackwardHeader(job=args.job, spec=spec))]
            for name, t in (("hidden_states", hidden), ("grad_outputs", grad)):
                msgs += [node_pb2.BackwardRequest(tensor=c) for c in encode_tensor(t, codec="none", name=name).chunks()]
            assembler = TensorAssembler()
            got = None
            async for reply in stub.Backward(iter(msgs), timeout=args.step_timeout):
                got = assembler.feed(reply.tensor) or got
            assert got is not None and got.name == "grad_inputs"
        await channel.close()

    await asyncio.gather(*(train(i, a) for i, a in enumerate(nodes)))
    nodes = [a for a in nodes if a in finished]

    async def node_state(address: str, rnd: int) -> dict[str, torch.Tensor]:
        channel = open_channel(address, cfg)
        assembler, out = TensorAssembler(), {}
        async for reply in node_pb2_grpc.NodeStub(channel).GetState(
                node_pb2.GetStateRequest(job=args.job, round=rnd), timeout=30):
            enc = assembler.feed(reply.tensor)
            if enc is not None:
                out[enc.name] = enc.decode()
        await channel.close()
        return out

    channel = open_channel(args.coordinator, cfg)
    committed = await coordinator_pb2_grpc.CoordinatorStub(channel).GetCommittedState(
        coordinator_pb2.GetCommittedStateRequest(job=args.job, span=common_pb2.Span(start=0, end=args.num_blocks)),
        timeout=10)
    await channel.close()
    coord = {f"diloco.{k}": v for k, v in load_state(committed.state).items()}
    replicas = [await node_state(a, committed.round) for a in nodes]
    adapters = [await node_state(a, 0) for a in nodes]
    initial = JobSpec  # noqa: F841 (documentation: the adapters started equal, seed 3)
    return {
        "round": committed.round,
        "keys": sorted(coord),
        "replicas_equal_coordinator": [
            sorted(r) == sorted(coord) and all(torch.equal(r[k], coord[k]) for k in coord) for r in replicas],
        "global_norm": float(coord["diloco.global"].norm()),
        "momentum_norm": float(coord["diloco.momentum"].norm()),
        "inner_steps": [int(a["counter.inner_steps"]) for a in adapters],
        "numel": coord["diloco.global"].numel(),
        "finished": nodes,
        "state_bytes": len(committed.state),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--coordinator", required=True)
    p.add_argument("--nodes", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--job", default="rounds")
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--round-steps", type=int, default=3)
    p.add_argument("--num-blocks", type=int, default=4)
    p.add_argument("--step-timeout", type=float, default=120.0, help="seconds per Backward call (a round included)")
    p.add_argument("--tolerate-dead", action="store_true", help="a replica that fails stops; the rest go on")
    args = p.parse_args()
    print(json.dumps(asyncio.run(main_async(args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
