"""Backward without re-sending the input (issue 12), on real node processes.

Nodes A [0:2] and B [2:4] serve the tiny model; kept_inputs_client.py (a trainer process)
trains one job with kept inputs and the same job re-sending them, asks a node for an
input it never kept, sends bad requests, and finally holds a micro-batch's Forward while
the test SIGKILLs B and starts a new node on B's port: the new node has not kept the
input, so the Backward must get InputNotKept there and re-send it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from procs import ProcGroup
from test_trainer_failover import wait_for_file

CLIENT = Path(__file__).with_name("kept_inputs_client.py")
STEPS = 3


def test_kept_inputs_save_bytes_change_nothing_and_fall_back(tmp_path, tiny_model_dir, tiny_cache_dir):
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir), "--torch-threads", "1",
              "--throughput", "100"]
    with ProcGroup(tmp_path) as group:
        a = group.start("A", ["node", "--blocks", "0:2", *common])
        group.wait_ready([a], timeout=240)
        maddr = a.info["dht_maddrs"][0]
        b = group.start("B", ["node", "--blocks", "2:4", *common, "--initial-peers", maddr])
        group.wait_ready([b], timeout=240)
        signals = tmp_path / "signals"
        signals.mkdir()
        client = subprocess.Popen(
            [sys.executable, str(CLIENT), "--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir),
             "--initial-peers", maddr, "--dir", str(signals), "--steps", str(STEPS)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_file(signals / "forwarded.json", client, timeout=240)
            assert json.loads((signals / "forwarded.json").read_text())["address"] == b.info["address"]
            b.kill()  # SIGKILL while B holds the micro-batch's input
            port = b.info["address"].rsplit(":", 1)[1]
            b2 = group.start("B2", ["node", "--blocks", "2:4", *common, "--initial-peers", maddr, "--port", port])
            group.wait_ready([b2], timeout=240)
            assert b2.info["address"] == b.info["address"]
            (signals / "restarted").write_text("")
            out, err = client.communicate(timeout=240)
        finally:
            if client.poll() is None:
                client.kill()
        assert client.returncode == 0, err[-4000:] + group.dump_logs()
        r = json.loads(out.strip().splitlines()[-1])

    # 1. the same math, and exactly one input transfer fewer per hop and micro-batch
    kept_losses = [h["loss"] for h in r["kept_history"]]
    assert len(kept_losses) == STEPS and all(math.isfinite(x) for x in kept_losses)
    assert kept_losses == [h["loss"] for h in r["sent_history"]]
    assert r["adapters_equal"] and r["adapter_keys"] > 0, r
    t = r["tensor_bytes"]
    assert r["kept_bytes"] == [STEPS * 4 * t, STEPS * 3 * t, 0], r  # no hidden re-sent, no first-hop grad back
    assert r["sent_bytes"] == [STEPS * 6 * t, STEPS * 3 * t, 0], r
    # 2. never kept: re-sent once, same gradient as a plain Backward
    assert r["fallback_resends"] == 1 and r["fallback_equal"], r
    # 3. each bad request refused with a reason, the kept input still there afterwards
    refused = r["refused"]
    assert "names the input" in refused["hidden_with_keep_id"], refused
    assert "of job 'fallback', not of job 'reference'" in refused["other_job"], refused
    assert "grad_outputs have shape [2, 5, 64]" in refused["wrong_grad_shape"], refused
    assert "keep_id must be 1-64" in refused["long_keep_id"], refused
    assert "skip_grad_inputs needs a job" in refused["skip_without_job"], refused
    assert "keep_id is for training and needs a job" in refused["keep_without_job"], refused
    assert "keep_id is for training and needs a job" in refused["forward_keep_without_job"], refused
    assert r["resends_after_bad_requests"] == 0 and r["grad_after_bad_requests_finite"], r
    # 4. SIGKILL + a new node on the same address: InputNotKept there, re-sent, done; A kept its own
    assert r["keep_ids_sent"] == [True, True], r
    assert r["restart_resends"] == 1 and r["restart_failovers"] == 0, r
    assert r["restart_hops"] == [a.info["address"], b.info["address"]], r
    tokens = 2 * 12
    assert r["restart_counters"] == {"0:2": {"inner_steps": 1, "skipped_steps": 0, "tokens": tokens},
                                     "2:4": {"inner_steps": 1, "skipped_steps": 0, "tokens": tokens}}, r
