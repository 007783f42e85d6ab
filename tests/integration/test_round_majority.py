"""Issue 18, item 4, with real processes: a newcomer that is the whole group of a round after
the window cannot commit a state of its choosing over a replica that is training the job
(round 1: nobody has standing yet, the node's heartbeats report its steps) or over a replica
with standing (round 2: the node committed round 1). Its well-formed forged states are
refused ("no majority"), the node's rounds commit as usual, and the coordinator's copy of
round 2 is the node's, bit for bit.

The swarm's heartbeat period is 30 s, longer than the whole test: the coordinator learns that
the node trains the job only from the beat the node sends right after its first step
(CoordinatorClient.beat_soon), so the refused round-1 forgery, a second or two after that
step, shows the report is immediate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from procs import ProcGroup
from rounds_swarm import committed_groups, start_swarm

CLIENT = str(Path(__file__).with_name("round_majority_client.py"))
TOKEN = "round-majority-token"


def test_a_lone_newcomer_cannot_commit_over_a_replica_training_or_with_standing(tmp_path, tiny_model_dir,
                                                                              tiny_model_files, tiny_cache_dir):
    with ProcGroup(tmp_path) as group:
        coord, (node,) = start_swarm(group, tmp_path, tiny_model_dir, tiny_cache_dir, replicas=1, token=TOKEN,
                                     window=2, lease=120.0, coordinator_args=("--heartbeat-period", "30"))
        done = subprocess.run(
            [sys.executable, CLIENT, "--coordinator", coord.info["grpc"], "--token", TOKEN,
             "--node", node.info["address"]], capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:] + group.dump_logs()
        result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["round1_newcomer_group"] == [result["newcomer"]], result  # alone after the window
    assert not result["round1_forged_committed"] and "no majority" in result["round1_forged_reason"], result
    assert result["newcomer_group"] == [result["newcomer"]], result
    assert not result["forged_committed"] and "no majority" in result["forged_reason"], result
    assert not result["coordinator_holds_forged"], result
    assert result["round"] == 2 and result["replicas_equal_coordinator"] == [True], result
    groups = committed_groups(tmp_path / "coord-data")
    assert groups == {1: {node.info["member_id"]: True}, 2: {node.info["member_id"]: True}}, groups


def test_a_forged_round_1_that_does_not_fit_stops_the_job_on_the_node_with_one_clear_error(
        tmp_path, tiny_model_dir, tiny_model_files, tiny_cache_dir):
    """The limit above: a newcomer that commits round 1 before any replica saw the job decides
    it alone. A state of the wrong size can never be adopted; the node refuses the job's
    calls with the reason (FAILED_PRECONDITION), instead of restarting its H steps at every
    round with a warning."""
    with ProcGroup(tmp_path) as group:
        coord, (node,) = start_swarm(group, tmp_path, tiny_model_dir, tiny_cache_dir, replicas=1, token=TOKEN,
                                     window=2)
        done = subprocess.run(
            [sys.executable, CLIENT, "--coordinator", coord.info["grpc"], "--token", TOKEN,
             "--node", node.info["address"], "--forge-first"], capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:] + group.dump_logs()
        result = json.loads(done.stdout.strip().splitlines()[-1])
        logs = group.dump_logs(200)
    assert result["round1_newcomer_group"] == [result["newcomer"]] and result["round1_forged_committed"], result
    for refused in result["refused"]:
        assert refused.startswith("FAILED_PRECONDITION: job 'rounds' cannot train on this node: the coordinator's "
                                  "committed state of span 0:4 does not fit this node's adapter"), result
        assert "1000 elements" in refused, refused
    assert logs.count("refusing its Forward and Backward from now on") == 1, logs  # said once
