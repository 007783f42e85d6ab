"""The coordinator as a real process, with fake nodes as real processes (each runs only a
CoordinatorClient), on loopback. Faults are named: kill(node_c), kill(coordinator)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from procs import ProcGroup  # tests/integration is on sys.path (pytest rootdir-less import)

FAKE_NODE = str(Path(__file__).with_name("coordinator_fake_node.py"))
LEASE_S = 2.0  # short lease so the eviction test is quick; the default is 5 s
PERIOD_S = 0.25


def start_coordinator(group: ProcGroup, tmp: Path, name: str, port: int = 0):
    (tmp / "token").write_text("integration-token\n")
    return group.start(name, [
        "coordinator", "--data-dir", str(tmp / "data"), "--port", str(port), "--http-port", "0",
        "--token-file", str(tmp / "token"), "--lease", str(LEASE_S),
        "--heartbeat-period", str(PERIOD_S), "--restart-grace", "2",
    ])


def start_node(group: ProcGroup, tmp: Path, coordinator: str, port: int, capacity: int):
    name = f"node-{port}"
    return group.start(name, [], ready=True, cmd=[
        sys.executable, FAKE_NODE, "--coordinator", coordinator,
        "--token-file", str(tmp / "token"), "--address", f"127.0.0.1:{port}",
        "--capacity", str(capacity),
    ])


def status(coordinator) -> dict:
    with urllib.request.urlopen(f"http://{coordinator.info['http']}/api/v1/status", timeout=5) as r:
        return json.loads(r.read())


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def test_nodes_cover_the_model_and_a_killed_node_is_evicted_and_replaced(tmp_path):
    with ProcGroup(tmp_path) as group:
        coord = start_coordinator(group, tmp_path, "coordinator")
        group.wait_ready([coord], timeout=90)
        assert coord.info["dht_initial_peers"][0].startswith("/ip4/127.0.0.1/tcp/")
        nodes = [start_node(group, tmp_path, coord.info["grpc"], port, capacity=10)
                 for port in (7101, 7102, 7103, 7104)]
        group.wait_ready(nodes, timeout=60)
        # Joins are serialised by the coordinator: whatever the order, three take the three
        # weakest windows and the fourth doubles the first (ties go to the lowest start).
        spans = sorted(tuple(n.info["span"]) for n in nodes)
        assert spans == [(0, 10), (0, 10), (10, 20), (20, 30)]
        assert nodes[0].info["dht_initial_peers"] == coord.info["dht_initial_peers"]
        before = status(coord)
        assert before["holes"] == [] and len(before["members"]) == 4 and before["epoch"] == 4
        table = subprocess.run(
            [sys.executable, "-m", "pollinate", "status", "--coordinator", coord.info["grpc"],
             "--token-file", str(tmp_path / "token")],
            capture_output=True, text=True, timeout=60)
        assert table.returncode == 0, table.stderr
        assert "epoch 4, 4 nodes" in table.stdout and "every block is served" in table.stdout
        assert all(n.info["member_id"] in table.stdout for n in nodes)

        victim = next(n for n in nodes if n.info["span"] == [20, 30])  # its only replica
        doubles = {n.info["member_id"] for n in nodes if n.info["span"] == [0, 10]}
        victim.kill()
        killed_at = time.monotonic()

        def evicted():
            s = status(coord)
            return s if victim.info["member_id"] not in {m["member_id"] for m in s["members"]} else None

        after = wait_until(evicted, timeout=LEASE_S + 3.0, what="eviction")
        evicted_in = time.monotonic() - killed_at
        assert evicted_in < LEASE_S + 1.0, f"evicted after {evicted_in:.2f} s"
        # Eviction bumps the epoch; the lost span was the last replica, so it is reassigned
        # (to one of the two 0:10 replicas) in the same breath.
        assert after["epoch"] >= before["epoch"] + 2
        assert after["holes"] == []

        def moved_and_serving():
            s = status(coord)
            return [m for m in s["members"] if m["span"] == [20, 30] and m["state"] == "online"]

        movers = wait_until(moved_and_serving, timeout=5.0, what="a node to serve 20:30 again")
        assert movers[0]["member_id"] in doubles
        assert "missed their lease" in coord.log_path.read_text()


def test_killed_coordinator_restarts_with_the_same_members_and_epoch(tmp_path):
    with ProcGroup(tmp_path) as group:
        coord = start_coordinator(group, tmp_path, "coordinator-1")
        group.wait_ready([coord], timeout=90)
        address = coord.info["grpc"]
        port = int(address.rsplit(":", 1)[1])
        nodes = [start_node(group, tmp_path, address, p, capacity=15) for p in (7201, 7202)]
        group.wait_ready(nodes, timeout=60)
        before = status(coord)
        ids = {n.info["member_id"] for n in nodes}
        assert {m["member_id"] for m in before["members"]} == ids and before["epoch"] == 2

        coord.kill()  # SIGKILL: no shutdown path runs
        time.sleep(0.5)  # the nodes' heartbeats fail meanwhile (they must not give up)
        assert all(n.alive() for n in nodes)
        restarted = start_coordinator(group, tmp_path, "coordinator-2", port=port)
        group.wait_ready([restarted], timeout=90)
        restart_wall = time.time()
        resumed = status(restarted)
        assert {m["member_id"] for m in resumed["members"]} == ids
        assert resumed["epoch"] == before["epoch"]
        # Heartbeats resume from the same member ids, no manual step and no re-join...
        wait_until(lambda: all(m["last_heartbeat_at"] > restart_wall
                               for m in status(restarted)["members"]),
                   timeout=10.0, what="heartbeats after the restart")
        # ...and after more than lease + grace, still the same members at the same epoch.
        time.sleep(LEASE_S + 2.0 + 0.5)
        later = status(restarted)
        assert {m["member_id"] for m in later["members"]} == ids
        assert later["epoch"] == before["epoch"]
        assert {tuple(m["span"]) for m in later["members"]} == {(0, 15), (15, 30)}
