"""A trainer process for test_trainer_failover.py: trains a LoRA job on seeded token batches
and, between the Forward and the Backward of micro-batch --pause-at, writes
DIR/forwarded.json (the address of the hop over --span) and waits for DIR/killed, so the
test can SIGKILL that replica exactly while the trainer needs its Backward.

    python trainer_failover_client.py --model DIR --cache-dir C --initial-peers MADDR \
        --job J --steps 6 --pause-at 3 --span 2:4 --dir D

Prints one JSON line: history, the address of --span's hop per micro-batch (Backward), the
chain's failovers and reroutes, and the counters of the job on each replica still alive.

With --generate-with-job ADDRESS instead: once ADDRESS (a replica that never trained the
job) is in the DHT, greedy-generate 8 tokens with the job's adapter through an inference
session, then again with ADDRESS banned (the reference); prints both runs' tokens, route
and the replicas each found without the job.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    for name in ("--model", "--cache-dir", "--job", "--span", "--dir"):
        p.add_argument(name, required=True)
    p.add_argument("--initial-peers", nargs="+", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--pause-at", type=int, default=3)
    p.add_argument("--wait-s", type=float, default=120.0)
    p.add_argument("--generate-with-job", metavar="ADDRESS")
    args = p.parse_args()
    if args.generate_with_job:
        return generate(args)
    start, end = map(int, args.span.split(":"))
    signals = Path(args.dir)

    from pollinate.node.announce import start_dht

    dht = start_dht(args.initial_peers, client_mode=True)  # before any gRPC object
    import asyncio

    import torch

    from pollinate.client.config import ClientConfig
    from pollinate.client.routing import Hop
    from pollinate.client.swarm import Swarm
    from pollinate.client.trainer import Trainer, TrainConfig
    from pollinate.client.training_data import Example
    from pollinate.client.worker import LoopThread
    from pollinate.node.model_files import open_model
    from pollinate.protocol.shared import JobSpec

    files = open_model(args.model, cache_dir=args.cache_dir, show_progress=False)
    worker = LoopThread()
    swarm = Swarm(dht=dht, model_id=args.model, num_blocks=files.num_blocks,
                  config=ClientConfig(wire_codec="none"))
    config = TrainConfig(job=args.job, spec=JobSpec(rank=4, alpha=8.0, lr=1e-2, seed=3), steps=args.steps,
                         batch_size=2, wire_codec="none")
    trainer = Trainer(swarm=swarm, worker=worker, client_part=files.load_client_part(), pad_id=0, config=config,
                      timeout_s=30.0)
    chain, backward = trainer.chain, trainer.chain.backward
    used: list[str] = []

    async def instrumented(route, inputs, grad):
        if len(used) + 1 == args.pause_at:  # between this micro-batch's Forward and its Backward
            (hop,) = [h for h in route if (h.start, h.end) == (start, end)]
            (signals / "forwarded.json").write_text(json.dumps({"address": hop.peer.address}))
            deadline = time.monotonic() + args.wait_s
            while not (signals / "killed").exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {signals / 'killed'} after {args.wait_s} s")
                await asyncio.sleep(0.05)
        hops = await backward(route, inputs, grad)
        used.extend(h.peer.address for h in hops if (h.start, h.end) == (start, end))
        return hops

    chain.backward = instrumented
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(3, 256, (2, 12), generator=g) for _ in range(args.steps)]
    batches = iter([[Example(input_ids=r.tolist(), labels=r.tolist()) for r in ids] for ids in data])
    history = trainer.train(batches, progress=False)

    async def counters():
        out = {}
        for peer in await swarm.peers(refresh=True):
            if (peer.start, peer.end) != (start, end) or peer.address not in used:
                continue
            try:
                state = await chain.fetch_state(Hop(peer=peer, start=start, end=end))
            except Exception as e:  # the killed replica: unreachable
                out[peer.address] = f"{type(e).__name__}"
                continue
            out[peer.address] = {k[len("counter."):]: int(v) for k, v in state.items() if k.startswith("counter.")}
        return out

    print(json.dumps({"history": history, "used": used, "failovers": chain.failovers, "reroutes": chain.reroutes,
                      "counters": worker.run(counters(), 60.0)}), flush=True)
    worker.run(swarm.close(), 5.0)
    worker.stop()
    dht.shutdown()
    return 0


def generate(args) -> int:
    from pollinate.node.announce import start_dht

    dht = start_dht(args.initial_peers, client_mode=True)  # before any gRPC object
    import torch

    from pollinate.client.remote_model import RemoteModelForCausalLM

    remote = RemoteModelForCausalLM.from_pretrained(args.model, dht=dht, cache_dir=args.cache_dir, job=args.job,
                                                    wire_codec="none")
    deadline = time.monotonic() + args.wait_s
    while args.generate_with_job not in [p.address for p in remote.worker.run(remote.swarm.peers(refresh=True), 30)]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{args.generate_with_job} not in the DHT after {args.wait_s} s")
        time.sleep(0.2)
    prompt = torch.arange(3, 9).unsqueeze(0)
    runs = []
    for _ in range(2):
        with remote.inference_session(max_length=14) as session:
            generated = remote.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            lacking = list(session._remote.lacking_job.values())
            runs.append({"generated": generated[0, 6:].tolist(), "route": [str(h) for h in session.route],
                         "lacking_job": [a for a, _ in lacking]})
        # the reference: a session that never meets ADDRESS (banned here) goes to a replica with the job at once
        (peer,) = [p for p in remote.worker.run(remote.swarm.peers(), 30) if p.address == args.generate_with_job]
        remote.swarm.ban(peer, RuntimeError("reference run without it"))
    print(json.dumps(runs), flush=True)
    remote.worker.run(remote.swarm.close(), 5.0)
    remote.worker.stop()
    dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
