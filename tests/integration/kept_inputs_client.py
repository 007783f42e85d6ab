"""A trainer process for test_kept_inputs.py, against real nodes A [0:2] and B [2:4].

    python kept_inputs_client.py --model DIR --cache-dir C --initial-peers MADDR --dir D

1. The same job trained twice, once with kept inputs and once re-sending them: the losses
   and the adapters must come out identical, and the encoded bytes each trainer sent and
   received must be exactly what the protocol says (per micro-batch of tensors of T bytes:
   kept 4T sent, re-sent 6T; both 3T received, the first hop returning no input gradient).
2. A Backward naming a keep_id the node never kept: the trainer gets InputNotKept, re-sends,
   and its input gradient equals a plain Backward's on an identical job.
3. Bad requests (keep_id with hidden_states, another job's keep_id, wrong grad shape, an
   over-long keep_id, skip_grad_inputs or keep_id without a job): each INVALID_ARGUMENT,
   and the kept input is still there for the correct Backward afterwards.
4. Forward with keep ids, then DIR/forwarded.json (B's address) and wait for DIR/restarted:
   the test SIGKILLs B and starts a new node on B's port; the Backward must get
   InputNotKept from it, re-send, and finish.

Prints one JSON line with what the test asserts on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    for name in ("--model", "--cache-dir", "--dir"):
        p.add_argument(name, required=True)
    p.add_argument("--initial-peers", nargs="+", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--wait-s", type=float, default=180.0)
    args = p.parse_args()
    signals = Path(args.dir)

    from pollinate.node.announce import start_dht

    dht = start_dht(args.initial_peers, client_mode=True)  # before any gRPC object
    import torch

    from pollinate.client.config import ClientConfig
    from pollinate.client.swarm import Swarm
    from pollinate.client.trainer import KeptInput, Trainer, TrainConfig
    from pollinate.client.training_data import Example
    from pollinate.client.worker import LoopThread
    from pollinate.node.model_files import open_model
    from pollinate.protocol.shared import JobSpec
    from pollinate.protocol.errors import InvalidRequest, PollinateError
    from pollinate.protocol.tensors import encode_tensor
    from pollinate.protocol.v1 import common_pb2, node_pb2

    files = open_model(args.model, cache_dir=args.cache_dir, show_progress=False)
    worker = LoopThread()
    swarm = Swarm(dht=dht, model_id=args.model, num_blocks=files.num_blocks, config=ClientConfig(wire_codec="none"))
    part = files.load_client_part()
    spec = JobSpec(rank=4, alpha=8.0, lr=1e-2, seed=3)
    batch, seq = 2, 12

    def trainer(job: str, keep: bool) -> Trainer:
        config = TrainConfig(job=job, spec=spec, steps=args.steps, batch_size=batch, wire_codec="none",
                             keep_inputs=keep)
        return Trainer(swarm=swarm, worker=worker, client_part=part, pad_id=0, config=config, timeout_s=30.0)

    def data():
        g = torch.Generator().manual_seed(1)
        ids = [torch.randint(3, 256, (batch, seq), generator=g) for _ in range(args.steps)]
        return iter([[Example(input_ids=r.tolist(), labels=r.tolist()) for r in x] for x in ids])

    out: dict = {}
    # 1. kept vs re-sent: same math, fewer bytes
    kept, sent = trainer("kept", True), trainer("sent", False)
    out["kept_history"] = kept.train(data(), progress=False)
    out["sent_history"] = sent.train(data(), progress=False)
    state_kept, state_sent = kept.adapter_state(), sent.adapter_state()
    out["adapters_equal"] = sorted(state_kept) == sorted(state_sent) and all(
        torch.equal(state_kept[k], state_sent[k]) for k in state_kept)
    out["adapter_keys"] = len(state_kept)
    out["tensor_bytes"] = len(encode_tensor(torch.zeros(batch, seq, files.config.hidden_size)).payload)
    out["kept_bytes"] = [kept.chain.bytes_sent, kept.chain.bytes_received, kept.chain.resends]
    out["sent_bytes"] = [sent.chain.bytes_sent, sent.chain.bytes_received, sent.chain.resends]

    chain = trainer("fallback", True).chain
    ref = trainer("reference", True).chain

    async def route():
        return await swarm.route(0, swarm.num_blocks)

    hops = worker.run(route(), 60)
    hop_a, hop_b = hops
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(batch, seq, files.config.hidden_size, generator=g)
    grad = torch.randn(batch, seq, files.config.hidden_size, generator=g)

    # 2. a keep_id the node never saw: InputNotKept, re-send, the same gradient as a plain Backward
    async def fallback():
        got = await chain.backward_hop(hop_b, hidden, grad, keep_id=f"{chain._keep_prefix}-never-kept")
        want = await ref.backward_hop(hop_b, hidden, grad)
        return got, want

    got, want = worker.run(fallback(), 60)
    out["fallback_resends"] = chain.resends
    out["fallback_equal"] = bool(torch.equal(got, want))

    # 3. bad requests leave the kept input in place
    def header(**kw):
        fields = dict(job=chain.job, blocks=common_pb2.Span(start=hop_b.start, end=hop_b.end), spec=chain.spec_msg)
        fields.update(kw)
        return node_pb2.BackwardRequest(header=node_pb2.BackwardHeader(**fields))

    def tensor(t, name):
        return [node_pb2.BackwardRequest(tensor=c) for c in encode_tensor(t, name=name).chunks()]

    async def bad_requests():
        keep_id = chain.new_keep_id()
        await chain.forward_hop(hop_b, hidden, keep_id=keep_id)
        cases = {
            "hidden_with_keep_id": [header(keep_id=keep_id)] + tensor(hidden, "hidden_states") + tensor(grad, "grad_outputs"),
            "other_job": [header(job="reference", spec=chain.spec_msg, keep_id=keep_id)] + tensor(grad, "grad_outputs"),
            "wrong_grad_shape": [header(keep_id=keep_id)] + tensor(grad[:, :5], "grad_outputs"),
            "long_keep_id": [header(keep_id="k" * 65)] + tensor(grad, "grad_outputs"),
            "skip_without_job": [header(job="", spec=None, skip_grad_inputs=True)],
            "keep_without_job": [header(job="", spec=None, keep_id=keep_id)] + tensor(grad, "grad_outputs"),
        }
        refused = {}
        for name, reqs in cases.items():
            try:
                await chain._call(hop_b, "Backward", reqs)
                refused[name] = "accepted"
            except InvalidRequest as e:
                refused[name] = str(e)
            except PollinateError as e:  # recorded, not raised: the test names what came back instead
                refused[name] = f"{type(e).__name__}: {e}"
        try:
            await chain._call(hop_b, "Forward", [node_pb2.ForwardRequest(header=node_pb2.ForwardHeader(
                job="", blocks=common_pb2.Span(start=hop_b.start, end=hop_b.end), keep_id="x"))]
                + [node_pb2.ForwardRequest(tensor=c) for c in encode_tensor(hidden, name="hidden_states").chunks()])
            refused["forward_keep_without_job"] = "accepted"
        except InvalidRequest as e:
            refused["forward_keep_without_job"] = str(e)
        except PollinateError as e:
            refused["forward_keep_without_job"] = f"{type(e).__name__}: {e}"
        resends = chain.resends
        after = await chain.backward_hop(hop_b, hidden, grad, keep_id=keep_id)  # still kept: no re-send
        return refused, chain.resends - resends, after

    refused, extra_resends, after = worker.run(bad_requests(), 120)
    out["refused"] = refused
    out["resends_after_bad_requests"] = extra_resends
    out["grad_after_bad_requests_finite"] = bool(torch.isfinite(after).all())

    # 4. the node that kept the input is SIGKILLed and replaced on its address
    restart = trainer("restart", True)

    async def forward_then_wait():
        embedded = part.embed(torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(5)))
        return await restart.chain.forward(embedded)

    route_, inputs, last = worker.run(forward_then_wait(), 60)
    (signals / "forwarded.json").write_text(json.dumps({"address": route_[1].peer.address}))
    deadline = time.monotonic() + args.wait_s
    while not (signals / "restarted").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {signals / 'restarted'} after {args.wait_s} s")
        time.sleep(0.05)
    hops_used = worker.run(restart.chain.backward(route_, inputs, torch.ones_like(last) * 1e-3), 120)
    out["restart_resends"] = restart.chain.resends
    out["restart_failovers"] = restart.chain.failovers
    out["restart_hops"] = [h.peer.address for h in hops_used]
    out["keep_ids_sent"] = [isinstance(x, KeptInput) and x.keep_id is not None for x in inputs]

    async def counters():
        result = {}
        for hop in hops_used:
            state = await restart.chain.fetch_state(hop)
            result[f"{hop.start}:{hop.end}"] = {k[len("counter."):]: int(v) for k, v in state.items()
                                               if k.startswith("counter.")}
        return result

    out["restart_counters"] = worker.run(counters(), 60)
    print(json.dumps(out), flush=True)
    worker.run(swarm.close(), 5.0)
    worker.stop()
    dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
