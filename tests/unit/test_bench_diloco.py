"""benchmarks/bench_diloco.py --quick: every arm prints its row, and the same (arm, seed) gives
the same number whether the runs share a process or are spread over a pool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def quick(tmp_path: Path, *extra: str) -> dict[str, dict]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_diloco.py"), "--quick", "--steps", "10",
         "--pretrain-steps", "20", "--cache-dir", str(tmp_path), *extra],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return {row["arm"]: row for row in map(json.loads, done.stdout.splitlines())}


def test_quick_run_rows_and_ratios_do_not_depend_on_jobs(tmp_path):
    arms = "ddp,local,diloco-paper,diloco-cocktail,solo"
    alone = quick(tmp_path, "--arms", arms)
    pooled = quick(tmp_path, "--arms", arms, "--jobs", "2")
    assert list(alone) == arms.split(",")
    for arm in alone:
        assert alone[arm]["val_loss_per_seed"] == pooled[arm]["val_loss_per_seed"]
        assert alone[arm]["bytes_per_replica"] == pooled[arm]["bytes_per_replica"]
    cocktail = alone["diloco-cocktail"]
    assert cocktail["bytes_reduction_vs_ddp"] > 100  # H=10 at ~0.77 bit: ~400x
    assert {"loss_ratio_vs_ddp", "loss_ratio_vs_diloco_paper", "beats_local"} <= set(cocktail)
    assert cocktail["config"]["codec"] == "cocktail" and alone["diloco-paper"]["config"]["outer_lr"] == 0.7
    assert alone["solo"]["bytes_per_replica"] == 0 and "loss_ratio_vs_local" in alone["solo"]


def test_unknown_arm_is_refused(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_diloco.py"), "--quick",
                           "--arms", "ddp,fedavg", "--cache-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "fedavg" in done.stderr


def test_lora_runs_train_only_the_adapter(tmp_path):
    full = quick(tmp_path, "--arms", "ddp,diloco-cocktail")
    lora = quick(tmp_path, "--arms", "ddp,diloco-cocktail", "--lora", "4")
    # ddp moves every trainable value each step: a rank-4 LoRA of width-64 blocks is ~10x fewer
    assert lora["ddp"]["bytes_per_replica"] * 5 < full["ddp"]["bytes_per_replica"]
    assert lora["diloco-cocktail"]["bytes_reduction_vs_ddp"] > 100
    assert lora["diloco-cocktail"]["val_loss"] != full["diloco-cocktail"]["val_loss"]


def test_overlap_arm_is_the_blocking_arm_at_delay_zero_and_differs_when_late(tmp_path):
    """The overlapped simulation runs the same rounds; only when they land differs: at delay 0
    it must give the blocking arm's numbers bit for bit (it is the same computation), and a
    round that lands later must change them (30 steps at H=10: three rounds, two land early)."""
    arms = "diloco-cocktail,diloco-cocktail-overlap"
    now = quick(tmp_path, "--arms", arms, "--steps", "30", "--overlap-delay", "0")
    late = quick(tmp_path, "--arms", arms, "--steps", "30", "--overlap-delay", "3")
    blocking, overlap = now["diloco-cocktail"], now["diloco-cocktail-overlap"]
    assert overlap["val_loss_per_seed"] == blocking["val_loss_per_seed"]
    assert overlap["loss_ratio_vs_blocking"] == 1.0 and overlap["config"]["overlap_rounds"] is True
    assert late["diloco-cocktail-overlap"]["overlap_delay_steps"] == 3
    assert late["diloco-cocktail-overlap"]["val_loss_per_seed"] != blocking["val_loss_per_seed"]
    assert late["diloco-cocktail"]["val_loss_per_seed"] == blocking["val_loss_per_seed"]
    # the same rounds, so (within the codec's frame-length jitter) the same bytes
    assert abs(late["diloco-cocktail-overlap"]["bytes_per_replica"] - blocking["bytes_per_replica"]) \
        < 0.01 * blocking["bytes_per_replica"]
