"""benchmarks/bench_wan.py's arithmetic: wires map to codecs, the nodes' backward_wait_s lines
are summed from where the run started, and the summary divides the right rows."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_wan  # noqa: E402


def test_wires_map_to_the_trainers_codecs():
    assert bench_wan.wire_codec("fp32") == "none"
    assert bench_wan.wire_codec("fp16") == "fp16"
    assert bench_wan.wire_codec("int8-row") == "int8-row"  # a new codec plugs in by its own name
    assert bench_wan.wire_codec("fp32-resend") == "none" and not bench_wan.keeps_inputs("fp32-resend")
    assert bench_wan.keeps_inputs("int8row")
    assert (bench_wan.wire_codec("int8row-zstd/int4row-zstd"), bench_wan.wire_grad_codec("int8row-zstd/int4row-zstd")) \
        == ("int8row-zstd", "int4row-zstd")
    assert bench_wan.wire_grad_codec("int8row") == "" and bench_wan.wire_grad_codec("fp32/fp16-resend") == "fp16"
    args = bench_wan.parse_args(["--quick", "--wires", "fp32,int8", "--default-wire", "int8",
                                 "--baseline-wire", "fp32"])
    assert (args.steps, args.round_steps, args.wire_list, args.rate_list) == (4, 3, ["fp32", "int8"], [0, 100, 20])


def test_no_round_ends_at_the_last_step():
    # an overlapped round started by the last Backward would race the held-out evaluation
    for steps in range(3, 40):  # (2 steps: every H either divides 2 or runs no round)
        h = bench_wan.default_round_steps(steps)
        assert steps % h != 0 and steps // h >= 1, (steps, h)
    assert bench_wan.default_round_steps(12) == 5


def test_round_wait_counts_only_lines_logged_during_the_run(tmp_path):
    logs = []
    for i, old in enumerate(["x backward_wait_s=9.0\n", ""]):
        path = tmp_path / f"node-{i}.log"
        path.write_text(old)
        logs.append(SimpleNamespace(name=f"node-{i}", log_path=path))
    since = bench_wan.log_sizes(logs)
    assert bench_wan.round_wait_s(logs, since) is None  # no line yet: null, not 0
    with open(logs[0].log_path, "a") as f:
        f.write("round 2 of job j span 0:10 committed, backward_wait_s=0.25\n")
    with open(logs[1].log_path, "a") as f:
        f.write("backward_wait_s=1.5e-1 and more\nunrelated\n")
    assert bench_wan.round_wait_s(logs, since) == 0.25 + 0.15


def row(rate, wire, *, tps, bytes_, loss, gen=None):
    return {"rate_mbit": rate, "wire": wire, "train_tokens_per_s": tps, "train_bytes_per_token": bytes_,
            "eval_loss": loss, "gen_tokens_per_s": gen, "trainer_round_wait_fraction": None}


def test_summary_divides_default_wire_by_fp32_and_slow_by_unlimited():
    rows = [row(0.0, "fp32", tps=30, bytes_=40000, loss=2.0, gen=10.0),
            row(0.0, "int8", tps=40, bytes_=5000, loss=2.02, gen=10.0),
            row(100.0, "fp32", tps=29, bytes_=40000, loss=2.0, gen=9.5),
            row(20.0, "int8", tps=36, bytes_=5000, loss=2.02)]
    out = bench_wan.summary(rows, SimpleNamespace(default_wire="int8", baseline_wire="fp32", steps=4, round_steps=2,
                                                   batch_size=8, quick=True, gen_repeats=3), {"coord": 100.0})
    assert out["bytes_reduction"] == 8.0
    assert abs(out["loss_ratio"] - 1.01) < 1e-12
    assert out["throughput_ratio_20mbit"] == 0.9
    assert out["gen_ratio_100mbit"] == 0.95
    assert "backward_wait_s" in out["note"]


def test_record_counts_each_byte_once_at_its_sender():
    res = {"counters": {"coord": [300, 100], "node-0": [1000, 2000], "trainer": [2000, 1000]},
           "input_tokens": 100, "trained_tokens": 10, "train_seconds": 4.0, "train_loss": 1.0,
           "eval_loss": 1.0, "eval_examples": 2, "wire_bytes_by_kind": {}}
    r = bench_wan.record(20.0, "fp32", res, [], 1.0, steps=2)
    assert r["train_bytes_per_token"] == (100 + 2000 + 1000) / 100
    assert r["round_bytes_per_token"] == 400 / 100
    assert r["trainer_bytes_per_step"] == 1500
    assert r["trainer_round_wait_fraction"] == 0.25
    assert r["train_tokens_per_s"] == 25


def test_generation_samples_interleave_rates_and_report_the_median():
    assert bench_wan.generation_slots([0.0, 100.0, 20.0], 3) == [0.0, 100.0, 20.0, 20.0, 100.0, 0.0,
                                                                 0.0, 100.0, 20.0]
    res = {"counters": {"trainer": [10, 20], "coord": [1, 2], "node-0": [5, 6]}, "input_tokens": 4,
           "train_seconds": 2.0, "trained_tokens": 2, "train_loss": 1.0, "eval_loss": 1.1, "eval_examples": 1,
           "wire_bytes_by_kind": {"Forward hidden_states sent": 8}}
    rec = bench_wan.record(100.0, "int8row", res, [9.0, 13.0, 12.0], None, 1)
    assert rec["gen_tokens_per_s"] == 12.0 and rec["gen_samples"] == [9.0, 13.0, 12.0]
    assert rec["gen_spread"] == (13.0 - 9.0) / 12.0
    assert bench_wan.record(0.0, "fp32", res, [], None, 1)["gen_tokens_per_s"] is None
