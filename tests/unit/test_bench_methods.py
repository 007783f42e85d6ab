"""benchmarks/bench_methods.py covers every method the swarm trains, each with settings the
nodes accept, in the full and the --quick run (the run itself needs SmolLM2 and minutes:
benchmarks/results/2026-12-06-methods.md has its output)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_bench_lists_every_method_with_valid_settings():
    import bench_methods

    from pollinate.node.adapters import known_methods

    assert sorted(bench_methods.METHODS) == sorted(known_methods())
    assert len(bench_methods.METHODS) == 10
    for quick in (False, True):
        for method in bench_methods.METHODS:
            spec = bench_methods.method_spec(method, argparse.Namespace(quick=quick, seed=0))
            assert spec.method == method
            assert spec.lr == bench_methods.SETTINGS[method]["lr"]


@pytest.mark.parametrize("method", ["bottleneck", "llama-adapter", "galore"])
def test_state_sizes_count_params_optimizer_and_round(tiny_model_files, method):
    """node_state_bytes = the job's tensors + its optimizer's; round_bytes from a real exchange."""
    import bench_methods

    spec = bench_methods.method_spec(method, argparse.Namespace(quick=True, seed=0))
    params, node_bytes, trainer_bytes, round_bytes, numel = bench_methods.state_sizes(spec, tiny_model_files)
    assert params == numel > 0 and trainer_bytes is None
    if method == "galore":  # projected moments: less than AdamW's two full moments
        assert 4 * params < node_bytes < 3 * 4 * params
    else:  # AdamW: the tensor and two moments, fp32
        assert node_bytes == 3 * 4 * params
    assert 0 < round_bytes < 2 * 2 * 4 * numel  # compressed: below sending and receiving fp32 halves twice
