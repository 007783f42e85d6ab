"""Throughput: measured on a tiny span, cached per (model, device, dtype, span length), overridden."""

from __future__ import annotations

import json

import pytest
import torch

from pollinate.node.span import SpanModule
from pollinate.node.throughput import (
    CACHE_FILE,
    Throughput,
    ThroughputConfig,
    cache_key,
    measure_throughput,
    parse_throughput,
    read_cached,
    resolve_throughput,
    resolve_throughput_info,
    write_cached,
)

# Few steps and a small batch: the tests check plumbing and caching, not speed.
FAST = ThroughputConfig(warmup_steps=1, inference_steps=4, prefix_tokens=4, forward_batch=2, forward_seq=8, forward_repeats=1)


@pytest.fixture(scope="module")
def span(tiny_model_files) -> SpanModule:
    """The shared tiny Llama (tests/conftest.py), all its blocks, fp32 on the CPU."""
    return tiny_model_files.load_span(0, tiny_model_files.num_blocks)


def test_measure_gives_positive_rates(span):
    t = measure_throughput(span, FAST)
    assert t.source == "measured"
    assert t.inference_tokens_per_s > 0 and t.forward_tokens_per_s > 0
    # A batched forward moves many tokens per pass; one-token steps cannot beat it by 10x.
    assert t.forward_tokens_per_s > t.inference_tokens_per_s / 10


def test_auto_measures_once_then_reads_the_cache(span, tmp_path):
    first = resolve_throughput_info("auto", span, model_id="tiny", cache_dir=tmp_path, device_name="test-cpu", config=FAST)
    assert first.source == "measured"
    data = json.loads((tmp_path / CACHE_FILE).read_text())
    key = cache_key("tiny", "test-cpu", torch.float32, span.num_blocks)
    assert key == f"tiny|test-cpu|float32|{span.num_blocks} blocks"
    assert data["entries"][key]["inference_tokens_per_s"] == first.inference_tokens_per_s
    second = resolve_throughput_info(None, span, model_id="tiny", cache_dir=tmp_path, device_name="test-cpu", config=FAST)
    assert second.source == "cache"
    assert (second.inference_tokens_per_s, second.forward_tokens_per_s) == (
        first.inference_tokens_per_s,
        first.forward_tokens_per_s,
    )


def test_cache_is_read_not_remeasured(span, tmp_path):
    # A planted figure no real measurement would give proves the cache was used.
    key = cache_key("tiny", "test-cpu", torch.float32, span.num_blocks)
    write_cached(tmp_path / CACHE_FILE, key, Throughput(inference_tokens_per_s=1234.5, forward_tokens_per_s=99.0, source="measured"))
    assert resolve_throughput("auto", span, model_id="tiny", cache_dir=tmp_path, device_name="test-cpu", config=FAST) == 1234.5


def test_eval_remeasures_and_overwrites(span, tmp_path):
    path = tmp_path / CACHE_FILE
    key = cache_key("tiny", "test-cpu", torch.float32, span.num_blocks)
    write_cached(path, key, Throughput(inference_tokens_per_s=1e-3, forward_tokens_per_s=1e-3, source="measured"))
    t = resolve_throughput_info("eval", span, model_id="tiny", cache_dir=tmp_path, device_name="test-cpu", config=FAST)
    assert t.source == "measured"
    assert t.inference_tokens_per_s > 1e-3
    assert read_cached(path, key).inference_tokens_per_s == t.inference_tokens_per_s


def test_number_overrides_without_measuring_or_caching(span, tmp_path):
    assert resolve_throughput("123.4", span, model_id="tiny", cache_dir=tmp_path, config=FAST) == 123.4
    t = resolve_throughput_info(50, span, model_id="tiny", cache_dir=tmp_path, config=FAST)
    assert (t.inference_tokens_per_s, t.forward_tokens_per_s, t.source) == (50.0, 50.0, "override")
    assert not (tmp_path / CACHE_FILE).exists()


def test_entries_are_keyed_by_dtype_and_span_length(tmp_path):
    path = tmp_path / CACHE_FILE
    for dtype, blocks, rate in [(torch.float32, 2, 10.0), (torch.bfloat16, 2, 20.0), (torch.float32, 3, 30.0)]:
        write_cached(path, cache_key("m", "gpu", dtype, blocks), Throughput(inference_tokens_per_s=rate, forward_tokens_per_s=rate, source="measured"))
    assert read_cached(path, cache_key("m", "gpu", torch.float32, 2)).inference_tokens_per_s == 10.0
    assert read_cached(path, cache_key("m", "gpu", torch.bfloat16, 2)).inference_tokens_per_s == 20.0
    assert read_cached(path, cache_key("m", "gpu", torch.float32, 3)).inference_tokens_per_s == 30.0
    assert read_cached(path, cache_key("m", "other gpu", torch.float32, 2)) is None


def test_corrupt_or_foreign_cache_is_ignored(tmp_path):
    path = tmp_path / CACHE_FILE
    key = cache_key("m", "gpu", torch.float32, 2)
    path.write_text("{not json")
    assert read_cached(path, key) is None
    path.write_text(json.dumps({"version": 999, "entries": {key: {"inference_tokens_per_s": 1, "forward_tokens_per_s": 1}}}))
    assert read_cached(path, key) is None
    path.write_text(json.dumps({"version": 1, "entries": {key: {"inference_tokens_per_s": -1, "forward_tokens_per_s": 1}}}))
    assert read_cached(path, key) is None
    # Writing over a corrupt file replaces it with a valid one.
    path.write_text("{not json")
    write_cached(path, key, Throughput(inference_tokens_per_s=7.0, forward_tokens_per_s=8.0, source="measured"))
    assert read_cached(path, key).forward_tokens_per_s == 8.0


@pytest.mark.parametrize(("spec", "expected"), [(None, "auto"), ("AUTO", "auto"), ("eval", "eval"), ("12.5", 12.5), (3, 3.0)])
def test_parse_throughput(spec, expected):
    assert parse_throughput(spec) == expected


@pytest.mark.parametrize("spec", ["fast", "0", "-3", "nan", "inf", 0.0])
def test_parse_throughput_rejects(spec):
    with pytest.raises(ValueError, match="--throughput"):
        parse_throughput(spec)


def test_throughput_config_rejects_bad_values():
    with pytest.raises(ValueError, match="inference_steps must be > 0, got 0"):
        ThroughputConfig(inference_steps=0)
