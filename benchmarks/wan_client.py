"""The trainer/client side of bench_wan.py, run inside the lab's trainer namespace: trains
one job on one wire codec, reading the lab's interface counters around the training itself,
and prints one JSON line.

    python benchmarks/wan_client.py --coordinator 10.77.0.1:7070 --token T --job wan-20-fp32 \
        --codec none --steps 4 --round-steps 2 --count coord=NS,node-0=NS,...

With --gen-slots N --gen-repeats R it times greedy generation instead, R x N times, in a
handshake with bench_wan.py (which sets the links' rate between samples, so the rates'
samples interleave): before each sample it prints {"slot": i} and waits for a line on
stdin, then prints {"slot": i, "gen_tokens": ..., "gen_seconds": ...}.

Counters are read with `ip -n NS -s -j link` (benchmarks/netlab.py), which needs root but
no route: the namespaces are named, not dialed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = "Explain why the sky is blue in a few sentences."


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--coordinator", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--cache-dir")
    p.add_argument("--job", default="")
    p.add_argument("--codec", default="none", help="the trainer's wire codec (TrainConfig.wire_codec)")
    p.add_argument("--grad-codec", default="", help="the gradients' codec (TrainConfig.grad_codec; '': as --codec)")
    p.add_argument("--no-keep-inputs", dest="keep_inputs", action="store_false",
                   help="every Backward re-sends its input (TrainConfig.keep_inputs off)")
    p.add_argument("--data", type=Path)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--round-steps", type=int, default=0)
    p.add_argument("--eval-examples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens per generation sample")
    p.add_argument("--gen-slots", type=int, default=0,
                   help="generation mode: samples per repeat, one per slot (bench_wan: one per rate)")
    p.add_argument("--gen-repeats", type=int, default=1, help="generation mode: repeats of the slots")
    p.add_argument("--count", default="", help="name=namespace,... whose eth0 counters to read")
    p.add_argument("--torch-threads", type=int, default=1)
    args = p.parse_args()

    from pollinate.client.remote_model import RemoteModelForCausalLM  # its DHT forks: before gRPC

    model = RemoteModelForCausalLM.from_pretrained("smollm2", coordinator=args.coordinator, token=args.token,
                                                   cache_dir=args.cache_dir, wire_codec="fp16")
    import torch

    from netlab import read_counters
    from pollinate.client.trainer import TrainConfig, Trainer
    from pollinate.client.training_data import batches, read_records, split, tokenize
    from pollinate.protocol.shared import JobSpec

    torch.set_num_threads(args.torch_threads)
    namespaces = dict(item.split("=", 1) for item in args.count.split(",") if item)
    out: dict = {"job": args.job, "codec": args.codec}
    try:
        tok = model.model_files.tokenizer()
        if args.gen_slots:
            generate_samples(model, tok, args)
            return 0
        if not (args.job and args.data and args.steps > 0 and args.round_steps > 0 and namespaces):
            p.error("training needs --job, --data, --steps, --round-steps and --count")
        examples = tokenize(read_records(args.data), tok, max_length=2048, path=args.data)
        train, held = split(examples, 0.1, args.seed)
        held = held[:args.eval_examples]
        spec = JobSpec(round_steps=args.round_steps, seed=args.seed)
        config = TrainConfig(job=args.job, spec=spec, steps=args.steps, batch_size=args.batch_size,
                             wire_codec=args.codec, grad_codec=args.grad_codec, keep_inputs=args.keep_inputs, seed=args.seed)
        trainer = Trainer(swarm=model.swarm, worker=model.worker, client_part=model.model_files.load_client_part(),
                          pad_id=tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0),
                          config=config)
        input_tokens = 0

        def counted(source):
            nonlocal input_tokens
            for batch in source:
                input_tokens += sum(len(e.input_ids) for e in batch)
                yield batch

        before = read_counters(namespaces)
        t0 = time.perf_counter()
        history = trainer.train(counted(batches(train, config.batch_size, config.seed)), progress=False)
        out["train_seconds"] = time.perf_counter() - t0
        after = read_counters(namespaces)
        out["wire_bytes_by_kind"] = dict(trainer.chain.bytes_by_kind)
        out["counters"] = {name: [after[name][0] - before[name][0], after[name][1] - before[name][1]]
                           for name in namespaces}
        out["input_tokens"] = input_tokens
        out["trained_tokens"] = history[-1]["tokens"]
        out["train_loss"] = history[-1]["loss"]
        out["eval_loss"] = trainer.evaluate(held)
        out["eval_examples"] = len(held)
        print(json.dumps(out), flush=True)
        return 0
    finally:
        model.shutdown()


def generate_samples(model, tok, args) -> None:
    """The handshake of generation mode (module docstring): R x N timed greedy generations."""
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    with model.inference_session(max_length=ids.shape[1] + args.gen_tokens + 1):
        model.generate(ids[:, :4], max_new_tokens=1, do_sample=False)  # routes, channels: warm
    for _ in range(args.gen_repeats):
        for slot in range(args.gen_slots):
            print(json.dumps({"slot": slot}), flush=True)
            if not sys.stdin.readline():
                raise SystemExit("wan_client: stdin closed before the sample's go-ahead")
            t0 = time.perf_counter()
            with model.inference_session(max_length=ids.shape[1] + args.gen_tokens):
                got = model.generate(ids, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
                                     do_sample=False)
            print(json.dumps({"slot": slot, "gen_tokens": int(got.shape[1] - ids.shape[1]),
                              "gen_seconds": time.perf_counter() - t0}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
