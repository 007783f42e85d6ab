"""DiLoCo rounds over the network: a coordinator and two real node processes that both host
the whole tiny model (two replicas of span 0:4) train one job at once; every 3 inner steps
they run a round (BeginRound, ExchangeShard, CommitRound). After 9 steps: round 3 is
committed, and both replicas' committed global state (θ_global and outer momentum, from
GetState) is bit-identical to the coordinator's stored copy. The members send that state
only once (round 1, when the coordinator has nothing to rebuild from); rounds 2 and 3 the
coordinator rebuilds from the owners' result frames, and its copy is still the replicas'.
In both round modes: blocking (the 3rd Backward waits for the round) and overlapped (the
round runs in the background and the client waits for round 3 before it compares); each
node logs one backward_wait_s line per round, saying which.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from procs import ProcGroup
from rounds_swarm import start_swarm

CLIENT = str(Path(__file__).with_name("rounds_client.py"))
TOKEN = "rounds-token"


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlapped"])
def test_two_replicas_run_three_rounds_and_end_bit_identical(tmp_path, tiny_model_dir, tiny_model_files,
                                                            tiny_cache_dir, overlap):
    with ProcGroup(tmp_path) as group:
        coord, nodes = start_swarm(group, tmp_path, tiny_model_dir, tiny_cache_dir, replicas=2, token=TOKEN)
        done = subprocess.run(
            [sys.executable, CLIENT, "--coordinator", coord.info["grpc"], "--token", TOKEN,
             "--nodes", ",".join(n.info["address"] for n in nodes), "--steps", "9", "--round-steps", "3",
             "--overlap" if overlap else "--no-overlap", "--expect-round", "3"],
            capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:] + group.dump_logs()
        result = json.loads(done.stdout.strip().splitlines()[-1])
        logs = group.dump_logs(200)
    assert result["round"] == 3, result
    assert result["keys"] == ["diloco.global", "diloco.momentum"]
    assert result["replicas_equal_coordinator"] == [True, True], result
    assert result["inner_steps"] == [9, 9]
    assert result["momentum_norm"] > 0  # the outer step moved θ_global
    assert logs.count("committed by 2/2 members") == 3, logs  # the coordinator, once per round
    assert logs.count("committed here (attempt 1, group of 2)") == 6, logs  # 3 rounds on each node
    # issue 12: no state travelled whole: every round was rebuilt from the results, round 1 on
    # the base state (the adapter's initialisation) that shard 0's member sent compressed
    for r in (2, 3):
        assert re.search(rf"round {r} of job rounds span 0:4 committed by 2/2 members, state [\d.]+ kB "
                         r"rebuilt from 2 result frame\(s\), \d+ B\n", logs), logs
    assert re.search(r"round 1 of job rounds span 0:4 committed by 2/2 members, state [\d.]+ kB rebuilt from 2 "
                     r"result frame\(s\), \d+ B, on the base state \S+ sent \(\d+ B\)", logs), logs
    assert "taken whole" not in logs
    mode = "overlapped, landed" if overlap else "blocking"
    waits = re.findall(r"round (\d) of job rounds span 0:4: ([a-z]+)[^\n]*backward_wait_s=(\d+\.\d+)", logs)
    assert sorted(r for r, _, _ in waits) == ["1", "1", "2", "2", "3", "3"], waits  # one line per round per node
    assert logs.count(mode) == 6 and all(mode.startswith(how) for _, how, _ in waits), waits
    if not overlap:  # the Backward waited for the whole round
        assert all(float(s) > 0 for _, _, s in waits), waits
