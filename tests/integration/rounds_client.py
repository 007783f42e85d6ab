"""Trains one job through replicas of a span at once (one Backward stream per step per
replica, random hidden states and output gradients), then prints, as one JSON line, each
replica's committed DiLoCo state and the coordinator's, for test_rounds*.py to compare.

With --tolerate-dead a replica whose stream fails (the fault tests SIGKILL one) stops being
trained; the others go on, and only the replicas that finished every step are compared.
With --overlap the job's rounds run in the background (JobSpec.overlap_rounds): the last
round may still be out when the last Backward returns, so the client waits (--expect-round)
until the coordinator and every finished replica have committed it before it reports.
The helpers (train_steps, node_state, coordinator_state, replicas_report) are shared with
rounds_member_client.py."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

JOB_SEED = 3  # every replica's adapter starts from the same seed


def job_spec(round_steps: int, overlap: bool | None = None, method: str = "lora"):
    from pollinate.protocol.shared import JobSpec
    from pollinate.protocol.v1 import node_pb2

    return JobSpec(method=method, rank=4, alpha=8.0, lr=1e-2, round_steps=round_steps, seed=JOB_SEED,
                   overlap_rounds=overlap, num_virtual_tokens=4 if method in ("prefix-tuning", "llama-adapter") else 0).to_proto(node_pb2)


async def wait_for_round(cfg, coordinator: str, nodes: list[str], job: str, num_blocks: int, rnd: int,
                         timeout: float) -> None:
    """Until the coordinator has committed round >= rnd and each node has committed that same
    round (GetState answers for it), or the timeout; the caller's report then shows what is."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got, _, _ = await coordinator_state(cfg, coordinator, job, num_blocks)
            if got >= rnd:
                for address in nodes:
                    await node_state(cfg, address, job, got)
                return
        except Exception:  # not committed yet (NOT_FOUND), here or at the coordinator
            pass
        await asyncio.sleep(0.05)  # poll interval of a readiness check with a deadline


async def train_steps(cfg, address: str, job: str, spec, *, seed: int, steps: int, timeout: float,
                      gen=None) -> None:
    """`steps` Backward calls on one replica (a round runs inside the H-th one)."""
    import torch

    from pollinate.protocol.channels import open_channel
    from pollinate.protocol.tensors import TensorAssembler, encode_tensor
    from pollinate.protocol.v1 import node_pb2, node_pb2_grpc

    channel = open_channel(address, cfg)
    stub = node_pb2_grpc.NodeStub(channel)
    info = await stub.Info(node_pb2.InfoRequest(), timeout=10)
    gen = gen or torch.Generator().manual_seed(seed)
    try:
        for _ in range(steps):
            hidden = torch.randn(1, 8, info.hidden_size, generator=gen)
            grad = torch.randn(1, 8, info.hidden_size, generator=gen)
            msgs = [node_pb2.BackwardRequest(header=node_pb2.BackwardHeader(job=job, spec=spec))]
            for name, t in (("hidden_states", hidden), ("grad_outputs", grad)):
                msgs += [node_pb2.BackwardRequest(tensor=c) for c in encode_tensor(t, codec="none", name=name).chunks()]
            assembler = TensorAssembler()
            got = None
            async for reply in stub.Backward(iter(msgs), timeout=timeout):
                got = assembler.feed(reply.tensor) or got
            assert got is not None and got.name == "grad_inputs"
    finally:
        await channel.close()


async def node_state(cfg, address: str, job: str, rnd: int) -> dict:
    """GetState: round 0 = the adapter and counters, round r = the committed DiLoCo state."""
    from pollinate.protocol.channels import open_channel
    from pollinate.protocol.tensors import TensorAssembler
    from pollinate.protocol.v1 import node_pb2, node_pb2_grpc

    channel = open_channel(address, cfg)
    assembler, out = TensorAssembler(), {}
    async for reply in node_pb2_grpc.NodeStub(channel).GetState(
            node_pb2.GetStateRequest(job=job, round=rnd), timeout=30):
        enc = assembler.feed(reply.tensor)
        if enc is not None:
            out[enc.name] = enc.decode()
    await channel.close()
    return out


async def coordinator_state(cfg, coordinator: str, job: str, num_blocks: int, first_block: int = 0):
    """(round, {"diloco.global", "diloco.momentum"}, state bytes) last committed at the coordinator
    for span first_block:num_blocks."""
    import dataclasses

    from pollinate.compression.outer import state_from_bytes
    from pollinate.protocol.channels import COORDINATOR_MAX_MESSAGE_BYTES, open_channel
    from pollinate.protocol.pieces import get_committed_state
    from pollinate.protocol.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

    # a full-weight state (full, galore) is over one tensor chunk: the nodes' own limit for it;
    # the nodes' TLS (--data-tls) is not the coordinator's
    channel = open_channel(coordinator, dataclasses.replace(cfg, max_message_bytes=COORDINATOR_MAX_MESSAGE_BYTES,
                                                            tls=False, tls_root_pem=None, swarm_peer=False))
    committed = await get_committed_state(coordinator_pb2_grpc.CoordinatorStub(channel),
        coordinator_pb2.GetCommittedStateRequest(job=job, span=common_pb2.Span(start=first_block, end=num_blocks)),
        timeout_s=10)
    await channel.close()
    return committed.round, {f"diloco.{k}": v for k, v in state_from_bytes(committed.state).items()}, committed.state


async def replicas_report(cfg, coordinator: str, nodes: list[str], job: str, num_blocks: int,
                          first_block: int = 0) -> dict:
    import torch

    rnd, coord, blob = await coordinator_state(cfg, coordinator, job, num_blocks, first_block)
    replicas = [await node_state(cfg, a, job, rnd) for a in nodes]
    adapters = [await node_state(cfg, a, job, 0) for a in nodes]
    return {
        "round": rnd,
        "keys": sorted(coord),
        "replicas_equal_coordinator": [
            sorted(r) == sorted(coord) and all(torch.equal(r[k], coord[k]) for k in coord) for r in replicas],
        "global_norm": float(coord["diloco.global"].norm()),
        "momentum_norm": float(coord["diloco.momentum"].norm()),
        "finite": bool(torch.isfinite(coord["diloco.global"]).all() and torch.isfinite(coord["diloco.momentum"]).all()),
        "inner_steps": [int(a["counter.inner_steps"]) for a in adapters],
        "numel": coord["diloco.global"].numel(),
        "state_bytes": len(blob),
        "finished": nodes,
    }


async def main_async(args) -> dict:
    from pollinate.protocol.channels import ChannelConfig, peer_channel_config

    cfg = ChannelConfig(token=args.token)
    if args.data_tls:  # the swarm's CA from the coordinator's Status, as every client takes it
        from pollinate.coordinator.client import call_coordinator
        from pollinate.protocol.data_tls import use_swarm_ca
        from pollinate.protocol.v1 import coordinator_pb2

        status = await call_coordinator(args.coordinator, args.token, "Status", coordinator_pb2.StatusRequest())
        use_swarm_ca(status.data_tls_ca_pem)
        cfg = peer_channel_config(args.token)
    spec = job_spec(args.round_steps, args.overlap, args.method)
    nodes = args.nodes.split(",")
    finished: list[str] = []  # the replicas that did every step

    async def train(i: int, address: str) -> None:
        try:
            await train_steps(cfg, address, args.job, spec, seed=100 + i, steps=args.steps,
                              timeout=args.step_timeout)
        except Exception as exc:
            if not args.tolerate_dead:
                raise
            print(f"replica {address} stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        else:
            finished.append(address)

    await asyncio.gather(*(train(i, a) for i, a in enumerate(nodes)))
    if args.expect_round:
        await wait_for_round(cfg, args.coordinator, [a for a in nodes if a in finished], args.job,
                             args.num_blocks, args.expect_round, args.step_timeout)
    return await replicas_report(cfg, args.coordinator, [a for a in nodes if a in finished],
                                 args.job, args.num_blocks, args.first_block)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--coordinator", required=True)
    p.add_argument("--nodes", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--job", default="rounds")
    p.add_argument("--method", default="lora", help="the job's adapter method (node/adapters/)")
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--round-steps", type=int, default=3)
    p.add_argument("--num-blocks", type=int, default=4, help="the span's end (the model's blocks)")
    p.add_argument("--first-block", type=int, default=0, help="the span's start")
    p.add_argument("--step-timeout", type=float, default=120.0, help="seconds per Backward call (a round included)")
    p.add_argument("--data-tls", action="store_true", help="the swarm runs --data-tls: reach the nodes over TLS")
    p.add_argument("--tolerate-dead", action="store_true", help="a replica that fails stops; the rest go on")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="the job's overlap_rounds (default: unset, the nodes' default)")
    p.add_argument("--expect-round", type=int, default=0, help="before reporting, wait (up to "
                   "--step-timeout) until this round is committed everywhere (overlapped rounds)")
    args = p.parse_args()
    print(json.dumps(asyncio.run(main_async(args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
