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


TOKEN = "quant-swarm-token"


def _generate(model_dir, cache_dir, coordinator, *extra):
    return subprocess.run([sys.executable, str(HERE / "serving_client.py"), "--model", str(model_dir),
                           "--cache-dir", str(cache_dir), "--coordinator", coordinator, "--token", TOKEN,
                           "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW_TOKENS), *extra],
                          capture_output=True, text=True, timeout=180)


def test_status_shows_quantisation_and_exact_clients_avoid_quantised_nodes(
        tmp_path, tiny_model_dir, tiny_cache_dir, tiny_reference_model):
    """A coordinator, an int4 node announcing itself as fast over the whole model, and two
    unquantised ones (one started with --quant auto, which a CPU resolves to none): the
    coordinator's Status and `pollinate status` name each node's quantisation; a client
    routes through the fast int4 node, an --exact client through the two others and gets the
    local fp32 model's tokens; with one of those gone, the --exact client fails naming the
    int4 node."""
    (tmp_path / "token").write_text(TOKEN + "\n")
    group = ProcGroup(tmp_path)
    try:
        coord = group.start("coordinator", [
            "coordinator", "--data-dir", str(tmp_path / "coord-data"), "--port", "0", "--http-port", "0",
            "--token-file", str(tmp_path / "token"), "--model", str(tiny_model_dir), "--num-blocks", "4"])
        group.wait_ready([coord], timeout=60)
        address = coord.info["grpc"]
        common = ["--coordinator", address, "--token-file", str(tmp_path / "token"), "--model", str(tiny_model_dir),
                  "--cache-dir", str(tiny_cache_dir), "--torch-threads", "1"]
        q = group.start("Q", ["node", "--blocks", "0:4", "--quant", "int4", "--throughput", "1000", *common])
        f = group.start("F", ["node", "--blocks", "0:2", "--quant", "auto", "--throughput", "10", *common])
        g = group.start("G", ["node", "--blocks", "2:4", "--throughput", "10", *common])
        group.wait_ready([q, f, g], timeout=120)
        assert "quantisation: none (auto on cpu: full precision" in f.log_path.read_text()
        assert "blocks 0:4 quantised to int4" in q.log_path.read_text()

        table = subprocess.run([sys.executable, "-m", "pollinate", "status", "--coordinator", address,
                                "--token-file", str(tmp_path / "token")], capture_output=True, text=True, timeout=60)
        assert table.returncode == 0, table.stderr
        rows = {line.split()[0]: line.split() for line in table.stdout.splitlines() if line.strip()}
        assert "QUANT" in rows["ID"]
        quant = [rows[n.info["member_id"]][-1] for n in (q, f, g)]
        assert quant == ["int4", "none", "none"], table.stdout

        expected = tiny_reference_model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS,
                                                 min_new_tokens=NEW_TOKENS, do_sample=False)[0, len(PROMPT):].tolist()
        any_route = _generate(tiny_model_dir, tiny_cache_dir, address)
        assert any_route.returncode == 0, any_route.stderr[-3000:] + group.dump_logs()
        assert [hop[0] for hop in json.loads(any_route.stdout.splitlines()[-1])["route"]] == [q.info["address"]]

        exact = _generate(tiny_model_dir, tiny_cache_dir, address, "--exact")
        assert exact.returncode == 0, exact.stderr[-3000:] + group.dump_logs()
        result = json.loads(exact.stdout.splitlines()[-1])
        assert [hop[0] for hop in result["route"]] == [f.info["address"], g.info["address"]]
        assert result["tokens"] == expected

        f.stop()  # SIGTERM: announces offline
        refused = _generate(tiny_model_dir, tiny_cache_dir, address, "--exact")
        assert refused.returncode != 0
        assert "exact output asked for, but only quantised peers host blocks 0, 1" in refused.stderr, \
            refused.stderr[-3000:]
        assert f"{q.info['address']} [0:4] int4" in refused.stderr
    finally:
        group.stop_all()
