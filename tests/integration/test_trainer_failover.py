"""A trainer survives SIGKILL of the replica it trains through (issue 5).

Three node processes on loopback serve the tiny model: A [0:2], and B and C both [2:4]
(two replicas of one span). A trainer process (trainer_failover_client.py) trains a LoRA
job; between the Forward and the Backward of its third micro-batch it names the replica it
used for [2:4], the test SIGKILLs that node, and the trainer must move the Backward to the
other replica and finish every step with finite losses. The survivor's counters show it
stepped exactly for the micro-batches whose Backward it ran.

Then a fresh node D joins on [2:4], faster (so routes prefer it) and without the job: a
session generating with the job gets NOT_FOUND from D and must go on through the survivor,
giving the same tokens as a session that never meets D.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

from procs import ProcGroup

CLIENT = Path(__file__).with_name("trainer_failover_client.py")
STEPS, PAUSE_AT = 6, 3


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"trainer exited with {proc.returncode} before writing {path.name}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path} after {timeout} s")
        time.sleep(0.05)


def test_trainer_survives_sigkill_of_the_replica_it_uses(tmp_path, tiny_model_dir, tiny_cache_dir):
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir), "--torch-threads", "1",
              "--throughput", "100"]
    with ProcGroup(tmp_path) as group:
        a = group.start("A", ["node", "--blocks", "0:2", *common])
        group.wait_ready([a], timeout=240)
        maddr = a.info["dht_maddrs"][0]
        replicas = {n: group.start(n, ["node", "--blocks", "2:4", *common, "--initial-peers", maddr])
                    for n in ("B", "C")}
        group.wait_ready(list(replicas.values()), timeout=240)
        signals = tmp_path / "signals"
        signals.mkdir()
        trainer = subprocess.Popen(
            [sys.executable, str(CLIENT), "--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir),
             "--initial-peers", maddr, "--job", "failover", "--steps", str(STEPS), "--pause-at", str(PAUSE_AT),
             "--span", "2:4", "--dir", str(signals)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_file(signals / "forwarded.json", trainer, timeout=120)
            used = json.loads((signals / "forwarded.json").read_text())["address"]
            (victim,) = [p for p in replicas.values() if p.info["address"] == used]
            victim.kill()  # SIGKILL, while the trainer holds the micro-batch's Forward
            victim.popen.wait(10)
            (signals / "killed").write_text("")
            out, err = trainer.communicate(timeout=180)
        finally:
            if trainer.poll() is None:
                trainer.kill()
        assert trainer.returncode == 0, err[-4000:] + group.dump_logs()
        result = json.loads(out.strip().splitlines()[-1])
        (survivor,) = [p.info["address"] for p in replicas.values() if p is not victim]

        losses = [r["loss"] for r in result["history"]]
        assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
        # micro-batches before the kill ran on the victim; its Backward and all later ones on the survivor
        assert result["used"][:PAUSE_AT - 1] == [used] * (PAUSE_AT - 1), result["used"]
        assert result["used"][PAUSE_AT - 1:] == [survivor] * (STEPS - PAUSE_AT + 1), result["used"]
        assert result["failovers"] == 1, result
        counters = result["counters"][survivor]
        assert counters["inner_steps"] == STEPS - PAUSE_AT + 1, counters
        assert "Backward of blocks 2:4 moved from" in err, err[-3000:]

        d = group.start("D", ["node", "--blocks", "2:4", *common[:-1], "1000", "--initial-peers", maddr])
        group.wait_ready([d], timeout=240)
        proc = subprocess.run(
            [sys.executable, str(CLIENT), "--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir),
             "--initial-peers", maddr, "--job", "failover", "--span", "2:4", "--dir", str(signals),
             "--generate-with-job", d.info["address"], "--wait-s", "240"],  # DHT announces took ~2 min at load ~13
            capture_output=True, text=True, timeout=360)
        assert proc.returncode == 0, proc.stderr[-4000:] + group.dump_logs()
        with_d, reference = json.loads(proc.stdout.strip().splitlines()[-1])
        assert with_d["lacking_job"] == [d.info["address"]] and reference["lacking_job"] == [], (with_d, reference)
        assert with_d["route"][1] == reference["route"][1] == f"{survivor}[2:4]", (with_d, reference)
        assert len(with_d["generated"]) == 8 and with_d["generated"] == reference["generated"], (with_d, reference)
