"""Late joiners and replacements restore the last committed DiLoCo state (issue 6), with real
processes and a real SIGKILL; and bytes per round, counted at the gRPC layer, reach
`pollinate status`.

The only replica of span 0:4 (node 0) trains the job with H = 3: rounds 1 and 2 commit, it
makes one more step into round 3 and is SIGKILLed. Two nodes for the span start (the
replacement and a second one joining mid-job); before its first step each fetches the
coordinator's committed state, so their committed θ_global and momentum (GetState round 2)
equal the coordinator's bit for bit, and their first round is the group's next one: after
3 steps round 3 commits with both (a node that had not restored would ask for round 1, be
refused, and never reach round 3 in 3 steps). Each reports the serialized size of the
ExchangeShard messages it sent and received in round 3; what one sent is what the other
received, counted independently on each side, and `pollinate status --json` shows them
with the round, plus the BeginRound and CommitRound bytes (issue 12): each node's log line
gives the same totals, and they stay below the size of the state that a commit carried
before the coordinator rebuilt it from the result frames (round 1 too, from a base state).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from procs import ProcGroup
from rounds_swarm import committed_groups, committed_rounds

CLIENT = str(Path(__file__).with_name("rounds_client.py"))
TOKEN = "rounds-restore-token"


def train(coord, nodes, steps: int, *, overlap: bool, expect_round: int) -> dict:
    """rounds_client.py: `steps` Backward calls on each node (H = 3), then (once round
    expect_round is committed everywhere: overlapped rounds end after the last Backward) the
    report of each node's committed state against the coordinator's."""
    done = subprocess.run(
        [sys.executable, CLIENT, "--coordinator", coord.info["grpc"], "--token", TOKEN,
         "--nodes", ",".join(n.info["address"] for n in nodes), "--steps", str(steps), "--round-steps", "3",
         "--step-timeout", "180", "--overlap" if overlap else "--no-overlap",
         "--expect-round", str(expect_round)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def node_args(coord, tmp_path: Path, model_dir, cache_dir) -> list[str]:
    return ["node", "--coordinator", coord.info["grpc"], "--token-file", str(tmp_path / "token"),
            "--model", str(model_dir), "--cache-dir", str(cache_dir), "--blocks", "0:4",
            "--throughput", "10", "--torch-threads", "1"]


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlapped"])
def test_replacement_of_the_only_replica_restores_the_committed_state(tmp_path, tiny_model_dir,
                                                                     tiny_model_files, tiny_cache_dir, overlap):
    (tmp_path / "token").write_text(TOKEN + "\n")
    with ProcGroup(tmp_path) as group:
        coord = group.start("coordinator", [
            "coordinator", "--data-dir", str(tmp_path / "coord-data"), "--port", "0", "--http-port", "-1",
            "--token-file", str(tmp_path / "token"), "--model", str(tiny_model_dir), "--num-blocks", "4",
            "--heartbeat-period", "0.5", "--lease", "4", "--round-window", "30",
        ])
        group.wait_ready([coord], timeout=60)
        first = group.start("node-0", node_args(coord, tmp_path, tiny_model_dir, tiny_cache_dir))
        group.wait_ready([first], timeout=120)
        before = train(coord, [first], steps=7, overlap=overlap, expect_round=2)  # rounds 1, 2 committed; one step into round 3
        assert before["round"] == 2 and before["inner_steps"] == [7], before
        first.kill()  # the fault: SIGKILL of the only replica of the span, mid-job

        # Two new replicas of the span start (the replacement, and a node joining mid-job).
        fresh = [group.start(f"node-{i}", node_args(coord, tmp_path, tiny_model_dir, tiny_cache_dir))
                 for i in (1, 2)]
        group.wait_ready(fresh, timeout=180)
        restored = train(coord, fresh, steps=1, overlap=overlap, expect_round=2)  # the restore runs before this step
        assert restored["round"] == 2, restored
        assert restored["replicas_equal_coordinator"] == [True, True], restored  # bit for bit

        after = train(coord, fresh, steps=2, overlap=overlap, expect_round=3)  # their 3rd step: round 3, the group's next
        status = subprocess.run(
            [sys.executable, "-m", "pollinate", "status", "--coordinator", coord.info["grpc"],
             "--token-file", str(tmp_path / "token"), "--json"], capture_output=True, text=True, timeout=60)
        logs = [p.log_path.read_text(errors="replace") for p in fresh]
        alone_log = first.log_path.read_text(errors="replace")
        dump = group.dump_logs(100)
    # restored: the two fresh nodes' committed state was the coordinator's round 2 before their
    # first round (`restored` above), and round 3, the group's next, is theirs
    first_id, fresh_ids = first.info["member_id"], [p.info["member_id"] for p in fresh]
    groups = committed_groups(tmp_path / "coord-data")
    assert groups == {1: {first_id: True}, 2: {first_id: True}, 3: dict.fromkeys(fresh_ids, True)}, (groups, dump)
    # A group of one moves no ExchangeShard bytes, but its round is not free: BeginRound, the
    # commit with its result frame (round 1: the whole state) are counted and logged.
    alone = [(int(x), int(y)) for x, y in re.findall(
        r"committed here \(attempt \d+, group of 1\), (\d+) B sent, (\d+) B received", alone_log)]
    assert len(alone) == 2 and all(x > 0 and y > 0 for x, y in alone), (alone, dump)
    assert after["round"] == 3 and after["replicas_equal_coordinator"] == [True, True], after
    assert after["inner_steps"] == [3, 3], after

    assert status.returncode == 0, status.stderr
    (rnd,) = json.loads(status.stdout)["rounds"]
    assert (rnd["job"], int(rnd["round"])) == ("rounds", 3), rnd
    a, b = rnd["members"]
    sent = [int(m["bytes_sent"]) for m in (a, b)]
    received = [int(m["bytes_received"]) for m in (a, b)]
    to_coord = [int(m.get("coordinator_bytes_sent", 0)) for m in (a, b)]
    from_coord = [int(m.get("coordinator_bytes_received", 0)) for m in (a, b)]
    assert all(m.get("committed") for m in (a, b)) and min(sent) > 0, rnd
    assert min(to_coord) > 0 and min(from_coord) > 0, rnd  # BeginRound and CommitRound counted
    # Counted independently on both sides of each ExchangeShard call: one's out is the other's in.
    exchanged = [s - c for s, c in zip(sent, to_coord)]
    assert exchanged == [r - c for r, c in zip(received, from_coord)][::-1], rnd
    # The nodes log the same totals as status shows, commit included.
    logged = sorted((int(x), int(y)) for log in logs for x, y in re.findall(
        r"round 3 of job rounds span 0:4 committed here \(attempt \d+, group of 2\), (\d+) B sent, (\d+) B received",
        log))
    assert logged == sorted(zip(sent, received)), (logged, rnd)
    # The commit no longer carries the state: a member's whole round is below the state's size.
    assert max(sent) < after["state_bytes"], (rnd, after["state_bytes"])
    print("round 3 bytes per member (sent, received):", list(zip(sent, received)), "state", after["state_bytes"])


def coordinator_args(tmp_path: Path, model_dir, port: int) -> list[str]:
    return ["coordinator", "--data-dir", str(tmp_path / "coord-data"), "--port", str(port), "--http-port", "-1",
            "--token-file", str(tmp_path / "token"), "--model", str(model_dir), "--num-blocks", "4",
            "--heartbeat-period", "0.5", "--lease", "10", "--round-window", "30"]


def test_a_coordinator_killed_mid_job_rebuilds_the_next_round_from_its_stored_state(
        tmp_path, tiny_model_dir, tiny_model_files, tiny_cache_dir):
    """Two replicas commit round 1 (the state sent whole: nothing to rebuild from); the
    coordinator is SIGKILLed and restarted on the same data directory and port; round 2 then
    commits without any member sending the state: the new process reads round 1's state back
    from its file (checksum verified) and rebuilds round 2 from the result frames, bit for bit
    the replicas' (issue 12: the coordinator holds every committed state, across restarts)."""
    (tmp_path / "token").write_text(TOKEN + "\n")
    with ProcGroup(tmp_path) as group:
        coord = group.start("coordinator", coordinator_args(tmp_path, tiny_model_dir, 0))
        group.wait_ready([coord], timeout=60)
        port = int(coord.info["grpc"].rsplit(":", 1)[1])
        nodes = [group.start(f"node-{i}", node_args(coord, tmp_path, tiny_model_dir, tiny_cache_dir))
                 for i in range(2)]
        group.wait_ready(nodes, timeout=180)
        first = train(coord, nodes, steps=3, overlap=True, expect_round=1)  # the default mode
        assert first["round"] == 1 and first["replicas_equal_coordinator"] == [True, True], first

        coord.kill()  # the fault: SIGKILL of the coordinator between rounds
        restarted = group.start("coordinator-2", coordinator_args(tmp_path, tiny_model_dir, port))
        group.wait_ready([restarted], timeout=60)
        second = train(restarted, nodes, steps=3, overlap=True, expect_round=2)
    rounds = committed_rounds(tmp_path / "coord-data")
    ids = {n.info["member_id"] for n in nodes}
    assert sorted(rounds) == [1, 2] and all(rounds[r]["members"] == dict.fromkeys(ids, True) for r in (1, 2)), rounds
    # round 1: one member sent the state the round started from (nothing to rebuild from: the
    # adapter's initialisation, zstd, well under the state's size); round 2: no member sent a
    # state, so the restarted coordinator rebuilt it from the result frames and its stored round 1
    state_bytes = second["state_bytes"]
    r1, r2 = (sorted(rounds[r]["coordinator_bytes_sent"].values()) for r in (1, 2))
    assert 0.1 * state_bytes < r1[-1] - r1[0] and r1[-1] < 0.5 * state_bytes, (rounds[1], state_bytes)
    assert r2[-1] < r1[-1] - 0.1 * state_bytes, (rounds[2], rounds[1], state_bytes)
    assert second["round"] == 2 and second["replicas_equal_coordinator"] == [True, True], second
    assert second["inner_steps"] == [6, 6], second
