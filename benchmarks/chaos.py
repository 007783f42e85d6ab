"""Fault scenarios against a local swarm; each prints one JSON object per run.

    python benchmarks/chaos.py --scenario kill-node-during-generation [--model tiny|smollm2]

Scenarios are functions registered in SCENARIOS under their name; a scenario gets the
parsed args and a work directory and returns its JSON-able result (at least `scenario`
and `completed`). Coordinator and training scenarios plug in the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from local_swarm import local_swarm  # benchmarks/ is on sys.path when run as a script

SCENARIOS: dict[str, Callable[[argparse.Namespace, Path], dict]] = {}


def scenario(name: str):
    def register(fn):
        SCENARIOS[name] = fn
        return fn
    return register


def _model(args, workdir: Path) -> tuple[str, list[tuple[int, int]]]:
    """(model argument for nodes and client, spans A, B1, B2, C)."""
    if args.model == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import make_tiny_llama

        path = make_tiny_llama(workdir / "tiny-llama", num_blocks=4)
        return str(path), [(0, 1), (1, 3), (1, 3), (3, 4)]
    return args.model, [(0, 10), (10, 20), (10, 20), (20, 30)]


@scenario("kill-node-during-generation")
def kill_node_during_generation(args: argparse.Namespace, workdir: Path) -> dict:
    """SIGKILL the middle-span replica in use after token --kill-after; compare with a no-fault run."""
    model, spans = _model(args, workdir)
    cache = str(workdir / "cache") if args.model == "tiny" else None
    if cache:  # convert once here, not in every node at the same time
        from pollinate.node.model_files import open_model

        open_model(model, cache_dir=cache, show_progress=False)
    extra = ["--torch-threads", "1", "--throughput", "100"]
    with local_swarm(workdir, model=model, spans=spans, cache_dir=cache, extra=extra) as swarm:
        from pollinate.client.remote_model import RemoteModelForCausalLM

        remote = RemoteModelForCausalLM.from_pretrained(
            model, initial_peers=[swarm.maddr], cache_dir=cache, wire_codec="none", ban_base_s=60.0
        )
        import torch
        from transformers.generation.streamers import BaseStreamer

        ids = torch.tensor([[1, 5, 9, 33, 70, 12, 8]])
        gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        baseline = remote.generate(ids, **gen)[0, ids.shape[1]:].tolist()

        by_address = {p.info["address"]: p for p in swarm.nodes}
        stamps: list[float] = []
        killed: list[str] = []

        class KillAfter(BaseStreamer):
            def put(self, value):
                stamps.append(time.perf_counter())
                if len(stamps) == args.kill_after + 1:  # the prompt comes first
                    victim = remote.active_session.route[1].peer.address
                    by_address[victim].kill()
                    killed.append(victim)

            def end(self):
                pass

        with remote.inference_session(max_length=ids.shape[1] + args.tokens) as session:
            faulted = remote.generate(ids, streamer=KillAfter(), **gen)[0, ids.shape[1]:].tolist()
            failovers, recovery_s = session.failovers, session.recovery_seconds
            route = [str(h) for h in session.route]
        remote.shutdown()
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    k = args.kill_after
    return {
        "scenario": "kill-node-during-generation",
        "model": args.model,
        "completed": len(faulted) == args.tokens,
        "tokens_match": faulted == baseline,
        "recovery_s": round(recovery_s, 3),
        "failover_token_s": round(gaps[k - 1], 3) if len(gaps) >= k else None,
        "median_token_s": round(sorted(gaps)[len(gaps) // 2], 4) if gaps else None,
        "failovers": failovers,
        "killed": killed,
        "route_after": route,
        "tokens": args.tokens,
    }


def _http_status(coord) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://{coord.info['http']}/api/v1/status", timeout=5) as r:
        return json.loads(r.read())


@scenario("coordinator-restart")
def coordinator_restart(args: argparse.Namespace, workdir: Path) -> dict:
    """Nodes started with --coordinator only; SIGKILL the coordinator, generate through the
    swarm while it is down (fresh DHT lookup), restart it on the same data dir, and check
    that the same members continue at the same epoch."""
    from procs import ProcGroup

    model, _ = _model(args, workdir)
    cache = str(workdir / "cache") if args.model == "tiny" else None
    from pollinate.node.model_files import open_model

    files = open_model(model, cache_dir=cache, show_progress=False)  # convert once, up front
    per_node = -(-files.num_blocks // 3)
    token = workdir / "token"
    token.write_text("chaos-token\n")

    def coordinator(name: str, port: int = 0):
        return group.start(name, [
            "coordinator", "--data-dir", str(workdir / "coord-data"), "--port", str(port),
            "--http-port", "0", "--token-file", str(token), "--model", model,
            "--num-blocks", str(files.num_blocks), "--heartbeat-period", "0.25", "--lease", "2",
            "--restart-grace", "3",
        ])

    with ProcGroup(workdir) as group:
        coord = coordinator("coordinator-1")
        group.wait_ready([coord], timeout=90)
        address = coord.info["grpc"]
        nodes = [group.start(f"node-{i}", [
            "node", "--coordinator", address, "--token-file", str(token), "--model", model,
            *(["--cache-dir", cache] if cache else []), "--num-blocks", str(per_node),
            "--torch-threads", "1", "--throughput", "100",
        ]) for i in range(3)]
        group.wait_ready(nodes, timeout=300)
        before = _http_status(coord)

        from pollinate.client.remote_model import RemoteModelForCausalLM

        remote = RemoteModelForCausalLM.from_pretrained(
            model, coordinator=address, token="chaos-token", cache_dir=cache, wire_codec="none")
        import torch

        ids = torch.tensor([[1, 5, 9, 33, 70, 12, 8]])
        gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        try:
            baseline = remote.generate(ids, **gen)[0, ids.shape[1]:].tolist()
            coord.kill()
            killed_at = time.perf_counter()
            # Forget the cached routes: the peers must come from the DHT with the coordinator gone.
            peers = remote.worker.run(remote.swarm.peers(refresh=True), 60.0)
            during = remote.generate(ids, **gen)[0, ids.shape[1]:].tolist()
            outage_generation_s = time.perf_counter() - killed_at
        finally:
            remote.shutdown()
        restarted = coordinator("coordinator-2", port=int(address.rsplit(":", 1)[1]))
        group.wait_ready([restarted], timeout=90)
        restart_wall = time.time()
        deadline = time.monotonic() + 15.0
        after = _http_status(restarted)
        while (not all(m["last_heartbeat_at"] > restart_wall for m in after["members"])
               and time.monotonic() < deadline):
            time.sleep(0.1)
            after = _http_status(restarted)
    ids_before = sorted(m["member_id"] for m in before["members"])
    ids_after = sorted(m["member_id"] for m in after["members"])
    return {
        "scenario": "coordinator-restart",
        "model": args.model,
        "completed": ids_before == ids_after and during == baseline,
        "members_before": len(ids_before),
        "members_after": len(ids_after),
        "same_members": ids_before == ids_after,
        "epoch_before": before["epoch"],
        "epoch_after": after["epoch"],
        "epoch_continued": after["epoch"] >= before["epoch"] > 0,
        "generation_during_outage": during == baseline and len(during) == args.tokens,
        "dht_peers_during_outage": len(peers),
        "outage_generation_s": round(outage_generation_s, 3),
        "heartbeats_resumed": all(m["last_heartbeat_at"] > restart_wall for m in after["members"]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description="fault scenarios against a local swarm")
    p.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    p.add_argument("--model", default="tiny", help="'tiny' (random 4-block Llama, fast) or 'smollm2'")
    p.add_argument("--tokens", type=int, default=16, help="tokens to generate")
    p.add_argument("--kill-after", type=int, default=5, help="kill after this many generated tokens")
    p.add_argument("--workdir", type=Path)
    args = p.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
    result = SCENARIOS[args.scenario](args, workdir)
    print(json.dumps(result), flush=True)
    return 0 if result.get("completed") and result.get("tokens_match", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
