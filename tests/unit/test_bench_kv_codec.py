"""benchmarks/bench_kv_codec.py --quick on real SmolLM2 caches: the documented rows, and the
lossless and recompute handoffs continuing exactly (slow: loads SmolLM2's 30 blocks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_rows(smollm2_files, smollm2_cache_dir):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_kv_codec.py"), "--quick", "--torch-threads", "1",
         "--cache-dir", str(smollm2_cache_dir)],
        capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    settings = {(r["mode"], r["bits"]): r for r in rows if "mode" in r}
    assert set(settings) == {("recompute", None), ("lossless", None), ("lossy", 8), ("lossy", 6), ("lossy", 4)}
    # recompute: the cache rebuilt by one prefill of the span's inputs equals the one built
    # step by step to the last bits, and the next tokens are the same
    recompute = settings[("recompute", None)]
    assert 0 <= recompute["rel_error_keys"] < 1e-5 and 0 <= recompute["rel_error_values"] < 1e-5
    assert recompute["prompts_identical"] == "2/2"
    # the whole model's span inputs are its embeddings: 576 values a token against 30 x 384
    assert recompute["kv_ratio_vs_fp16"] < 0.1
    lossless = settings[("lossless", None)]
    assert lossless["rel_error_keys"] == lossless["rel_error_values"] == lossless["max_abs_error"] == 0
    assert lossless["prompts_identical"] == "2/2" and lossless["token_agreement"] == 1.0
    ratios = [settings[("lossy", b)]["kv_ratio_vs_fp16"] for b in (8, 6, 4)]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] < 1 < lossless["kv_ratio_vs_fp16"]
    errors = [settings[("lossy", b)]["rel_error_values"] for b in (8, 6, 4)]
    assert 0 < errors[0] < errors[1] < errors[2]
    assert rows[-1]["summary"] is True
