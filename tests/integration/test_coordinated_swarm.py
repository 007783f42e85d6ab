"""A swarm that needs only the coordinator's address: a coordinator and three real node
processes started with `--coordinator` alone (no --blocks, no DHT peers), clients that get
their DHT peers from it, and the coordinator killed and restarted under them.

Named faults: kill(coordinator) while the swarm serves; restart it on the same data dir.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from procs import ProcGroup

CLIENT = str(Path(__file__).with_name("serving_client.py"))
TOKEN = "coordinated-swarm-token"
PROMPT = [1, 5, 9, 33, 70, 12, 8]
NEW_TOKENS = 8
PERIOD_S, LEASE_S, GRACE_S = 0.25, 2.0, 3.0


def start_coordinator(group, tmp: Path, name: str, model: Path, port: int = 0):
    return group.start(name, [
        "coordinator", "--data-dir", str(tmp / "coord-data"), "--port", str(port), "--http-port", "0",
        "--token-file", str(tmp / "token"), "--model", str(model), "--num-blocks", "4",
        "--heartbeat-period", str(PERIOD_S), "--lease", str(LEASE_S), "--restart-grace", str(GRACE_S),
    ])


def status(coord) -> dict:
    with urllib.request.urlopen(f"http://{coord.info['http']}/api/v1/status", timeout=5) as r:
        return json.loads(r.read())


def generate(model: Path, cache: Path, *peer_args: str) -> list[int]:
    done = subprocess.run(
        [sys.executable, CLIENT, "--model", str(model), "--cache-dir", str(cache), "--token", TOKEN,
         "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW_TOKENS), *peer_args],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["tokens"]


def test_nodes_started_with_only_the_coordinator_serve_and_survive_its_restart(
        tmp_path, tiny_model_dir, tiny_model_files, tiny_cache_dir, tiny_reference_model):
    import torch

    ids = torch.tensor([PROMPT])
    expected = tiny_reference_model.generate(
        ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)[0, len(PROMPT):].tolist()
    (tmp_path / "token").write_text(TOKEN + "\n")
    with ProcGroup(tmp_path) as group:
        coord = start_coordinator(group, tmp_path, "coordinator-1", tiny_model_dir)
        group.wait_ready([coord], timeout=60)
        address = coord.info["grpc"]
        nodes = [group.start(f"node-{i}", [
            "node", "--coordinator", address, "--token-file", str(tmp_path / "token"),
            "--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir), "--num-blocks", "2",
            "--throughput", "10", "--torch-threads", "1",
        ]) for i in range(3)]
        group.wait_ready(nodes, timeout=90)

        # The coordinator placed them: together they cover every block, and it knows all three.
        spans = sorted(tuple(n.info["blocks"]) for n in nodes)
        assert {b for s, e in spans for b in range(s, e)} == {0, 1, 2, 3}, spans
        before = status(coord)
        member_ids = {n.info["member_id"] for n in nodes}
        assert {m["member_id"] for m in before["members"]} == member_ids
        assert before["holes"] == [] and before["epoch"] == 3

        # A client given only the coordinator's address generates exactly the local tokens.
        assert generate(tiny_model_dir, tiny_cache_dir, "--coordinator", address) == expected

        coord.kill()  # SIGKILL: no shutdown path runs
        # While it is down, a new client bootstraps from a node's DHT address and routes from
        # the DHT alone; the nodes keep serving.
        during = generate(tiny_model_dir, tiny_cache_dir, "--initial-peers", nodes[0].info["dht_maddrs"][0])
        assert during == expected
        assert all(n.alive() for n in nodes)

        port = int(address.rsplit(":", 1)[1])
        restarted = start_coordinator(group, tmp_path, "coordinator-2", tiny_model_dir, port=port)
        group.wait_ready([restarted], timeout=60)
        restart_wall = time.time()
        deadline = time.monotonic() + 10.0
        while True:  # the nodes' heartbeats reach the new process under their old member ids
            after = status(restarted)
            if all(m["last_heartbeat_at"] > restart_wall for m in after["members"]):
                break
            assert time.monotonic() < deadline, f"no heartbeats after the restart: {after['members']}"
            time.sleep(0.1)
        assert {m["member_id"] for m in after["members"]} == member_ids
        assert after["epoch"] == before["epoch"]  # continued, and nobody had to re-join
        assert sorted(tuple(m["span"]) for m in after["members"]) == spans
        assert all(m["state"] == "online" for m in after["members"])
        # Their heartbeats carry their batching counters (node/batching.py): the two
        # generations' steps, NEW_TOKENS per generation per hop, two hops of 2 blocks each.
        assert all(m["load"] is not None for m in after["members"])
        assert sum(m["load"]["steps"] for m in after["members"]) == 2 * 2 * NEW_TOKENS
