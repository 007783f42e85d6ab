"""Nodes started with --quant serve quantised spans (issue 19): greedy generation through
two int8 nodes equals the same quantised spans run locally (quantisation is deterministic,
fp32 on the wire), and differs from nothing-quantised only where int8 rounding reaches the
argmax (not asserted: a tiny random model may agree on every token)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from procs import ProcGroup

pytest.importorskip("torchao")
HERE = Path(__file__).parent
PROMPT = [1, 5, 9, 33, 70]
NEW_TOKENS = 8


def test_int8_nodes_generate_what_local_int8_spans_generate(tmp_path, tiny_model_dir, tiny_model_files, tiny_cache_dir):
    group = ProcGroup(tmp_path)
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir), "--torch-threads", "1",
              "--throughput", "100", "--quant", "int8"]
    try:
        a = group.start("A", ["node", "--blocks", "0:2", *common])
        group.wait_ready([a], timeout=90)
        b = group.start("B", ["node", "--blocks", "2:4", *common, "--initial-peers", a.info["dht_maddrs"][0]])
        group.wait_ready([b], timeout=90)
        proc = subprocess.run([sys.executable, str(HERE / "serving_client.py"), "--model", str(tiny_model_dir),
                               "--cache-dir", str(tiny_cache_dir), "--initial-peers", a.info["dht_maddrs"][0],
                               "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW_TOKENS)],
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:] + group.dump_logs()
        remote = json.loads(proc.stdout.strip().splitlines()[-1])["tokens"]
        assert "quantised to int8" in a.log_path.read_text() + b.log_path.read_text()
    finally:
        group.stop_all()

    client = tiny_model_files.load_client_part()
    spans = [tiny_model_files.load_span(0, 2, quant="int8"), tiny_model_files.load_span(2, 4, quant="int8")]
    caches = [s.new_cache(1, len(PROMPT) + NEW_TOKENS) for s in spans]
    step, local = torch.tensor([PROMPT]), []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            h = client.embed(step)
            for span, cache in zip(spans, caches):
                h = span(h, cache=cache)
            step = client.logits(h)[:, -1].argmax(-1, keepdim=True)
            local.append(int(step))
    assert remote == local
