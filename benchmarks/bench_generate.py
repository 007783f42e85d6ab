"""Remote vs local generation speed on a local swarm of the embedded SmolLM2.

Starts 3 nodes x 10 blocks on loopback, generates N greedy tokens for a fixed prompt
through the swarm and with the local model in the same process, and prints one JSON
object: remote_tokens_per_s, local_tokens_per_s, ratio (remote/local), tokens_match, hops,
and where a token's time goes (per hop: network + node compute, as the client sees it).
fp32 on the wire by default (--codec none) so tokens_match is an exact comparison;
--codec fp16 measures the default wire format.

    python benchmarks/bench_generate.py [--quick] [--tokens 64] [--codec none|fp16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from local_swarm import local_swarm  # benchmarks/ is on sys.path when run as a script

PROMPT = "Why is the sky blue?"
SPANS = [(0, 10), (10, 20), (20, 30)]


def main() -> int:
    p = argparse.ArgumentParser(description="remote vs local generation on a local SmolLM2 swarm")
    p.add_argument("--quick", action="store_true", help="16 tokens instead of --tokens")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--codec", default="none", help="wire codec for hidden states (none = fp32)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per node and for the local run")
    p.add_argument("--workdir", type=Path, help="keep node logs here (default: a temp dir)")
    args = p.parse_args()
    n = 16 if args.quick else args.tokens
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-generate-"))
    extra = ["--torch-threads", str(args.torch_threads), "--throughput", "100"]

    with local_swarm(workdir, model="smollm2", spans=SPANS, extra=extra) as swarm:
        from pollinate.client.remote_model import RemoteModelForCausalLM  # DHT first, then gRPC

        remote = RemoteModelForCausalLM.from_pretrained("smollm2", initial_peers=[swarm.maddr], wire_codec=args.codec)
        import torch

        torch.set_num_threads(args.torch_threads)
        files = remote.model_files
        tok = files.tokenizer()
        text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt").input_ids
        gen = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)

        local = files.load_reference_model()
        with torch.inference_mode():
            local.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
            t0 = time.perf_counter()
            local_out = local.generate(ids, **gen)[0, ids.shape[1]:].tolist()
            local_s = time.perf_counter() - t0

        remote.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up: channels, first DHT read
        with remote.inference_session(max_length=ids.shape[1] + n) as session:
            t0 = time.perf_counter()
            remote_out = remote.generate(ids, **gen)[0, ids.shape[1]:].tolist()
            remote_s = time.perf_counter() - t0
            hops = session.hop_seconds()
            route = [str(h) for h in session.route]
        remote.shutdown()

    steps = n  # one prefill step + (n - 1) one-token steps, one per generated token
    per_hop_ms = {name: round(1000 * s / steps, 2) for name, s in hops}
    result = {
        "bench": "generate",
        "model": "smollm2-135m-instruct",
        "tokens": n,
        "prompt_tokens": int(ids.shape[1]),
        "codec": args.codec,
        "remote_tokens_per_s": round(n / remote_s, 2),
        "local_tokens_per_s": round(n / local_s, 2),
        "ratio": round(local_s / remote_s, 3),
        "tokens_match": remote_out == local_out,
        "hops": len(route),
        "route": route,
        "ms_per_token_per_hop": per_hop_ms,
        "ms_per_token_client": round(1000 * (remote_s - sum(s for _, s in hops)) / steps, 2),
        "ms_per_token_local": round(1000 * local_s / n, 2),
        "torch_threads": args.torch_threads,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
