"""Conversion into per-block shards: layout, reading only the requested blocks, the cache hit,
atomicity under a killed conversion, and clear errors for sources that are not models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import make_tiny_llama
from pollinate.node import model_files
from pollinate.node.model_files import (
    ModelError,
    ModelNotFoundError,
    UnsupportedModelError,
    open_model,
)
from pollinate.node.model_source import resolve_source


def test_layout_is_one_file_per_block_plus_client_part(tiny_model_files):
    root = tiny_model_files.path
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["num_blocks"] == 4 and manifest["hidden_size"] == 64
    assert manifest["block_files"] == [f"blocks/block_{i:04d}.safetensors" for i in range(4)]
    assert sorted(p.name for p in (root / "blocks").iterdir()) == [f"block_{i:04d}.safetensors" for i in range(4)]
    for i in range(4):
        with safe_open(str(root / manifest["block_files"][i]), framework="pt") as f:
            keys = set(f.keys())
            assert f.metadata()["block"] == str(i)
        # Keys are local to one decoder layer: nothing of another block, nothing global.
        assert "self_attn.q_proj.weight" in keys and "mlp.down_proj.weight" in keys
        assert all(not k.startswith("model.") for k in keys)
    with safe_open(str(root / "client.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    assert (root / "config.json").is_file()
    assert tiny_model_files.num_blocks == 4 and tiny_model_files.hidden_size == 64


def test_loading_a_span_reads_only_its_blocks(tiny_model_files, monkeypatch):
    opened: list[str] = []
    real = model_files.safe_open

    def recording(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(model_files, "safe_open", recording)
    span = tiny_model_files.load_span(1, 3)
    assert opened == ["block_0001.safetensors", "block_0002.safetensors"]
    assert sorted(span.layers.keys()) == ["1", "2"]
    opened.clear()
    tiny_model_files.load_client_part()
    assert opened == ["client.safetensors"]


def test_weights_in_blocks_equal_the_source(tiny_model_files, tiny_reference_model):
    span = tiny_model_files.load_span(2, 3)
    expected = tiny_reference_model.model.layers[2].mlp.up_proj.weight
    assert torch.equal(span.layers["2"].mlp.up_proj.weight, expected)


def test_second_open_hits_the_cache(tiny_model_dir, tiny_model_files, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(model_files, "_convert", no_conversion)
    again = open_model(tiny_model_dir, cache_dir=tiny_model_files.path.parent.parent, show_progress=False)
    assert again.path == tiny_model_files.path
    assert again.manifest.fingerprint == tiny_model_files.manifest.fingerprint


def test_changed_source_is_converted_again(tmp_path):
    src = make_tiny_llama(tmp_path / "m", seed=7, num_blocks=2)
    first = open_model(src, cache_dir=tmp_path / "cache", show_progress=False)
    weights = src / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    second = open_model(src, cache_dir=tmp_path / "cache", show_progress=False)
    assert second.manifest.fingerprint != first.manifest.fingerprint
    assert (second.path / "manifest.json").is_file()


def test_killed_conversion_leaves_no_half_cache(tmp_path, monkeypatch):
    import safetensors.torch

    src = make_tiny_llama(tmp_path / "m", seed=8, num_blocks=3)
    cache = tmp_path / "cache"
    real_save, calls = safetensors.torch.save_file, []

    def dies_on_third_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed mid-conversion")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", dies_on_third_file)
    with pytest.raises(KeyboardInterrupt):
        open_model(src, cache_dir=cache, show_progress=False)
    assert list((cache / "models").iterdir()) == []  # neither the entry nor its temp dir
    # A SIGKILL skips `finally`: simulate its leftover, owned by a process that is gone.
    target_name = resolve_source(src).slug + "-" + resolve_source(src).fingerprint[:16]
    leftover = cache / "models" / f".tmp-{target_name}-999999999-x"
    (leftover / "blocks").mkdir(parents=True)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    files = open_model(src, cache_dir=cache, show_progress=False)
    assert [p.name for p in (cache / "models").iterdir()] == [files.path.name]
    assert files.load_span(0, 3).num_blocks == 3


@torch.no_grad()
def test_tied_embeddings_are_stored_once_and_shared(tmp_path):
    from transformers import AutoModelForCausalLM

    src = make_tiny_llama(tmp_path / "tied", seed=9, num_blocks=2, tie=True)
    files = open_model(src, cache_dir=tmp_path / "cache", show_progress=False)
    with safe_open(str(files.path / "client.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    client = files.load_client_part()
    assert client.lm_head.weight is client.embed_tokens.weight
    ids = torch.tensor([[5, 6, 7, 8]])
    h = client.embed(ids)
    h = files.load_span(0, 2)(h)
    expected = AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
    assert (client.logits(h) - expected).abs().max().item() <= 1e-5


@torch.no_grad()
def test_reference_model_from_cache_equals_source(tiny_model_files, tiny_reference_model):
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    got = tiny_model_files.load_reference_model()(ids).logits
    assert torch.equal(got, tiny_reference_model(ids).logits)


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/model", "not-a-model-name", "a/b/c"])
def test_unknown_model_is_refused(tmp_path, name):
    with pytest.raises(ModelNotFoundError, match="not found"):
        open_model(name, cache_dir=tmp_path)


def test_directory_without_a_model_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        open_model(tmp_path / "empty", cache_dir=tmp_path / "cache")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="no \\*.safetensors or \\*.bin weights"):
        open_model(tmp_path / "empty", cache_dir=tmp_path / "cache")


def test_non_llama_architecture_is_refused(tmp_path):
    from safetensors.torch import save_file
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    save_file({"wte.weight": torch.zeros(2, 2)}, str(tmp_path / "gpt2" / "model.safetensors"))
    with pytest.raises(UnsupportedModelError, match="model type 'gpt2'.*not supported"):
        open_model(tmp_path / "gpt2", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_hub_id_resolves_without_network():
    src = resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert src.kind == "hub" and src.location == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert src.slug == "huggingfacetb--smollm2-135m-instruct"


def test_embedded_default_resolves_to_the_gguf():
    for name in (None, "smollm2", "SmolLM2"):
        src = resolve_source(name)
        assert src.kind == "gguf" and src.location.endswith(".gguf")


def test_missing_tokenizer_is_a_clear_error(tiny_model_files):
    with pytest.raises(ModelError, match="no usable tokenizer"):
        tiny_model_files.tokenizer()


# -- the commands ------------------------------------------------------------------------------


def test_convert_command_converts_and_reports(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from pollinate.main import main

    monkeypatch.setenv("POLLINATE_CACHE", str(tmp_path / "from-env"))
    assert main(["convert", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "blocks:  4, hidden size 64" in out and str(tmp_path / "from-env") in out
    assert main(["convert", str(tiny_model_dir), "--cache-dir", str(tmp_path / "flag")]) == 0
    assert (tmp_path / "flag" / "models").is_dir()
    assert main(["convert", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_demo_splits_blocks_into_near_equal_spans():
    from pollinate.demo import split_blocks

    assert split_blocks(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert split_blocks(4, 3) == [(0, 1), (1, 3), (3, 4)]
    assert split_blocks(5, 1) == [(0, 5)]
    with pytest.raises(ValueError, match="cannot cut 2 blocks into 3 spans"):
        split_blocks(2, 3)
