"""Batched steps with real processes: concurrent sessions through two nodes (tiny model, 0:2
and 2:4) share passes of each span, and every session's greedy tokens equal the local
model's for its prompt. The prompts differ in length, so the caches packed together hold
different numbers of tokens at every step. The nodes' Info counters show the steps ran in
shared passes; a node with batching off (--max-batch-sessions 1) gives the same tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from procs import ProcGroup  # tests/integration is on sys.path (pytest rootdir-less import)

CLIENT = Path(__file__).with_name("concurrent_client.py")
PROMPTS = [[1, 5, 9, 33, 70], [1, 200, 17], [1, 44, 45, 46, 47, 48, 49, 50, 51], [1, 9],
           [1, 120, 121, 122, 3, 4, 5], [1, 77, 78, 79]]
NEW_TOKENS = 12


def local_generate(model, prompt) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False)
    return out[0, len(prompt):].tolist()


def run_sessions(tmp_path, tiny_model_dir, tiny_cache_dir, extra: list[str]) -> dict:
    group = ProcGroup(tmp_path)
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir), "--torch-threads", "1",
              "--throughput", "100", *extra]
    try:
        a = group.start("A", ["node", "--blocks", "0:2", *common])
        group.wait_ready([a], timeout=90)
        b = group.start("B", ["node", "--blocks", "2:4", *common, "--initial-peers", a.info["dht_maddrs"][0]])
        group.wait_ready([b], timeout=90)
        cmd = [sys.executable, str(CLIENT), "--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir),
               "--initial-peers", a.info["dht_maddrs"][0], "--prompts", "/".join(",".join(map(str, p)) for p in PROMPTS),
               "--max-new-tokens", str(NEW_TOKENS)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise AssertionError(f"client failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n{group.dump_logs()}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["addresses"] = [a.info["address"], b.info["address"]]
        return result
    except BaseException:
        print(group.dump_logs(), file=sys.stderr)
        raise
    finally:
        group.stop_all()


@pytest.mark.parametrize("mode", ["batched", "unbatched"])
def test_concurrent_sessions_equal_the_local_model(mode, tmp_path, tiny_model_dir, tiny_cache_dir,
                                                  tiny_reference_model):
    extra = ["--max-batch-sessions", "1"] if mode == "unbatched" else []
    result = run_sessions(tmp_path, tiny_model_dir, tiny_cache_dir, extra)
    assert result["tokens"] == [local_generate(tiny_reference_model, p) for p in PROMPTS]
    loads = [result["loads"][address] for address in result["addresses"]]
    for load in loads:  # every session's every step went through each node once
        assert load["steps"] == len(PROMPTS) * NEW_TOKENS
    if mode == "batched":  # the sessions' steps shared passes on both nodes
        assert all(load["max_sessions"] >= 2 and load["passes"] < load["steps"] for load in loads), loads
    else:
        assert all(load["max_sessions"] == 1 and load["passes"] == load["steps"] for load in loads), loads
