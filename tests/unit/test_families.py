"""Every supported family, on a tiny random config built on the fly: spans run block by
block equal the full model (fp32, <= 1e-5), cached greedy decoding equals the model's own
generate(), the reference assembled from the cache equals the source, a LoRA adapter on the
spans exported in PEFT format reproduces the spans' logits on the family's model, and the
families Pollinate cannot run are refused with a message that says why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pollinate.node.families import FAMILIES
from pollinate.node.model_files import UnsupportedModelError, open_model

TOL = 1e-5
SPLITS = [(0, 1), (1, 3), (3, 4)]
SEQ = 12  # longer than the sliding windows below, so a wrong window shows
WINDOW = 5


def tiny_config(model_type: str, **overrides):
    """A small config of `model_type`: 4 blocks, hidden 64, GQA (4 heads, 2 KV heads),
    sliding windows shorter than the test sequences where the family has them; `overrides`
    change the common sizes (benchmarks/bench_models.py uses larger ones)."""
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    common.update(overrides)
    n = common["num_hidden_layers"]
    if model_type == "llama":
        return tf.LlamaConfig(**common)
    if model_type == "mistral":  # every layer slides
        return tf.MistralConfig(**common, sliding_window=WINDOW)
    if model_type == "qwen2":  # blocks from n/2 on slide (max_window_layers), the first half is global
        return tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=n // 2)
    if model_type == "qwen3":  # q/k norms, explicit head_dim
        return tf.Qwen3Config(**common, head_dim=16)
    if model_type == "gemma2":  # alternating sliding/global, both soft-cappings
        # Untied (Gemma's default is tied, as gemma3_text below keeps): a random tied Gemma
        # repeats its last token forever, which makes a weak generation test.
        return tf.Gemma2Config(**common, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                               final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                               tie_word_embeddings=False)
    if model_type == "gemma3_text":  # local and global rotary frequencies, q/k norms
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                   layer_types=[("sliding_attention", "full_attention", "sliding_attention",
                                                 "sliding_attention")[i % 4] for i in range(n)],
                                   final_logit_softcapping=30.0, tie_word_embeddings=True)
    if model_type == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**common, sliding_window=WINDOW, tie_word_embeddings=False)
    raise ValueError(model_type)


def make_tiny(model_type: str, path: Path, *, seed: int = 0, **overrides) -> Path:
    """Save a seeded random model of `model_type` (fp32 safetensors) into `path`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(model_type, ModelFiles, reference model) for each family."""
    from transformers import AutoModelForCausalLM

    path = make_tiny(request.param, tmp_path_factory.mktemp(request.param))
    files = open_model(path, cache_dir=tmp_path_factory.mktemp("cache"), show_progress=False)
    return request.param, files, AutoModelForCausalLM.from_pretrained(path).eval()


def _ids(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _through(client, spans, ids, caches=None):
    h = client.embed(ids)
    for i, span in enumerate(spans):
        h = span(h, cache=None if caches is None else caches[i])
    return client.logits(h)


@torch.no_grad()
def test_spans_block_by_block_equal_the_full_model(family):
    model_type, files, reference = family
    assert files.manifest.model_type == model_type
    client = files.load_client_part()
    spans = [files.load_span(s, e) for s, e in SPLITS]
    ids = _ids()
    expected = reference(ids).logits
    got = _through(client, spans, ids)
    assert got.shape == expected.shape == (2, SEQ, 256)
    assert (got - expected).abs().max().item() <= TOL
    assert expected.std().item() > 0.1  # not trivially equal


@torch.no_grad()
def test_cached_greedy_decoding_equals_generate(family):
    from transformers import DynamicCache

    _, files, reference = family
    client = files.load_client_part()
    spans = [files.load_span(s, e) for s, e in SPLITS]
    ids, new = _ids(batch=1, seq=4, seed=3), 10  # 14 tokens: past every sliding window
    expected = reference.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  cache=DynamicCache(config=reference.config))
    caches = [s.new_cache(batch_size=1, max_length=ids.shape[1] + new) for s in spans]
    tokens, step, ref_cache, diffs = ids, ids, DynamicCache(config=reference.config), []
    for _ in range(new):
        logits = _through(client, spans, step, caches)
        ref_logits = reference(step, cache=ref_cache, use_cache=True).logits
        diffs.append((logits - ref_logits).abs().max().item())
        step = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, step], dim=1)
    assert torch.equal(tokens, expected)
    # Same steps with the model's own cache layout (sliding layers cropped): the same arithmetic.
    assert max(diffs) <= TOL
    layouts = {type(layer).__name__ for c in caches for layer in c.kv.layers}
    assert layouts == {type(layer).__name__ for layer in ref_cache.layers}


@torch.no_grad()
def test_reference_from_the_cache_equals_the_source(family):
    _, files, reference = family
    ids = _ids(seed=4)
    assert (files.load_reference_model()(ids).logits - reference(ids).logits).abs().max().item() == 0.0


def test_lora_export_loads_on_the_family_model_and_reproduces_the_spans(family, tmp_path):
    """A LoRA job on the family's default targets, given non-zero B as training would, is
    exported as the swarm exports it; PEFT loads it on the family's model with equal logits."""
    from peft import PeftModel

    from pollinate.client.peft_export import write_peft_adapter
    from pollinate.node.adapters import AdapterHost, build_adapter
    from pollinate.node.families import lora_targets
    from pollinate.protocol.shared import JobSpec

    model_type, files, reference = family
    spec = JobSpec(method="lora", rank=4, alpha=8.0, targets=lora_targets(model_type), seed=7)
    client = files.load_client_part()
    spans = [files.load_span(s, e) for s, e in SPLITS]
    host, adapters, state = AdapterHost(), [], {}
    gen = torch.Generator().manual_seed(11)
    for span in spans:
        host.attach(span)
        adapter = build_adapter(spec, span)
        with torch.no_grad():
            for b in adapter.lora_b.values():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
        adapters.append(adapter)
        state.update(adapter.peft_state())
    ids = _ids(seed=5)
    with torch.no_grad():
        h = client.embed(ids)
        for span, adapter in zip(spans, adapters):
            with host.use(adapter):
                h = span(h)
        swarm_logits = client.logits(h)
    out = write_peft_adapter(tmp_path / "adapter", state, spec, base_model=str(files.path))
    peft_model = PeftModel.from_pretrained(files.load_reference_model(), out).eval()
    with torch.no_grad():
        local = peft_model(ids).logits
        base = reference(ids).logits
    assert (swarm_logits - local).abs().max().item() <= TOL
    assert (local - base).abs().max().item() > 1e-3  # the adapter changes the output


@pytest.mark.parametrize("model_type, words", [
    ("gemma3", "text decoder.*gemma3_text"),
    ("mixtral", "mixture-of-experts"),
    ("gpt2", "not supported"),
])
def test_unsupported_families_are_refused_with_a_reason(tmp_path, model_type, words):
    from safetensors.torch import save_file
    from transformers import AutoConfig

    AutoConfig.for_model(model_type).save_pretrained(tmp_path / model_type)
    save_file({"x": torch.zeros(1)}, str(tmp_path / model_type / "model.safetensors"))
    with pytest.raises(UnsupportedModelError, match=words) as e:
        open_model(tmp_path / model_type, cache_dir=tmp_path / "cache")
    assert "Qwen2 (qwen2)" in str(e.value)  # the message lists what is supported
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_llama_lora_targets_on_phi3_are_refused_naming_its_modules(tmp_path):
    """Phi-3 has no q_proj/v_proj (PEFT's Llama default): the job is refused, and the message
    names the modules there are, so the trainer can pass --targets qkv_proj."""
    from pollinate.node.adapters import build_adapter
    from pollinate.node.families import lora_targets
    from pollinate.protocol.shared import JobSpec

    files = open_model(make_tiny("phi3", tmp_path / "phi3"), cache_dir=tmp_path / "cache", show_progress=False)
    span = files.load_span(0, 2)
    with pytest.raises(ValueError, match=r"targets \['q_proj', 'v_proj'\].*'gate_up_proj', 'o_proj', 'qkv_proj'"):
        build_adapter(JobSpec(method="lora"), span)
    assert lora_targets("phi3") == ("qkv_proj",)
    assert len(build_adapter(JobSpec(method="lora", targets=lora_targets("phi3")), span).names) == 2


@torch.inference_mode()
def test_packed_steps_equal_each_session_alone(family):
    """Batched serving (node/packed_forward.py) on each family: spans without sliding-window
    layers pack three sessions' prefills and decode steps into one pass with the outputs of
    running each alone; spans with them are refused with the reason (they run alone)."""
    from pollinate.node.packed_forward import PackedStep, forward_packed, packable

    _, files, _ = family
    for start, end in SPLITS:
        span = files.load_span(start, end)
        why = packable(span, None, 1)
        if any(kind == "sliding_attention" for kind in span.layer_types):
            assert why is not None and "sliding-window" in why
            continue
        assert why is None
        alone = [span.new_cache(max_length=32) for _ in range(3)]
        packed = [span.new_cache(max_length=32) for _ in range(3)]
        lengths = [0, 0, 0]
        g = torch.Generator().manual_seed(start)
        for seqs in ([3, 7, 5], [1, 1, 1], [1, 4, 1]):
            steps, expected = [], []
            for i, seq in enumerate(seqs):
                h = torch.randn(1, seq, 64, generator=g)
                pos = torch.arange(lengths[i], lengths[i] + seq).unsqueeze(0)
                expected.append(span(h, pos, cache=alone[i]))
                steps.append(PackedStep(cache=packed[i], hidden=h, position_ids=pos))
                lengths[i] += seq
            for got, want in zip(forward_packed(span, steps), expected):
                assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
