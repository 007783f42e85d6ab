"""A client process running several inference sessions at once, for the batching tests.

    python concurrent_client.py --model DIR --cache-dir C --initial-peers MADDR \
        --prompts 1,5,9/1,200,17 --max-new-tokens 12

Each prompt is one session (its own RemoteSession: one Inference stream per hop and a KV
cache on each node), all coroutines on the client's one event loop, so their steps reach the
nodes together and the nodes batch them. Greedy, with EOS masked as generate(min_new_tokens)
masks it. After the sessions, asks every node of the route for its Info (batch counters).
Prints one JSON line: {"tokens": [[...] per prompt], "loads": {address: {...ServingLoad}}}.
"""

from __future__ import annotations

import argparse
import json


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--cache-dir")
    p.add_argument("--initial-peers", nargs="*", default=[])
    p.add_argument("--prompts", required=True, help="token ids, comma-separated; prompts separated by /")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--eos", type=int, default=2)
    args = p.parse_args()

    from pollinate.client.remote_model import RemoteModelForCausalLM  # DHT before any gRPC object

    model = RemoteModelForCausalLM.from_pretrained(args.model, initial_peers=args.initial_peers,
                                                   cache_dir=args.cache_dir, wire_codec="none")
    import asyncio

    import torch

    from pollinate.client.session import RemoteSession
    from pollinate.protocol.channels import ChannelConfig, open_channel
    from pollinate.protocol.v1 import node_pb2, node_pb2_grpc

    prompts = [[int(x) for x in chunk.split(",")] for chunk in args.prompts.split("/")]
    part, n = model.client_part, args.max_new_tokens

    def next_token(hidden: torch.Tensor) -> int:
        with torch.inference_mode():
            logits = part.logits(hidden[:, -1:].to(part.dtype))[0, -1]
            logits[args.eos] = -float("inf")
            return int(logits.argmax())

    async def session(prompt: list[int]) -> tuple[list[int], list[str]]:
        remote = RemoteSession(model.swarm, max_length=len(prompt) + n)
        try:
            with torch.inference_mode():
                hidden = part.embed(torch.tensor([prompt]))
            got = []
            while len(got) < n:
                got.append(next_token(await remote.step(hidden)))
                with torch.inference_mode():
                    hidden = part.embed(torch.tensor([[got[-1]]]))
            return got, [str(h.peer.address) for h in remote.route]
        finally:
            await remote.close()

    async def info(address: str) -> dict:
        channel = open_channel(address, ChannelConfig())
        try:
            load = (await node_pb2_grpc.NodeStub(channel).Info(node_pb2.InfoRequest(), timeout=30)).load
            return {f.name: getattr(load, f.name) for f in load.DESCRIPTOR.fields}
        finally:
            await channel.close()

    async def run() -> dict:
        results = await asyncio.gather(*(session(prompt) for prompt in prompts))
        addresses = sorted({a for _, route in results for a in route})
        return {"tokens": [tokens for tokens, _ in results],
                "loads": {a: await info(a) for a in addresses}}

    try:
        print(json.dumps(model.worker.run(run(), 300)), flush=True)
    finally:
        model.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
