"""The job registry with real processes: `pollinate job create` at a coordinator process,
`pollinate train --coordinator` refused before training for a clashing setting, and the job
still registered after the coordinator is SIGKILLed and restarted on its data directory."""

from __future__ import annotations

import json
import subprocess
import sys

from procs import ProcGroup, pollinate_cmd

TOKEN = "job-registry-token"


def test_train_clash_is_refused_before_training_and_jobs_survive_sigkill(tmp_path, smollm2_cache_dir):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")

    def start(name: str, port: int = 0):
        return group.start(name, ["coordinator", "--data-dir", str(tmp_path / "coord-data"), "--port", str(port),
                                  "--http-port", "-1", "--token-file", str(token), "--model", "smollm2",
                                  "--num-blocks", "30"])

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(pollinate_cmd(*args, "--coordinator", address, "--token-file", str(token)),
                              capture_output=True, text=True, timeout=timeout)

    with ProcGroup(tmp_path) as group:
        coord = start("coordinator-1")
        group.wait_ready([coord], timeout=90)
        address = coord.info["grpc"]
        r = run("job", "create", "sums", "--rank", "4", "--lr", "0.001")
        assert r.returncode == 0 and "registered" in r.stderr, r.stderr

        data = tmp_path / "train.jsonl"
        data.write_text('{"text": "12 + 30 = 42"}\n' * 4)
        # the embedded SmolLM2 (converted once in ~/.cache/pollinate): train needs its tokenizer;
        # no node serves it here, so nothing could train even if the clash were missed
        r = run("train", "--job", "sums", "--data", str(data), "--model", "smollm2",
                "--cache-dir", str(smollm2_cache_dir), "--rank", "16", "--steps", "1")
        assert r.returncode == 2, r.stdout + r.stderr
        assert "job 'sums' exists with other settings: rank: registered 4, asked 16" in r.stderr, r.stderr
        assert "step" not in r.stdout  # no training record: stopped before any batch

        coord.kill()  # SIGKILL: the registration must already be on disk
        coord = start("coordinator-2", port=int(address.rsplit(":", 1)[1]))
        group.wait_ready([coord], timeout=90)
        r = run("job", "show", "sums")
        assert r.returncode == 0, r.stderr
        shown = json.loads(r.stdout)
        assert (shown["spec"]["rank"], shown["spec"]["lr"], shown["state"]) == (4, 0.001, "created"), shown
