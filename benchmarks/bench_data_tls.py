"""What TLS on the data plane costs: the same generation through a plaintext swarm and a
`--data-tls` swarm of the embedded SmolLM2, in the same run.

Starts two swarms side by side on loopback (a coordinator and two nodes, blocks 0:15 and
15:30, each), one plaintext and one with `pollinate coordinator --data-tls`, then alternates
clients between them (plaintext, TLS, plaintext, ...; each a fresh process that takes the
swarm and its CA from the coordinator, as `pollinate generate` does) so that the machine's
load falls on both alike. Each client generates --tokens greedy tokens after a warm-up and
times --rpc-calls Info calls to one node on a warm channel. Prints one JSON object per
client run and a summary: median tokens/s and Info round trip per mode, their ratio, and
whether both swarms produced the same tokens.

    python benchmarks/bench_data_tls.py [--quick] [--tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Why is the sky blue?"
SPANS = [(0, 15), (15, 30)]
TOKEN = "bench-data-tls-token"


def client(args) -> dict:
    """One client run (in its own process: the DHT and the swarm CA are per process)."""
    from pollinate.client.remote_model import RemoteModelForCausalLM

    remote = RemoteModelForCausalLM.from_pretrained("smollm2", coordinator=args.coordinator, token=TOKEN)
    import torch

    torch.set_num_threads(args.torch_threads)
    tok = remote.model_files.tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    remote.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up: channels, handshakes, the DHT
    t0 = time.perf_counter()
    out = remote.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
    seconds = time.perf_counter() - t0
    rtt_ms = remote.worker.run(_info_round_trips(args.node, args.rpc_calls), 120.0)
    remote.shutdown()
    return {"tokens_per_s": round(args.tokens / seconds, 2), "info_rtt_ms": round(rtt_ms, 3),
            "tokens": out[0, ids.shape[1]:].tolist()}


async def _info_round_trips(address: str, calls: int) -> float:
    """Median milliseconds of one Info call on a warm channel (peer_channel_config: TLS in a
    --data-tls swarm)."""
    from pollinate.protocol.channels import open_channel, peer_channel_config
    from pollinate.protocol.v1 import node_pb2, node_pb2_grpc

    channel = open_channel(address, peer_channel_config(TOKEN))
    stub = node_pb2_grpc.NodeStub(channel)
    try:
        await stub.Info(node_pb2.InfoRequest(), timeout=30)  # connect (and handshake) outside the timing
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await stub.Info(node_pb2.InfoRequest(), timeout=30)
            times.append(time.perf_counter() - t0)
    finally:
        await channel.close()
    return 1000 * statistics.median(times)


def start_swarm(group, workdir: Path, mode: str, torch_threads: int):
    """(coordinator, nodes) of one swarm, ready."""
    coord = group.start(f"{mode}-coordinator", [
        "coordinator", "--data-dir", str(workdir / f"{mode}-data"), "--port", "0", "--http-port", "-1",
        "--token-file", str(workdir / "token"), "--model", "smollm2",
        *(["--data-tls"] if mode == "tls" else [])])
    group.wait_ready([coord], timeout=120)
    nodes = [group.start(f"{mode}-node-{i}", [
        "node", "--coordinator", coord.info["grpc"], "--token-file", str(workdir / "token"), "--model", "smollm2",
        "--blocks", f"{s}:{e}", "--throughput", "100", "--torch-threads", str(torch_threads)])
        for i, (s, e) in enumerate(SPANS)]
    group.wait_ready(nodes, timeout=600)
    return coord, nodes


def main() -> int:
    p = argparse.ArgumentParser(description="generation through a plaintext and a --data-tls SmolLM2 swarm")
    p.add_argument("--quick", action="store_true", help="8 tokens, 1 repeat, 50 Info calls")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="client runs per mode, alternating")
    p.add_argument("--rpc-calls", type=int, default=200, help="Info calls timed per client run")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--workdir", type=Path, help="keep the processes' logs here (default: a temp dir)")
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)  # one client run (internal)
    p.add_argument("--coordinator", help=argparse.SUPPRESS)
    p.add_argument("--node", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        print(json.dumps(client(args)), flush=True)
        return 0
    if args.quick:
        args.tokens, args.repeats, args.rpc_calls = 8, 1, 50
    from pollinate.procs import ProcGroup

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-data-tls-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "token").write_text(TOKEN + "\n")
    runs: dict[str, list[dict]] = {"plaintext": [], "tls": []}
    with ProcGroup(workdir) as group:
        swarms = {mode: start_swarm(group, workdir, mode, args.torch_threads) for mode in runs}
        for repeat in range(args.repeats):
            for mode, (coord, nodes) in swarms.items():
                done = subprocess.run(
                    [sys.executable, __file__, "--client", "--coordinator", coord.info["grpc"],
                     "--node", nodes[0].info["address"], "--tokens", str(args.tokens),
                     "--rpc-calls", str(args.rpc_calls), "--torch-threads", str(args.torch_threads)],
                    capture_output=True, text=True, timeout=900)
                if done.returncode != 0:
                    raise SystemExit(f"{mode} client failed:\n{done.stderr[-3000:]}\n{group.dump_logs()}")
                run = json.loads(done.stdout.strip().splitlines()[-1])
                runs[mode].append(run)
                print(json.dumps({"bench": "data_tls", "mode": mode, "repeat": repeat,
                                  "tokens_per_s": run["tokens_per_s"], "info_rtt_ms": run["info_rtt_ms"]}),
                      flush=True)
    tps = {m: statistics.median(r["tokens_per_s"] for r in rs) for m, rs in runs.items()}
    rtt = {m: statistics.median(r["info_rtt_ms"] for r in rs) for m, rs in runs.items()}
    print(json.dumps({
        "bench": "data_tls", "model": "smollm2-135m-instruct", "hops": len(SPANS), "tokens": args.tokens,
        "repeats": args.repeats, "plaintext_tokens_per_s": tps["plaintext"], "tls_tokens_per_s": tps["tls"],
        "tls_over_plaintext_tokens_per_s": round(tps["tls"] / tps["plaintext"], 3),
        "plaintext_info_rtt_ms": rtt["plaintext"], "tls_info_rtt_ms": rtt["tls"],
        "tokens_match": all(r["tokens"] == runs["plaintext"][0]["tokens"] for rs in runs.values() for r in rs),
    }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
