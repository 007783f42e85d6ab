"""Concurrent sessions on one node: batched steps against one step at a time, same run.

One node process hosts all 30 blocks of the embedded SmolLM2 (`pollinate node --blocks 0:30`,
started as the other benchmarks start theirs: benchmarks/local_swarm.py). For each count of
concurrent sessions (1, 2, 4, 8, 16), one client process runs that many sessions at once,
each generating greedily from its own prompt: every session is a coroutine on the client's
event loop with its own RemoteSession (its own Inference stream and KV cache on the node);
the client's LM heads run as one product over the replies that are in (users would each
run theirs on their own machine; here they share the node's CPU). The same counts run on two
nodes started together, one with batching (the node's defaults) and one with batching off
(`--max-batch-sessions 1`: one step at a time, as before issue 16), each with its own client
process; the two take turns at each count, so both meet the same load from anything else
on the machine.

One JSON object per (mode, count): sessions, aggregate_tokens_per_s (all sessions' tokens
÷ wall time), p50/p99_ms_per_token (a session's time per generated token after its first),
tokens_match (every session equals the local model's greedy tokens for its prompt, computed
in this process before the nodes start), and the node's own count of its passes and steps
during that run (its Info), whence sessions_per_pass. Then a summary: speedup_8 (batched, aggregate
tokens/s at 8 sessions ÷ at 1), the same ratio without batching, and batched ÷ unbatched at
each count. fp32 on the wire, so tokens_match is an exact comparison.

    python benchmarks/bench_concurrency.py [--quick] [--tokens 32] [--counts 1,2,4,8,16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from local_swarm import local_swarm  # benchmarks/ is on sys.path when run as a script

QUESTIONS = [
    "Why is the sky blue?", "What is the capital of France?", "Name three primary colors.",
    "How do bees make honey?", "What is 12 times 7?", "Write a haiku about rain.",
    "Who wrote Hamlet?", "Explain gravity to a child.", "What is a prime number?",
    "Give me a synonym for happy.", "How far is the Moon?", "What do plants need to grow?",
    "Translate 'good morning' to Spanish.", "What is photosynthesis?", "Why do cats purr?",
    "List two uses of copper.",
]
MODES = {"batched": [], "unbatched": ["--max-batch-sessions", "1"]}


def prompts_and_reference(tokens: int, threads: int) -> dict:
    """The prompts' token ids and the local model's greedy continuation of each."""
    import torch

    from pollinate.node.model_files import open_model

    torch.set_num_threads(threads)
    files = open_model("smollm2", show_progress=False)
    tok = files.tokenizer()
    model = files.load_reference_model()
    prompts, expected = [], []
    with torch.inference_mode():
        for q in QUESTIONS:
            text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            ids = tok(text, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            prompts.append(ids[0].tolist())
            expected.append(out[0, ids.shape[1]:].tolist())
    eos = files.generation_config().eos_token_id
    return {"prompts": prompts, "expected": expected, "eos": eos if isinstance(eos, list) else [eos]}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def client(args) -> int:
    """The client process: runs each count of concurrent sessions and prints one JSON per count."""
    from pollinate.client.remote_model import RemoteModelForCausalLM  # DHT before any gRPC object

    model = RemoteModelForCausalLM.from_pretrained("smollm2", initial_peers=[args.maddr], wire_codec="none")
    import asyncio

    import torch

    from pollinate.client.session import RemoteSession
    from pollinate.protocol.channels import ChannelConfig, open_channel
    from pollinate.protocol.v1 import node_pb2, node_pb2_grpc

    torch.set_num_threads(1)
    ref = json.loads(Path(args.reference).read_text())
    part, n = model.client_part, args.tokens

    def next_tokens(last: list[torch.Tensor]) -> list[int]:
        """Greedy next tokens from the sessions' last hidden states (1, 1, hidden) each."""
        with torch.inference_mode():
            logits = part.logits(torch.cat(last, dim=1).to(part.dtype))[0]
            logits[:, ref["eos"]] = -float("inf")  # as generate(min_new_tokens=n) does for the reference
            return logits.argmax(-1).tolist()

    # The sessions' LM heads run as one product over the replies that are in (each row its
    # own session's): N users would each run theirs on their own machine; here they share the
    # node's two cores, and N separate 49152 x 576 products would take more CPU than the node.
    heads: list[tuple[torch.Tensor, asyncio.Future]] = []
    draining: list[asyncio.Task] = []

    async def drain() -> None:
        while heads:
            batch = heads[:]
            heads.clear()
            for (_, future), token in zip(batch, await asyncio.to_thread(next_tokens, [h for h, _ in batch])):
                future.set_result(token)
        draining.clear()

    async def next_token(hidden: torch.Tensor) -> int:
        future = asyncio.get_running_loop().create_future()
        heads.append((hidden[:, -1:], future))
        if not draining:
            draining.append(asyncio.create_task(drain()))
        return await future

    def embed(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return part.embed(torch.tensor([ids]))

    async def node_load(address: str):
        """The node's ServingLoad (node/batching.py), from its Info."""
        channel = open_channel(address, ChannelConfig())
        try:
            return (await node_pb2_grpc.NodeStub(channel).Info(node_pb2.InfoRequest(), timeout=30)).load
        finally:
            await channel.close()

    async def session(i: int, tokens: int) -> tuple[list[int], list[float]]:
        prompt = ref["prompts"][i % len(ref["prompts"])]
        remote = RemoteSession(model.swarm, max_length=len(prompt) + tokens)
        try:
            token = await next_token(await remote.step(embed(prompt)))
            got, per_token = [token], []
            while len(got) < tokens:
                t0 = time.perf_counter()
                token = await next_token(await remote.step(embed([token])))
                per_token.append(time.perf_counter() - t0)
                got.append(token)
            return got, per_token
        finally:
            await remote.close()

    async def run(count: int, tokens: int) -> dict:
        before = await node_load(args.node)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(session(i, tokens) for i in range(count)))
        wall = time.perf_counter() - t0
        after = await node_load(args.node)
        passes, steps = after.passes - before.passes, after.steps - before.steps
        busy = after.busy_s - before.busy_s
        per_token = [s for _, times in results for s in times]
        wrong = [i for i, (got, _) in enumerate(results) if got != ref["expected"][i % len(ref["expected"])][:tokens]]
        if wrong:
            print(json.dumps({"mismatch": [[results[i][0], ref["expected"][i % len(ref["expected"])][:tokens]] for i in wrong]}), file=sys.stderr)
        return {"sessions": count, "aggregate_tokens_per_s": round(count * tokens / wall, 3),
                "p50_ms_per_token": round(1000 * _percentile(per_token, 0.5), 1),
                "p99_ms_per_token": round(1000 * _percentile(per_token, 0.99), 1),
                "tokens_match": not wrong, "sessions_differing": wrong, "wall_s": round(wall, 2),
                # the node's own count for this run: its passes and the sessions' steps in them
                "node_passes": passes, "node_steps": steps,
                "sessions_per_pass": round(steps / passes, 2) if passes else None,
                # how much of the wall time the node computed, and its rate while it did: the
                # rest it waited for the clients (here on the same CPU as the node)
                "node_busy_fraction": round(busy / wall, 3),
                "node_steps_per_busy_s": round(steps / busy, 2) if busy else None}

    try:
        model.worker.run(run(2, 2), 600)  # warm-up: channels, the first DHT read
        print("ready", flush=True)
        for line in sys.stdin:  # one count per line from main, so the modes take turns
            result = model.worker.run(run(int(line), n), 3600)
            print(json.dumps({"bench": "concurrency", "mode": args.mode, **result, "tokens": n}), flush=True)
    finally:
        model.shutdown()
    return 0


def _expect(proc: subprocess.Popen, swarm, start: str) -> str:
    """The client's next stdout line, which must start with `start`; else its failure."""
    line = proc.stdout.readline().strip()
    if not line.startswith(start):
        print(swarm.group.dump_logs(), file=sys.stderr)
        raise SystemExit(f"client said {line!r} (exit code {proc.poll()})")
    return line


def _finish(proc: subprocess.Popen) -> None:
    proc.stdin.close()  # the client's loop ends
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description="concurrent sessions on one SmolLM2 node, batched vs one at a time")
    p.add_argument("--quick", action="store_true", help="8 tokens per session instead of --tokens")
    p.add_argument("--tokens", type=int, default=32, help="tokens each session generates (default %(default)s)")
    p.add_argument("--counts", default="1,2,4,8,16", help="concurrent session counts (default %(default)s)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads of the node (default %(default)s)")
    p.add_argument("--batch-window-ms", type=float, help="the batched node's --batch-window-ms (default: the node's)")
    p.add_argument("--modes", default="batched,unbatched", help="which runs: batched, unbatched or both")
    p.add_argument("--workdir", type=Path, help="keep node logs here (default: a temp dir)")
    # the client process (started by main with these)
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--maddr", help=argparse.SUPPRESS)
    p.add_argument("--node", help=argparse.SUPPRESS)
    p.add_argument("--reference", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.counts = [int(c) for c in args.counts.split(",")]
    if args.quick:
        args.tokens = 8
    if args.client:
        return client(args)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-concurrency-"))
    workdir.mkdir(parents=True, exist_ok=True)
    reference = workdir / "reference.json"
    if not reference.exists() or json.loads(reference.read_text())["tokens"] != args.tokens:
        reference.write_text(json.dumps({"tokens": args.tokens, **prompts_and_reference(args.tokens, args.torch_threads)}))
    results: dict[str, dict[int, dict]] = {}
    modes = args.modes.split(",")
    with contextlib.ExitStack() as stack:
        clients = {}
        for mode in modes:  # a node and a client per mode, all up before the first run
            extra = ["--torch-threads", str(args.torch_threads), "--throughput", "100", *MODES[mode]]
            if mode == "batched" and args.batch_window_ms is not None:
                extra += ["--batch-window-ms", str(args.batch_window_ms)]
            swarm = stack.enter_context(local_swarm(workdir / mode, model="smollm2", spans=[(0, 30)], extra=extra))
            cmd = [sys.executable, __file__, "--client", "--maddr", swarm.maddr, "--node",
                   swarm.nodes[0].info["address"], "--reference", str(reference), "--mode", mode,
                   "--tokens", str(args.tokens)]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            stack.callback(_finish, proc)
            clients[mode] = (proc, swarm)
            results[mode] = {}
        for mode, (proc, swarm) in clients.items():
            _expect(proc, swarm, "ready")
        # The modes take turns at each count, so both see the same load from whatever else
        # runs on the machine (the benchmark's machine may be shared).
        for count in args.counts:
            for mode, (proc, swarm) in clients.items():
                proc.stdin.write(f"{count}\n")
                proc.stdin.flush()
                line = _expect(proc, swarm, "{")
                results[mode][count] = json.loads(line)
                print(line, flush=True)

    def rate(mode: str, count: int) -> float | None:
        row = results.get(mode, {}).get(count)
        return row["aggregate_tokens_per_s"] if row else None

    def busy_rate(mode: str, count: int) -> float | None:
        row = results.get(mode, {}).get(count)
        return row["node_steps_per_busy_s"] if row else None

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    summary = {
        "bench": "concurrency", "summary": True, "model": "smollm2-135m-instruct", "blocks": "0:30",
        "tokens": args.tokens, "torch_threads": args.torch_threads,
        "batch_window_ms": args.batch_window_ms if args.batch_window_ms is not None else "node default",
        "speedup_8": ratio(rate("batched", 8), rate("batched", 1)),
        "speedup_8_unbatched": ratio(rate("unbatched", 8), rate("unbatched", 1)),
        # the same ratio for the node's rate while busy (its capacity, clients' pace aside)
        "node_speedup_8": ratio(busy_rate("batched", 8), busy_rate("batched", 1)),
        "batched_vs_unbatched": {c: ratio(rate("batched", c), rate("unbatched", c)) for c in args.counts},
        "tokens_match": all(r["tokens_match"] for rows in results.values() for r in rows.values()),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
