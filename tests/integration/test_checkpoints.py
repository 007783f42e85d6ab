"""Intermediate checkpoints, retention and the open record (issue 15), with real processes.

A coordinator and one node (the tiny model's whole span 0:4) train job "ckpt" with H = 1:
every Backward makes a round, 12 rounds in all, under the schedule keep_last 2, log-spaced,
every 5th. Then:
- the coordinator keeps exactly rounds {1, 2, 4, 5, 8, 10, 11, 12} (files and rows), and
  `pollinate job show` says so;
- `pollinate export --round 12` is the node's committed state of round 12 bit for bit, and
  `--round 7` is round 5's stored state (the latest kept <= 7), as checkpoint.json says;
- `pollinate job record`: every round's checksum (pruned ones included) is the checksum the
  node reported, every kept state's file hashes to its checksum, and the trainer's data
  file is there with its size and SHA-256; losses sit with the rounds they were sent after;
- the coordinator is SIGKILLed and restarted with a cap of 4 states: it prunes the oldest
  kept rounds to fit at once, and after one more round keeps {8, 10, 12, 13}: the schedule
  and the cap together, across the restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch
from procs import ProcGroup, pollinate_cmd

from pollinate.compression.outer import state_checksum, state_from_bytes
from pollinate.coordinator.config import StoreConfig
from pollinate.coordinator.store import Store
from pollinate.protocol.channels import ChannelConfig

CLIENT = str(Path(__file__).with_name("checkpoints_client.py"))
TOKEN = "checkpoints-token"
SCHEDULE = {1, 2, 4, 5, 8, 10, 11, 12}


def coordinator_args(tmp_path: Path, model_dir, port: int, *extra: str) -> list[str]:
    return ["coordinator", "--data-dir", str(tmp_path / "coord-data"), "--port", str(port), "--http-port", "-1",
            "--token-file", str(tmp_path / "token"), "--model", str(model_dir), "--num-blocks", "4",
            "--heartbeat-period", "0.5", "--lease", "10", "--round-window", "20", *extra]


def stored(tmp_path: Path) -> list[dict]:
    store = Store(StoreConfig(data_dir=tmp_path / "coord-data")).open()
    try:
        rounds = store.job_rounds("ckpt")
        for r in rounds:  # the checksum each member reported for the round
            r["reported"] = [c for (c,) in store.db.execute(
                "SELECT checksum FROM round_members WHERE job_name='ckpt' AND round=?", (r["round"],))]
            r["path"] = store.db.execute("SELECT path FROM committed_states WHERE job_name='ckpt' AND round=?",
                                         (r["round"],)).fetchone()[0]
        return rounds
    finally:
        store.close()


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(pollinate_cmd(*args), capture_output=True, text=True, timeout=timeout)


def train(coord, node, tmp_path: Path, steps: int, seed: int) -> dict:
    done = subprocess.run([sys.executable, CLIENT, "--coordinator", coord.info["grpc"], "--token", TOKEN,
                           "--node", node.info["address"], "--data", str(tmp_path / "train.jsonl"),
                           "--steps", str(steps), "--seed", str(seed)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_checkpoints_retention_export_and_record_across_a_restart(tmp_path, tiny_model_dir, tiny_model_files,
                                                                  tiny_cache_dir):
    from pollinate.client.checkpoints import flat_from_peft
    from pollinate.protocol.shared import JobSpec
    from checkpoints_client import spec as job_spec_msg
    from rounds_client import node_state
    from safetensors.torch import load_file

    (tmp_path / "token").write_text(TOKEN + "\n")
    data = b'{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n'
    (tmp_path / "train.jsonl").write_bytes(data)
    auth = ["--coordinator", None, "--token-file", str(tmp_path / "token")]
    model = ["--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir)]
    with ProcGroup(tmp_path) as group:
        coord = group.start("coordinator", coordinator_args(tmp_path, tiny_model_dir, 0))
        group.wait_ready([coord], timeout=60)
        port = int(coord.info["grpc"].rsplit(":", 1)[1])
        auth[1] = coord.info["grpc"]
        node = group.start("node", ["node", "--coordinator", coord.info["grpc"], "--token-file",
                                    str(tmp_path / "token"), *model, "--blocks", "0:4", "--throughput", "10",
                                    "--torch-threads", "1"])
        group.wait_ready([node], timeout=180)
        first = train(coord, node, tmp_path, 12, seed=0)
        assert first["round"] == 12 and first["stored_with"] == list(range(1, 13)), first

        rounds = stored(tmp_path)
        assert {r["round"] for r in rounds if r["kept"]} == SCHEDULE
        assert {p.name for p in (tmp_path / "coord-data" / "states").iterdir()} == {
            Path(r["path"]).name for r in rounds if r["kept"]}
        show = cli("job", "show", "ckpt", *auth)
        assert show.returncode == 0, show.stderr
        spans = json.loads(show.stdout)["checkpoints"]["spans"]
        assert spans["0:4"]["kept"] == sorted(SCHEDULE) and len(spans["0:4"]["pruned"]) == 4, spans
        assert spans["0:4"]["kept_bytes"] == sum(r["state_bytes"] for r in rounds if r["kept"])
        assert "blocks 0:4: rounds 1, 2, 4, 5, 8, 10, 11, 12 kept" in show.stderr, show.stderr

        # export at round 12: the node's committed state, bit for bit
        out12 = tmp_path / "export-12"
        done = cli("export", "--job", "ckpt", "--round", "12", str(out12), *auth, *model)
        assert done.returncode == 0, done.stderr + group.dump_logs()
        node_committed = asyncio.run(node_state(ChannelConfig(token=TOKEN), node.info["address"], "ckpt", 12))
        spec = JobSpec.from_proto(job_spec_msg())
        flat12 = flat_from_peft(spec, tiny_model_files, (0, 4), load_file(out12 / "adapter_model.safetensors"))
        assert torch.equal(flat12, node_committed["diloco.global"])
        # export at round 7: round 5's stored state (the latest kept <= 7)
        out7 = tmp_path / "export-7"
        done = cli("export", "--job", "ckpt", "--round", "7", str(out7), *auth, *model)
        assert done.returncode == 0, done.stderr
        assert "blocks 0:4: round 5 (the latest kept <= 7)" in done.stdout, done.stdout
        assert json.loads((out7 / "checkpoint.json").read_text())["spans"][0]["round"] == 5
        r5 = next(r for r in rounds if r["round"] == 5)
        state5 = state_from_bytes((tmp_path / "coord-data" / r5["path"]).read_bytes())
        flat7 = flat_from_peft(spec, tiny_model_files, (0, 4), load_file(out7 / "adapter_model.safetensors"))
        assert torch.equal(flat7, state5["global"]) and not torch.equal(flat7, flat12)

        # the open record
        done = cli("job", "record", "ckpt", *auth)
        assert done.returncode == 0, done.stderr
        record = json.loads(done.stdout)
        assert [r["round"] for r in record["rounds"]] == list(range(1, 13))
        for r, s in zip(record["rounds"], rounds):
            assert [r["checksum"]] == s["reported"], (r, s)  # what the member reported
            if r["kept"]:  # and what the stored file holds
                state = state_from_bytes((tmp_path / "coord-data" / s["path"]).read_bytes())
                assert state_checksum(state["global"], state["momentum"]) == r["checksum"]
            else:
                assert r["pruned_reason"] == "schedule"
            assert r["tokens"] == 8 and r["members"][0]["member_id"] == node.info["member_id"]
        assert record["data"][0]["files"] == [{"role": "train", "name": "train.jsonl", "size_bytes": len(data),
                                                "sha256": hashlib.sha256(data).hexdigest(), "examples": 3}]
        assert record["settings"]["keep_last"] == 2 and record["retention"]["keep_every"] == 5
        assert [(x["round"], x["heldout_loss"]) for x in record["losses"]][:2] == [(1, 11.0), (2, 5.5)]

        # SIGKILL, restart with a cap of 4 states: the oldest kept go at once
        state_bytes = rounds[-1]["state_bytes"]
        coord.kill()
        coord2 = group.start("coordinator-2", coordinator_args(
            tmp_path, tiny_model_dir, port, "--checkpoint-max-bytes", str(4 * state_bytes)))
        group.wait_ready([coord2], timeout=60)
        assert {r["round"] for r in stored(tmp_path) if r["kept"]} == {8, 10, 11, 12}
        second = train(coord2, node, tmp_path, 1, seed=50)
        assert second["round"] == 13, second
        after = stored(tmp_path)
        assert {r["round"] for r in after if r["kept"]} == {8, 10, 12, 13}
        assert {r["round"]: r["pruned_reason"] for r in after if not r["kept"]} == {
            1: "coordinator cap", 2: "coordinator cap", 3: "schedule", 4: "coordinator cap", 5: "coordinator cap",
            6: "schedule", 7: "schedule", 9: "schedule", 11: "schedule"}
        assert {p.name for p in (tmp_path / "coord-data" / "states").iterdir()} == {
            Path(r["path"]).name for r in after if r["kept"]}
