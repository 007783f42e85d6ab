"""The client side of bench_relay.py, run in the lab's client namespace: times greedy generation
through the swarm with some peers left out (so one run goes through the direct replica of a
span and another through the relayed one), and prints one JSON line per run.

    python benchmarks/relay_client.py --coordinator 10.77.0.1:7070 --token T --gen-tokens 32 \
        --run direct:ADDR_TO_AVOID --run relayed:ADDR_TO_AVOID [--reps 3] [--signal-file F]

Each --run is NAME:ADDRESS (the peer left out, by its announced address); runs alternate for
--reps rounds so both see the same machine load. With --signal-file the client writes that
file when the first timed run starts (bench_relay.py then kills a relay during it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wan_client import PROMPT  # noqa: E402  (the same chat prompt as bench_wan's generation)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--coordinator", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--cache-dir")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--run", action="append", required=True, metavar="NAME:AVOID",
                   help="a timed generation leaving out the peer announced at AVOID")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--signal-file", type=Path)
    p.add_argument("--torch-threads", type=int, default=1)
    args = p.parse_args()

    from pollinate.client.remote_model import RemoteModelForCausalLM  # its DHT forks: before gRPC

    model = RemoteModelForCausalLM.from_pretrained("smollm2", coordinator=args.coordinator, token=args.token,
                                                   cache_dir=args.cache_dir, wire_codec="fp16")
    import torch

    torch.set_num_threads(args.torch_threads)
    swarm_peers = model.swarm.peers
    avoid: set[str] = set()

    async def peers(*, refresh: bool = False):
        return [p for p in await swarm_peers(refresh=refresh) if p.address not in avoid]

    model.swarm.peers = peers  # routes see the swarm without the avoided peer
    try:
        tok = model.model_files.tokenizer()
        text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, return_tensors="pt").input_ids
        runs = [r.split(":", 1) for r in args.run]
        for name, address in runs:  # warm: routes and channels to both replicas
            avoid.clear()
            avoid.add(address)
            with model.inference_session(max_length=ids.shape[1] + 2):
                model.generate(ids[:, :4], max_new_tokens=1, do_sample=False)
        if args.signal_file:
            args.signal_file.write_text("started")
        for rep in range(args.reps):
            for name, address in runs:
                avoid.clear()
                avoid.add(address)
                t0 = time.perf_counter()
                with model.inference_session(max_length=ids.shape[1] + args.gen_tokens):
                    got = model.generate(ids, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
                                         do_sample=False)
                seconds = time.perf_counter() - t0
                tokens = got[0, ids.shape[1]:].tolist()
                print(json.dumps({"run": name, "rep": rep, "seconds": seconds, "tokens": tokens}), flush=True)
        return 0
    finally:
        model.shutdown()


if __name__ == "__main__":
    sys.exit(main())
