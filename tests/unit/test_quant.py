"""Quantised spans (node/quant.py): the blocks' Linear weights held in int8 or int4 by
torchao, bytes counted as stored, outputs close to the full-precision span (a random tiny
model is far from a trained one: these bounds are loose, benchmarks/bench_models.py
measures SmolLM2), cached decoding works, and a LoRA adapter trains on top (QLoRA)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao")

from pollinate.node.adapters import AdapterHost  # noqa: E402
from pollinate.node.model_files import open_model  # noqa: E402
from pollinate.node.quant import QuantError, quantize_span, span_weight_bytes, weight_bytes_per_param  # noqa: E402
from pollinate.node.training import backward_step, make_job  # noqa: E402
from pollinate.protocol.shared import JobSpec


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from test_families import make_tiny

    # Realistic init scale (0.02, as trained models start) so quantisation error stays small.
    path = make_tiny("qwen2", tmp_path_factory.mktemp("q") / "m", hidden_size=128, intermediate_size=256,
                     initializer_range=0.02)
    return open_model(path, cache_dir=tmp_path_factory.mktemp("cache"), show_progress=False)


def _logits(files, span, ids):
    client = files.load_client_part()
    with torch.no_grad():
        return client.logits(span(client.embed(ids)))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantised_span_is_smaller_and_close(files, mode):
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    base = files.load_span(0, 4)
    span = files.load_span(0, 4, quant=mode)
    assert span.quant == mode and span.dtype == torch.float32
    linears = [m for m in base.modules() if isinstance(m, torch.nn.Linear)]
    fp32_linear = sum(m.weight.numel() * 4 for m in linears)
    # Norms, biases and rotary tables stay fp32; the Linear weights take what sizing counts.
    expected = span_weight_bytes(base) - fp32_linear + sum(
        m.weight.numel() * weight_bytes_per_param(mode, torch.float32) for m in linears)
    assert span_weight_bytes(span) == pytest.approx(expected, rel=1e-9)
    # int8: a byte per weight + 5 per 32; int4: packed two to a byte + an fp32 scale and zero
    # point per 32 (0.1875 of fp32; the target is <= 0.2).
    assert span_weight_bytes(span) < (0.3 if mode == "int8" else 0.2) * span_weight_bytes(base)
    ref, got = _logits(files, base, ids), _logits(files, span, ids)
    cos = float(torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1)).min())
    print(f"{mode}: logits cosine to fp32 {cos:.6f}, max |diff| {float((got - ref).abs().max()):.4f}")
    # Expected from the step sizes: int8 with a scale per 32 ~Gaussian weights has an rms
    # weight error well under 1% of their spread, int4 near 9%; through four
    # blocks that leaves logits with cosine ~0.9999 and ~0.98. Bounds well below those catch a
    # broken layout (wrong scales, transposed weights give cosine near 0), not drift.
    assert (got - ref).abs().max() > 0
    assert cos > (0.999 if mode == "int8" else 0.95)
    # int8 loses less than int4
    if mode == "int4":
        int8 = _logits(files, files.load_span(0, 4, quant="int8"), ids)
        assert (int8 - ref).abs().max() < (got - ref).abs().max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantised_span_decodes_with_its_cache(files, mode):
    span = files.load_span(0, 4, quant=mode)
    client = files.load_client_part()
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    cache = span.new_cache(1, 16)
    with torch.no_grad():
        full = client.logits(span(client.embed(ids)))
        steps = torch.cat([client.logits(span(client.embed(ids[:, :6]), cache=cache)),
                           client.logits(span(client.embed(ids[:, 6:]), cache=cache))], dim=1)
    print(f"{mode}: cached decoding vs one pass, max |diff| {float((full - steps).abs().max()):.2e}")
    assert (full - steps).abs().max().item() <= 1e-4


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_lora_trains_on_a_quantised_span(files, mode):
    """QLoRA: the quantised base stays frozen and bit-identical, the fp32 adapter moves."""
    span = files.load_span(0, 4, quant=mode)
    before = {n: _stored(t) for n, t in span.state_dict().items()}
    host = AdapterHost()
    job = make_job("q", JobSpec(rank=4, alpha=8.0, lr=1e-2, grad_clip=0.0), span, host)
    lora_b = {k: v.clone() for k, v in job.adapter.lora_b.items()}
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 8, span.hidden_size, generator=g)
    grad_in = backward_step(job, span, host, hidden, torch.randn(2, 8, span.hidden_size, generator=g))
    assert job.inner_steps == 1 and grad_in.shape == hidden.shape and torch.isfinite(grad_in).all()
    assert all(p.dtype == torch.float32 for p in job.adapter.parameters())
    assert max(float((job.adapter.lora_b[k].detach() - lora_b[k]).abs().max()) for k in lora_b) > 0
    after = {n: _stored(t) for n, t in span.state_dict().items()}
    assert before.keys() == after.keys()
    assert all(len(before[n]) == len(after[n]) and all(torch.equal(a, b) for a, b in zip(before[n], after[n]))
               for n in before)


def _stored(t: torch.Tensor) -> list[torch.Tensor]:
    """Copies of what a (possibly torchao) tensor stores: its inner tensors, or itself."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        return [x for n in t.__tensor_flatten__()[0] for x in _stored(getattr(t, n))]
    return [t.detach().clone()]


def test_int4_input_gradient_is_the_dequantised_weights(files):
    """torchao's int4 kernels have no derivative; node/quant.py's _Int4Linear supplies the
    input gradient against the weights the kernel dequantises. Checked on one Linear exactly,
    and through a whole span against the same blocks in fp32."""
    span = files.load_span(0, 2, quant="int4")
    linear = span.layers["0"].mlp.down_proj
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, linear.in_features, generator=g, requires_grad=True)
    grad_y = torch.randn(2, 8, linear.out_features, generator=g)
    y = linear(x)
    assert y.dtype == torch.float32
    torch.autograd.backward(y, grad_y)
    with torch.no_grad():  # the kernel applied to the identity: W^T exactly as it computes with
        w = torch.nn.functional.linear(torch.eye(linear.in_features, dtype=torch.bfloat16), linear.weight).float().T
    assert torch.equal(x.grad, grad_y @ w)
    # the forward computes in bf16 (inputs rounded to 8 bits of mantissa)
    assert torch.allclose(y, x.detach() @ w.T, rtol=2e-2, atol=2e-2)
    # A whole span: Backward's input gradient is the fp32 span's, up to quantisation.
    plain = files.load_span(0, 2)
    hidden = torch.randn(2, 8, span.hidden_size, generator=g)
    grad_out = torch.randn(2, 8, span.hidden_size, generator=g)
    grads = []
    for s in (span, plain):
        h = hidden.clone().requires_grad_()
        torch.autograd.backward(s(h), grad_out)
        grads.append(h.grad.flatten())
    cos = float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0))
    assert 0.95 < cos < 1, cos


def test_bad_modes_are_refused(files):
    with pytest.raises(QuantError, match="unknown quantisation 'int3'"):
        files.load_span(0, 1, quant="int3")
    span = files.load_span(0, 1, quant="int8")
    with pytest.raises(QuantError, match="already quantised"):
        quantize_span(span, "int4")


@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
def test_sizing_counts_the_bytes_a_quantised_block_holds(files, mode):
    from pollinate.node.sizing import BlockShape, SizingConfig, plan_span

    span = files.load_span(0, 4, quant=mode)
    shape = BlockShape.from_config(files.config)
    assert shape.weight_bytes_per_block(torch.float32, mode) * 4 == span_weight_bytes(span.layers)
    plan = plan_span(2**30, shape, torch.float32, SizingConfig(kv_cache_tokens=0, training_tokens=0), quant=mode)
    assert plan.weight_bytes_per_block == shape.weight_bytes_per_block(torch.float32, mode)
    assert (mode in plan.explain()) == (mode != "none")


def test_node_config_refuses_an_unknown_quantisation():
    from pollinate.node.config import NodeConfig

    assert NodeConfig(model="smollm2", start=0, end=1, quant="int8").quant == "int8"
    assert NodeConfig(model="smollm2", start=0, end=1, quant="auto").quant == "auto"
    with pytest.raises(ValueError, match="quant must be none, int8, int4 or auto, got 'int3'"):
        NodeConfig(model="smollm2", start=0, end=1, quant="int3")
