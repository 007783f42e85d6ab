"""Faults inside a DiLoCo round (issue 6), with real processes and real faults; each test
ends by comparing states: every replica's committed θ_global and momentum with the
coordinator's copy, and which members' checksums each committed round holds (its store).

SIGKILL of one of three replicas of span 0:4 just after round 2 is formed with all three:
the survivors' exchange with the dead owner fails, they give the attempt up, and the
coordinator (once the dead member's lease is gone) aborts it and forms attempt 2 with the
two live replicas at once — or, if the kill lands after the results went out, round 2
commits for the two that reported. Either way the job finishes: every trainer step done on
the survivors, round 3 committed by the two of them, and their committed θ_global and
momentum bit-identical to the coordinator's stored copy.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import ProcGroup
from rounds_swarm import committed_groups, start_swarm

CLIENT = str(Path(__file__).with_name("rounds_client.py"))
TOKEN = "rounds-faults-token"


def wait_for_log(proc, pattern: str, client: subprocess.Popen, timeout: float) -> None:
    """Poll the process's log for a regex (the readiness check for the fault's moment)."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, proc.log_path.read_text(errors="replace")):
        if client.poll() is not None:
            raise AssertionError(f"client exited ({client.returncode}) before {pattern!r}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{pattern!r} not in {proc.name}'s log after {timeout:.0f} s")
        time.sleep(0.02)


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlapped"])
def test_sigkill_of_a_replica_during_a_round_the_job_finishes(tmp_path, tiny_model_dir, tiny_model_files,
                                                              tiny_cache_dir, overlap):
    with ProcGroup(tmp_path) as group:
        coord, nodes = start_swarm(group, tmp_path, tiny_model_dir, tiny_cache_dir, replicas=3, token=TOKEN,
                                   lease=4, window=30)
        client = subprocess.Popen(
            [sys.executable, CLIENT, "--coordinator", coord.info["grpc"], "--token", TOKEN,
             "--nodes", ",".join(n.info["address"] for n in nodes), "--steps", "9", "--round-steps", "3",
             "--tolerate-dead", "--step-timeout", "240", "--overlap" if overlap else "--no-overlap",
             "--expect-round", "3"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_log(coord, r"round 2 of job rounds span 0:4 formed \(attempt 1\) with 3 member",
                         client, timeout=240)
            nodes[2].kill()  # the fault: SIGKILL of one replica inside round 2
            out, err = client.communicate(timeout=300)
        finally:
            if client.poll() is None:
                client.kill()
        assert client.returncode == 0, err[-3000:] + group.dump_logs()
        result = json.loads(out.strip().splitlines()[-1])
    survivors = [n.info["address"] for n in nodes[:2]]
    alive, dead = {n.info["member_id"] for n in nodes[:2]}, nodes[2].info["member_id"]
    assert result["finished"] == survivors, (result, err[-2000:])
    assert result["inner_steps"] == [9, 9]  # every trainer step done on both survivors
    assert result["round"] == 3, result
    assert result["replicas_equal_coordinator"] == [True, True], result
    groups = committed_groups(tmp_path / "coord-data")
    assert sorted(groups) == [1, 2, 3], groups  # nothing committed was lost, no round skipped
    assert alive <= {m for m, reported in groups[1].items() if reported}, groups  # before the fault
    # round 2 either committed for the two that reported (the dead member in its group without
    # a checksum), or aborted and was formed again with the two: the survivors' checksums; or,
    # where the SIGKILL landed after the dead member had reported (the kill follows the "formed"
    # line by a poll interval and a signal), committed with its checksum too
    assert alive <= {m for m, reported in groups[2].items() if reported} <= alive | {dead}, groups
    assert groups[3] == dict.fromkeys(alive, True), groups
    print("round 2:", "committed by the 2 survivors" if dead in groups[2] else "aborted and retried")


MEMBER_CLIENT = str(Path(__file__).with_name("rounds_member_client.py"))


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlapped"])
def test_poisoned_and_broken_contributions_through_exchange_shard(tmp_path, tiny_model_dir, tiny_model_files,
                                                                  tiny_cache_dir, overlap):
    """A third member (rounds_member_client.py: the node's own RoundDriver and ExchangeShard
    handler, joined through Join/Heartbeat) sends a x1e6 pseudo-gradient in round 2 — every
    owner rejects it, logged with the sender, and round 2 commits for all three — then in
    round 3 its stream to node 0 breaks: node 0 drops it after the contribution wait and
    averages the two that arrived, round 3 commits for the two nodes, and the member adopts
    the committed state; in round 4 it reports a wrong checksum: the two nodes outvote it, the
    round commits for them, and the member adopts it. The nodes end bit-identical with the
    coordinator's copy."""
    with ProcGroup(tmp_path) as group:
        coord, nodes = start_swarm(group, tmp_path, tiny_model_dir, tiny_cache_dir, replicas=2, token=TOKEN,
                                   lease=4, window=30)
        done = subprocess.run(
            [sys.executable, MEMBER_CLIENT, "--coordinator", coord.info["grpc"], "--token", TOKEN,
             "--nodes", ",".join(n.info["address"] for n in nodes), "--round-steps", "3",
             "--contribution-wait", "10", "--overlap" if overlap else "--no-overlap"],
            capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:] + group.dump_logs()
        result = json.loads(done.stdout.strip().splitlines()[-1])
    bad, good = result["member_id"], {n.info["member_id"] for n in nodes}
    groups = committed_groups(tmp_path / "coord-data")
    assert sorted(groups) == [1, 2, 3, 4], groups
    # round 2: the poison went through ExchangeShard to both nodes, each owner rejected it (the
    # momentum below shows no trace of it) and the round committed with all three checksums
    assert groups[2] == {**dict.fromkeys(good, True), bad: True}, groups
    assert result["poison_round_committed_here"] is True and result["round_after_poison"] == 2
    # round 3: node 0 dropped the broken sender and averaged the two that arrived; the round
    # committed for the two nodes, and the member, which gave it up, adopted the commit
    assert groups[3] == {**dict.fromkeys(good, True), bad: False}, groups
    assert result["break_round_committed_here"] is True and result["member_committed_round"] == 3
    # round 4: the member's checksum is not the committed one; outvoted, it adopted the commit
    assert groups[4] == {**dict.fromkeys(good, True), bad: False}, groups
    assert result["lie_round_adopted_here"] is True and result["member_round_after_lie"] == 4
    assert result["member_equals_coordinator"] is True
    assert result["round"] == 4 and result["replicas_equal_coordinator"] == [True, True], result
    assert result["finite"] and result["momentum_norm"] < 1e3, result  # the x1e6 update left no trace
