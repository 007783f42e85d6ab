"""Adapter methods on spans (node/adapters/) against the same training run locally.

For each method the tiny model is split into three spans, each with its own job (the
adapter + AdamW, as a node holds them); the same batches train the whole transformers
model in one process: with PEFT for LoRA, IA3 and LN tuning, with plain torch for `full`
(every decoder parameter trainable). Weights must agree to 1e-5 after several steps, and
the base weights of the spans must stay bit-identical (inference and other jobs share them).
"""

from __future__ import annotations

import copy

import pytest
import torch

from pollinate.client.training_data import causal_lm_loss
from pollinate.node.adapters import AdapterHost, known_methods
from pollinate.node.training import backward_step, make_job
from pollinate.protocol.shared import JobSpec
from test_training import batches

SPANS = [(0, 1), (1, 3), (3, 4)]
METHOD_SPECS = {
    "lora": dict(rank=4, alpha=8.0),
    "ia3": dict(),
    "ln-tuning": dict(),
    "full": dict(),
    "bottleneck": dict(rank=4),  # tests/unit/test_methods.py: these three against local training
    "reft": dict(rank=2),
    "galore": dict(rank=2),
    "prefix-tuning": dict(num_virtual_tokens=2),
    "llama-adapter": dict(num_virtual_tokens=2, rank=4),  # rank = top blocks: all 4 of the tiny model
}


def local_reference(reference_model, spec: JobSpec, init_state: dict):
    """(model, {state name: trainable parameter}) for `spec` on the whole model, started
    from `init_state` (the spans' initial adapters under the same names)."""
    from peft import IA3Config, LNTuningConfig, LoraConfig, get_peft_model

    model = copy.deepcopy(reference_model)
    if spec.method == "full":
        for p in model.parameters():
            p.requires_grad_(False)
        named = {k: p for k, p in model.named_parameters() if k.startswith("model.layers.")}
        for p in named.values():
            p.requires_grad_(True)
    else:
        config = {
            "lora": lambda: LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                                       lora_dropout=0.0),
            "ia3": lambda: IA3Config(target_modules=list(spec.targets), feedforward_modules=list(spec.feedforward)),
            "ln-tuning": lambda: LNTuningConfig(target_modules=list(spec.targets)),
        }[spec.method]()
        model = get_peft_model(model, config)
        named = {k.replace(".default", ""): v for k, v in model.named_parameters() if v.requires_grad}
    assert set(named) == set(init_state), sorted(set(named) ^ set(init_state))[:4]
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(init_state[k])
    return model, named


@pytest.mark.parametrize("method", ["ia3", "ln-tuning", "full"])
def test_spans_match_local(tiny_model_files, tiny_reference_model, method):
    micro = 2
    spec = JobSpec(method=method, lr=1e-2, micro_batches=micro, grad_clip=0.0, seed=3, **METHOD_SPECS[method])
    host = AdapterHost()
    part = tiny_model_files.load_client_part()
    spans = [tiny_model_files.load_span(s, e) for s, e in SPANS]
    base = [{k: v.clone() for k, v in span.state_dict().items()} for span in spans]
    jobs = [make_job("j", spec, span, host) for span in spans]
    init = {k: v for job in jobs for k, v in job.adapter.peft_state().items()}
    model, named = local_reference(tiny_reference_model, spec, init)
    opt = torch.optim.AdamW(list(named.values()), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)

    data = batches(3 * micro)
    for ids in data:  # "swarm": spans and client part, the trainer's arithmetic
        with torch.no_grad():
            h = part.embed(ids)
        inputs = []
        for job, span in zip(jobs, spans):
            inputs.append(h)
            with torch.no_grad(), host.use(job.adapter):
                h = span(h)
        out = h.detach().requires_grad_(True)
        causal_lm_loss(part.logits(out), ids).backward()
        grad = out.grad
        for job, span, x in zip(reversed(jobs), reversed(spans), reversed(inputs)):
            grad = backward_step(job, span, host, x, grad)
    for i in range(0, len(data), micro):  # local, one process
        for ids in data[i:i + micro]:
            (causal_lm_loss(model(ids).logits, ids) / micro).backward()
        opt.step()
        opt.zero_grad()

    got = {k: v for job in jobs for k, v in job.adapter.peft_state().items()}
    assert all(job.inner_steps == 3 for job in jobs)
    moved = max(float((got[k] - init[k]).abs().max()) for k in got)
    assert moved > 1e-3, "adapters did not train"
    diff = max(float((got[k] - named[k].detach()).abs().max()) for k in got)
    print(f"{method}: adapter moved {moved:.3e}, spans vs local max |diff| {diff:.3e}")
    assert diff <= 1e-5, diff
    for span, before in zip(spans, base):  # the base weights were never written
        assert all(torch.equal(v, before[k]) for k, v in span.state_dict().items())

    # With the job in use the span computes the trained model; without it, the base model.
    ids = batches(1, seed=7)[0]
    with torch.no_grad():
        h = hb = part.embed(ids)
        for job, span in zip(jobs, spans):
            with host.use(job.adapter):
                h = span(h)
            hb = span(hb)
        assert float((part.logits(h) - model(ids).logits).abs().max()) <= 1e-4
        assert torch.equal(part.logits(hb), tiny_reference_model(ids).logits)


def test_jobs_of_different_methods_share_a_span(tiny_model_files):
    """A node serves inference and several jobs at once: each job's training leaves the
    base span and the other jobs' outputs bit-identical."""
    span = tiny_model_files.load_span(0, 2)
    host = AdapterHost()
    x = torch.randn(1, 6, span.hidden_size, generator=torch.Generator().manual_seed(0))
    jobs = {m: make_job(m, JobSpec(method=m, lr=1e-2, grad_clip=0.0, **METHOD_SPECS[m]), span, host)
            for m in METHOD_SPECS}

    def outputs():
        with torch.no_grad():
            out = {"base": span(x)}
            for m, job in jobs.items():
                with host.use(job.adapter):
                    out[m] = span(x)
            return out

    before = outputs()
    for m, job in jobs.items():
        backward_step(job, span, host, x, torch.ones_like(x))
        after = outputs()
        assert not torch.equal(after[m], before[m]), f"{m} did not change its own output"
        for other in before:
            if other != m:
                assert torch.equal(after[other], before[other]), f"training {m} changed {other}'s output"
        before = after


def test_spec_defaults_and_validation():
    assert JobSpec().targets == ("q_proj", "v_proj")
    ia3 = JobSpec(method="ia3")
    assert ia3.targets == ("k_proj", "v_proj", "down_proj") and ia3.feedforward == ("down_proj",)
    assert JobSpec(method="ia3", targets=("q_proj",)).feedforward == ()
    assert JobSpec(method="ln-tuning").targets == ("input_layernorm", "post_attention_layernorm")
    assert JobSpec(method="full").targets == ()
    with pytest.raises(ValueError, match=r"unknown adapter method 'bogus'; known: bottleneck, full, galore, "
                                         r"ia3, llama-adapter, ln-tuning, lora, prefix-tuning, prompt-tuning, reft$"):
        JobSpec(method="bogus")
    with pytest.raises(ValueError, match="must be among the targets"):
        JobSpec(method="ia3", targets=("k_proj",), feedforward=("down_proj",))
    with pytest.raises(ValueError, match="IA3 setting"):
        JobSpec(feedforward=("down_proj",))
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        JobSpec(method="prompt-tuning")
    assert "prompt-tuning" in known_methods()
    from pollinate.protocol.v1 import node_pb2

    for spec in (ia3, JobSpec(method="full"), JobSpec(method="prompt-tuning", num_virtual_tokens=4)):
        assert JobSpec.from_proto(spec.to_proto(node_pb2)) == spec


def test_nodes_refuse_client_side_and_unmatched_methods(tiny_model_files):
    from pollinate.node.adapters import build_adapter

    span = tiny_model_files.load_span(0, 1)
    with pytest.raises(ValueError, match="runs on the trainer"):
        build_adapter(JobSpec(method="prompt-tuning", num_virtual_tokens=2), span)
    with pytest.raises(ValueError, match="no Module module of the span matches"):
        build_adapter(JobSpec(method="ln-tuning", targets=("nope",)), span)


def test_base_backward_trains_nothing(tiny_model_files):
    """job None (prompt tuning's Backward): the base span's input gradient, no state."""
    span = tiny_model_files.load_span(0, 1)
    x = torch.randn(1, 5, span.hidden_size, generator=torch.Generator().manual_seed(1))
    g = torch.randn_like(x)
    got = backward_step(None, span, AdapterHost(), x, g)
    xr = x.clone().requires_grad_(True)
    with torch.enable_grad():
        span(xr).backward(g)
    assert torch.equal(got, xr.grad)
    assert all(p.grad is None for p in span.parameters())


@pytest.mark.parametrize("method", sorted(METHOD_SPECS))
def test_diloco_writes_the_jobs_flat_vector_only(tiny_model_files, method):
    """DiLoCo (node/rounds.py) reads and writes a job as the flat vector of
    `adapter.parameters()`; for every method that vector is the job's own state."""
    from pollinate.node.diloco import assign_flat, flatten_params

    span = tiny_model_files.load_span(0, 1)
    base = {k: v.clone() for k, v in span.state_dict().items()}
    host = AdapterHost()
    job = make_job("j", JobSpec(method=method, **METHOD_SPECS[method]), span, host)
    params = list(job.adapter.parameters())
    flat = flatten_params(params)
    x = torch.randn(1, 4, span.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), host.use(job.adapter):
        before = span(x)
    assign_flat(params, flat + 0.01)
    assert torch.equal(flatten_params(params), flat + 0.01)
    with torch.no_grad(), host.use(job.adapter):
        assert not torch.equal(span(x), before)
    assert all(torch.equal(v, base[k]) for k, v in span.state_dict().items())
