"""The embedded SmolLM2 through three spans equals the model itself: logits and greedy tokens.

Slow (loads the GGUF, ~30 s; converts it on the first run on a machine, ~1 min)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

SPLITS = [(0, 10), (10, 20), (20, 30)]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def smollm2_parts(smollm2_files):
    return smollm2_files.load_client_part(), [smollm2_files.load_span(s, e) for s, e in SPLITS]


@pytest.fixture(scope="module")
def chat_ids(smollm2_files):
    tok = smollm2_files.tokenizer()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt").input_ids


@torch.no_grad()
def test_smollm2_logits_through_spans_match_model(smollm2_files, smollm2_parts, smollm2_reference_model, chat_ids):
    assert smollm2_files.num_blocks == 30 and smollm2_files.hidden_size == 576
    client, spans = smollm2_parts
    h = client.embed(chat_ids)
    for span in spans:
        h = span(h)
    expected = smollm2_reference_model(chat_ids).logits
    assert (client.logits(h) - expected).abs().max().item() <= 1e-5


@torch.no_grad()
def test_smollm2_greedy_through_spans_matches_generate(smollm2_files, smollm2_parts, smollm2_reference_model, chat_ids):
    client, spans = smollm2_parts
    expected = smollm2_reference_model.generate(chat_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = expected[0, chat_ids.shape[1] :].tolist()
    eos = smollm2_files.generation_config().eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    caches = [span.new_cache(max_length=chat_ids.shape[1] + NEW_TOKENS) for span in spans]
    step, got = chat_ids, []
    while len(got) < NEW_TOKENS:
        h = client.embed(step)
        for span, cache in zip(spans, caches):
            h = span(h, cache=cache)
        step = client.logits(h)[:, -1].argmax(-1, keepdim=True)
        got.append(step.item())
        if got[-1] in eos:
            break
    assert got == expected
    assert "Paris" in smollm2_files.tokenizer().decode(got)
