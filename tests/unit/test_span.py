"""Spans chained in order reproduce the full model: full forward, KV-cached decoding,
chunked prefill, padding, gradients; bad input gets a SpanError naming the problem."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from pollinate.node.span import SpanError

SPLITS = [(0, 1), (1, 3), (3, 4)]
# The exactness bound for fp32.
TOL = 1e-5


@pytest.fixture(scope="module")
def parts(tiny_model_files):
    client = tiny_model_files.load_client_part()
    spans = [tiny_model_files.load_span(s, e) for s, e in SPLITS]
    return client, spans


def _ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, seq), generator=g)


def _through(parts, ids, caches=None, **kwargs) -> torch.Tensor:
    client, spans = parts
    h = client.embed(ids)
    for i, span in enumerate(spans):
        h = span(h, cache=None if caches is None else caches[i], **kwargs)
    return client.logits(h)


def _reference_steps(model, ids, chunks) -> torch.Tensor:
    """The reference model fed the same chunks with its own DynamicCache."""
    cache, out, pos = DynamicCache(), [], 0
    for n in chunks:
        out.append(model(ids[:, pos : pos + n], cache=cache, use_cache=True).logits)
        pos += n
    return torch.cat(out, dim=1)


@torch.no_grad()
def test_full_forward_through_spans_matches_model(parts, tiny_reference_model):
    ids = _ids()
    expected = tiny_reference_model(ids).logits
    got = _through(parts, ids)
    assert got.shape == expected.shape == (2, 12, 256)
    assert (got - expected).abs().max().item() <= TOL
    # Not trivially equal: the logits vary across positions by far more than the tolerance.
    assert expected.std().item() > 0.1


@torch.no_grad()
def test_one_span_with_all_blocks_matches_model(tiny_model_files, tiny_reference_model):
    client, span = tiny_model_files.load_client_part(), tiny_model_files.load_span(0, 4)
    ids = _ids(seed=2)
    got = client.logits(span(client.embed(ids)))
    assert (got - tiny_reference_model(ids).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 4, 1, 1, 1], [12]], ids=["token-by-token", "chunked", "one-chunk"])
@torch.no_grad()
def test_cached_steps_match_model(parts, tiny_reference_model, chunks):
    client, spans = parts
    ids = _ids()
    caches = [span.new_cache(batch_size=2, max_length=32) for span in spans]
    out, pos = [], 0
    for n in chunks:
        out.append(_through(parts, ids[:, pos : pos + n], caches))
        pos += n
    got = torch.cat(out, dim=1)
    # Same steps on the reference: identical arithmetic, so the bound holds exactly.
    assert (got - _reference_steps(tiny_reference_model, ids, chunks)).abs().max().item() <= TOL
    # Against one full forward, only float rounding of differently shaped matmuls differs
    # (the reference model itself differs from itself by ~1e-5 here).
    assert (got - tiny_reference_model(ids).logits).abs().max().item() <= 1e-4
    assert [c.length for c in caches] == [12, 12, 12]
    assert caches[1].nbytes == spans[1].cache_bytes_per_token(2) * 12


@torch.no_grad()
def test_explicit_position_ids_and_greedy_generation_match_generate(parts, tiny_reference_model):
    client, spans = parts
    prompt = _ids(batch=1, seq=6, seed=3)
    new_tokens = 10
    expected = tiny_reference_model.generate(
        prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
    )[0, 6:].tolist()
    caches = [span.new_cache(max_length=16) for span in spans]
    step, pos, got = prompt, 0, []
    for _ in range(new_tokens):
        positions = torch.arange(pos, pos + step.shape[1])
        h = client.embed(step)
        for span, cache in zip(spans, caches):
            h = span(h, positions, cache=cache)
        pos += step.shape[1]
        step = client.logits(h)[:, -1].argmax(-1, keepdim=True)
        got.append(step.item())
    assert got == expected


@torch.no_grad()
def test_left_padded_batch_matches_model(parts, tiny_reference_model):
    ids = _ids(batch=2, seq=8, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 is left-padded by 3, as generate() pads a batch
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = tiny_reference_model(ids, attention_mask=mask, position_ids=positions).logits
    got = _through(parts, ids, position_ids=positions, attention_mask=mask)
    assert (got[mask.bool()] - expected[mask.bool()]).abs().max().item() <= TOL


def test_gradients_flow_through_spans_as_through_model(parts, tiny_reference_model):
    client, spans = parts
    ids = _ids(batch=1, seq=7, seed=5)
    x = client.embed(ids).detach().requires_grad_(True)
    h = x
    for span in spans:
        h = span(h)
    client.logits(h).logsumexp(-1).sum().backward()
    x_ref = tiny_reference_model.get_input_embeddings()(ids).detach().requires_grad_(True)
    tiny_reference_model(inputs_embeds=x_ref).logits.logsumexp(-1).sum().backward()
    assert x.grad is not None and x.grad.abs().max().item() > 0
    assert (x.grad - x_ref.grad).abs().max().item() <= TOL
    # Base weights are frozen by default: nothing accumulates on them.
    assert all(p.grad is None for span in spans for p in span.parameters())


def test_lora_wraps_span_linears_with_global_block_names(tiny_model_files):
    from peft import LoraConfig, inject_adapter_in_model

    span = tiny_model_files.load_span(1, 3)
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), span)
    trainable = [n for n, p in span.named_parameters() if p.requires_grad]
    assert "layers.1.self_attn.q_proj.lora_A.default.weight" in trainable
    assert "layers.2.self_attn.v_proj.lora_B.default.weight" in trainable
    assert not any(n.startswith("layers.0.") or n.startswith("layers.3.") for n, _ in span.named_parameters())
    out = span(torch.randn(1, 5, 64))
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in span.parameters() if p.requires_grad)


@torch.no_grad()
def test_bfloat16_span_runs_close_to_fp32(tiny_model_files):
    fp32 = tiny_model_files.load_span(0, 2)
    bf16 = tiny_model_files.load_span(0, 2, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.rotary_emb.inv_freq.dtype == torch.float32
    x = torch.randn(1, 6, 64)
    out = bf16(x.to(torch.bfloat16)).float()
    ref = fp32(x)
    assert (out - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "words"), [(2, 2, "empty"), (3, 1, "empty"), (-1, 2, "outside"), (2, 5, "outside")]
)
def test_bad_span_range_is_refused(tiny_model_files, start, end, words):
    with pytest.raises(SpanError, match=words):
        tiny_model_files.load_span(start, end)


@torch.no_grad()
def test_bad_hidden_states_are_refused(parts):
    span = parts[1][1]
    with pytest.raises(SpanError, match="hidden size 32 does not match the model's 64"):
        span(torch.zeros(1, 3, 32))
    with pytest.raises(SpanError, match=r"must be \(batch, seq, 64\)"):
        span(torch.zeros(3, 64))
    with pytest.raises(SpanError, match="float16"):
        span(torch.zeros(1, 3, 64, dtype=torch.float16))
    with pytest.raises(SpanError, match="empty dimension"):
        span(torch.zeros(1, 0, 64))
    with pytest.raises(SpanError, match="position_ids have shape"):
        span(torch.zeros(1, 3, 64), torch.arange(4))
    with pytest.raises(SpanError, match="integers"):
        span(torch.zeros(1, 3, 64), torch.arange(3.0))


@torch.no_grad()
def test_bad_cache_steps_are_refused_and_change_nothing(parts):
    span, other = parts[1][1], parts[1][0]
    cache = span.new_cache(batch_size=1, max_length=8)
    span(torch.randn(1, 4, 64), cache=cache)
    with pytest.raises(SpanError, match=r"do not follow the cached ones; expected \[4\]"):
        span(torch.randn(1, 1, 64), torch.tensor([6]), cache=cache)
    with pytest.raises(SpanError, match="batch size 1, got 2"):
        span(torch.randn(2, 1, 64), cache=cache)
    with pytest.raises(SpanError, match="exceeds the session maximum of 8"):
        span(torch.randn(1, 5, 64), cache=cache)
    with pytest.raises(SpanError, match=r"belongs to span \(1, 3\), not \(0, 1\)"):
        other(torch.randn(1, 1, 64), cache=cache)
    assert cache.length == 4 and cache.kv.get_seq_length() == 4
    span(torch.randn(1, 1, 64), torch.tensor([4]), cache=cache)  # the right next step works
    assert cache.length == 5
    with pytest.raises(SpanError, match="max_length"):
        span.new_cache(max_length=10_000)
