"""Shared fixtures: tiny random Llama models on disk, their converted files, and SmolLM2.

Tiny models are built on the fly (seeded), saved with `save_pretrained` and converted into a
per-session cache, so every test runs offline in seconds. SmolLM2 fixtures are for tests
marked `slow`; its conversion is shared with `pollinate demo` through the user cache
(POLLINATE_CACHE or ~/.cache/pollinate), so it happens once per machine, not once per run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Shape of the tiny model: small enough for milliseconds per forward, with grouped-query
# attention (4 heads, 2 KV heads) so the KV-cache and repeat_kv paths are exercised.
TINY_BLOCKS = 4
TINY_HIDDEN = 64
TINY_VOCAB = 256


def make_tiny_llama(path: Path, *, seed: int = 0, num_blocks: int = TINY_BLOCKS, tie: bool = False) -> Path:
    """Save a seeded random LlamaForCausalLM (fp32, safetensors) into `path`; returns `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=num_blocks,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        # Larger than the default 0.02 so activations (and logit gaps) are not all ~0 and a
        # wrong rotary position or mask shows up well above the 1e-5 tolerance.
        initializer_range=0.2,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 4-block tiny Llama (hidden 64, 4 heads, 2 KV heads, vocab 256) as a HF directory."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory) -> Path:
    """A Pollinate cache directory private to this test session."""
    return tmp_path_factory.mktemp("pollinate-cache")


@pytest.fixture(scope="session")
def tiny_model_files(tiny_model_dir, tiny_cache_dir):
    """`ModelFiles` of the tiny model, converted once per session."""
    from pollinate.node.model_files import open_model

    return open_model(tiny_model_dir, cache_dir=tiny_cache_dir, show_progress=False)


@pytest.fixture(scope="session")
def tiny_reference_model(tiny_model_dir):
    """The tiny model as transformers loads it: the local reference for exactness tests."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="session")
def smollm2_cache_dir() -> Path:
    """Where SmolLM2's conversion lives: shared with `pollinate demo` so it happens once."""
    return Path(os.environ.get("POLLINATE_CACHE", Path.home() / ".cache" / "pollinate")).expanduser()


@pytest.fixture(scope="session")
def smollm2_files(smollm2_cache_dir):
    """`ModelFiles` of the embedded SmolLM2-135M-Instruct (converted on first use, ~1 min)."""
    from pollinate.node.model_files import open_model

    return open_model(None, cache_dir=smollm2_cache_dir, show_progress=False)


@pytest.fixture(scope="session")
def smollm2_reference_model():
    """SmolLM2 loaded straight from its GGUF by transformers, independent of our cache (~30 s)."""
    from transformers import AutoModelForCausalLM

    from pollinate.node.model_source import embedded_gguf_path

    gguf = embedded_gguf_path()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
