"""A small sample of benchmarks/fuzz.py in the suite: a real coordinator and node (the tiny
model) take a few hundred malformed messages per service, structured, mutated, raw and the
issue-18 attacks, and stay up, answer every one with a status of the protocol's table (never
INTERNAL or UNKNOWN), never hang, stay within 100 MB and give a fixed valid request the same
answer after as before. The full run (10,000 per service) is the benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz.py"


def test_node_coordinator_and_page_survive_a_fuzz_sample(tmp_path, tiny_model_dir, tiny_model_files, tiny_cache_dir):
    done = subprocess.run(
        [sys.executable, str(FUZZ), "--messages", "400", "--model", str(tiny_model_dir), "--cache-dir",
         str(tiny_cache_dir), "--blocks", "2", "--seed", "1", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["service"] for r in rows] == ["node", "coordinator", "http"], done.stderr[-3000:]
    for r in rows:
        assert r["messages"] >= 400, r
        assert (r["crashes"], r["hangs"], r["internal_or_unknown"]) == (0, 0, 0), r
        assert r["valid_answer_unchanged"], r
        assert r["rss_growth_mb"] < 100, r
    assert done.returncode == 0, done.stderr[-3000:]
