"""Greedy tokens through a local SmolLM2 swarm with each wire codec vs the local model.

Starts 3 nodes x 10 blocks on loopback, generates --tokens greedy tokens for each prompt
with the local model (this process) and through the swarm's Inference sessions with each
codec of --codecs on the wire (hidden states both ways), and prints one JSON object per
codec: identical (prompts whose tokens all equal the local model's), first_divergence (per
prompt, the index of the first differing token, null if none), token_agreement (share of
positions with the local model's token, over all prompts), and step_bytes: the bytes of
one decode step's hidden state with that codec
(frame header included: a one-token step is small).

    python benchmarks/bench_wire_agreement.py [--quick] [--tokens 48] [--codecs none,fp16,int8row,int4row]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from local_swarm import local_swarm  # benchmarks/ is on sys.path when run as a script

SPANS = [(0, 10), (10, 20), (20, 30)]
PROMPTS = [
    "Why is the sky blue?",  # bench_generate.py's prompt
    "Write a haiku about the sea.",
    "What is 47 + 38? Answer with just the number.",  # bench_finetune.py's task
    "List three uses of a paperclip.",
    "Explain what a neural network is in one sentence.",
]


def main() -> int:
    p = argparse.ArgumentParser(description="greedy token agreement of swarm generation per wire codec")
    p.add_argument("--quick", action="store_true", help="2 prompts, 16 tokens")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--codecs", default="none,fp16,int8row,int4row")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--workdir", type=Path, help="keep node logs here (default: a temp dir)")
    args = p.parse_args()
    n, prompts = (16, PROMPTS[:2]) if args.quick else (args.tokens, PROMPTS)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-wire-agreement-"))
    extra = ["--torch-threads", str(args.torch_threads), "--throughput", "100"]

    with local_swarm(workdir, model="smollm2", spans=SPANS, extra=extra) as swarm:
        from pollinate.client.remote_model import RemoteModelForCausalLM  # DHT first, then gRPC

        remote = RemoteModelForCausalLM.from_pretrained("smollm2", initial_peers=[swarm.maddr], wire_codec="none")
        import torch

        from pollinate.protocol.tensors import encode_tensor

        torch.set_num_threads(args.torch_threads)
        files = remote.model_files
        tok = files.tokenizer()
        gen = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
        inputs = []
        for prompt in prompts:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            inputs.append(tok(text, return_tensors="pt").input_ids)
        local = files.load_reference_model()
        with torch.inference_mode():
            expected = [local.generate(ids, **gen)[0, ids.shape[1]:].tolist() for ids in inputs]
        del local

        for codec in args.codecs.split(","):
            remote.swarm.config = dataclasses.replace(remote.swarm.config, wire_codec=codec)
            got = []
            for ids in inputs:
                with remote.inference_session(max_length=ids.shape[1] + n):
                    got.append(remote.generate(ids, **gen)[0, ids.shape[1]:].tolist())
            divergence = [next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), None)
                          for g, e in zip(got, expected)]
            same = sum(a == b for g, e in zip(got, expected) for a, b in zip(g, e))
            step = torch.randn(1, 1, files.config.hidden_size)
            print(json.dumps({
                "bench": "wire_agreement", "model": "smollm2-135m-instruct", "codec": codec,
                "prompts": len(prompts), "tokens": n,
                "identical": sum(d is None for d in divergence), "first_divergence": divergence,
                "token_agreement": round(same / (n * len(prompts)), 4),
                "step_bytes": len(encode_tensor(step, codec=codec).payload),
                "texts": [tok.decode(g[:24], skip_special_tokens=True) for g in got[:2]],
            }), flush=True)
        remote.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
