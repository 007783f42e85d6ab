"""benchmarks/bench_codecs.py --quick: runs in seconds and prints the documented rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_prints_one_json_row_per_codec():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_codecs.py"), "--quick",
         "--size", "20000"],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    by_codec = {row["codec"]: row for row in rows if "codec" in row}
    expected = {"none", "fp16", "int8", "cocktail", "hivemind.Float16Compression",
                "hivemind.Uniform8BitQuantization", "hivemind.BlockwiseQuantization"}
    assert set(by_codec) == expected
    for name, row in by_codec.items():
        if "skipped" in row:  # BlockwiseQuantization needs bitsandbytes
            assert name == "hivemind.BlockwiseQuantization"
            continue
        assert {"ratio", "encode_gbps", "decode_gbps", "rel_error"} <= set(row)
        assert row["ratio"] > 0 and row["encode_gbps"] > 0 and row["decode_gbps"] > 0
    assert by_codec["none"]["rel_error"] == 0 and by_codec["none"]["ratio"] < 1.01
    assert by_codec["cocktail"]["ratio"] > 100
    assert 0.5 < by_codec["cocktail"]["rel_error"] < 1  # 2% kept: most energy is dropped
    summary = rows[-1]
    assert summary["cocktail_ratio"] == by_codec["cocktail"]["ratio"]
    assert {"cocktail_encode_speedup", "targets_met"} <= set(summary)
