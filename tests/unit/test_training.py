"""Node-side training against PEFT on the whole model, in one process.

The tiny model is split into three spans, each with its own job (LoRA + AdamW, as a node
holds them); the same batches train a PEFT LoRA on the transformers model with torch's
AdamW. Adapter weights must agree to 1e-5 after several steps.
"""

from __future__ import annotations

import pytest
import torch

from pollinate.client.training_data import causal_lm_loss
from pollinate.node.adapters import AdapterHost
from pollinate.node.training import backward_step, make_job
from pollinate.protocol.shared import JobSpec

SPANS = [(0, 1), (1, 3), (3, 4)]


def peft_reference(reference_model, spec: JobSpec, init_state: dict):
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(reference_model), LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets), lora_dropout=0.0))
    named = {k.replace(".default", ""): v for k, v in model.named_parameters() if "lora_" in k}
    assert set(named) == set(init_state), sorted(set(named) ^ set(init_state))[:4]
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(init_state[k])
    return model, named


def batches(n: int, *, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (2, 12), generator=g) for _ in range(n)]


@pytest.mark.parametrize("micro_batches,grad_clip", [(1, 0.0), (2, 0.0)])
def test_spans_match_peft(tiny_model_files, tiny_reference_model, micro_batches, grad_clip):
    spec = JobSpec(rank=4, alpha=8.0, lr=1e-2, micro_batches=micro_batches, grad_clip=grad_clip, seed=3)
    host = AdapterHost()
    part = tiny_model_files.load_client_part()
    spans = [tiny_model_files.load_span(s, e) for s, e in SPANS]
    jobs = [make_job("j", spec, span, host) for span in spans]
    init = {k: v for job in jobs for k, v in job.adapter.peft_state().items()}
    model, named = peft_reference(tiny_reference_model, spec, init)
    opt = torch.optim.AdamW(list(named.values()), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)

    data = batches(3 * micro_batches)
    for ids in data:  # "swarm": spans and client part, the trainer's arithmetic
        with torch.no_grad():
            h = part.embed(ids)
        inputs = []
        for span in spans:
            inputs.append(h)
            with torch.no_grad(), host.use(jobs[len(inputs) - 1].adapter):
                h = span(h)
        out = h.detach().requires_grad_(True)
        causal_lm_loss(part.logits(out), ids).backward()
        grad = out.grad
        for job, span, x in zip(reversed(jobs), reversed(spans), reversed(inputs)):
            grad = backward_step(job, span, host, x, grad)
    for i in range(0, len(data), micro_batches):  # local: PEFT, one process
        for ids in data[i:i + micro_batches]:
            (causal_lm_loss(model(ids).logits, ids) / micro_batches).backward()
        opt.step()
        opt.zero_grad()

    got = {k: v for job in jobs for k, v in job.adapter.peft_state().items()}
    assert all(job.inner_steps == 3 for job in jobs)
    moved = max(float((got[k] - init[k]).abs().max()) for k in got)
    assert moved > 1e-3, "adapters did not train"
    diff = max(float((got[k] - named[k].detach()).abs().max()) for k in got)
    assert diff <= 1e-5, diff


def test_nan_gradient_skips_step(tiny_model_files):
    spec = JobSpec(rank=2, alpha=2.0)
    host = AdapterHost()
    span = tiny_model_files.load_span(0, 1)
    job = make_job("j", spec, span, host)
    before = job.adapter.peft_state()
    x = torch.randn(1, 5, span.hidden_size)
    g = torch.full_like(x, float("nan"))
    backward_step(job, span, host, x, g)
    after = job.adapter.peft_state()
    assert job.skipped_steps == 1 and job.inner_steps == 0
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not job.optimizer.state  # AdamW moments untouched


def test_spec_validation():
    with pytest.raises(ValueError, match="unknown adapter method 'bogus'"):
        JobSpec(method="bogus")
    with pytest.raises(ValueError, match="rank"):
        JobSpec(rank=0)


def test_job_clash_refused(tiny_model_files):
    from pollinate.node.training import JobManager
    from pollinate.protocol.errors import FailedPrecondition, NotFound
    from pollinate.protocol.v1 import node_pb2

    from pollinate.node.config import ServingConfig

    class FakeServer:
        span = tiny_model_files.load_span(0, 1)
        start, end = 0, 1
        serving = ServingConfig()

    jobs = JobManager(FakeServer())
    jobs.job("a", JobSpec(rank=2).to_proto(node_pb2))
    jobs.job("a", JobSpec(rank=2).to_proto(node_pb2))  # same settings: fine
    with pytest.raises(FailedPrecondition, match="different settings"):
        jobs.job("a", JobSpec(rank=4).to_proto(node_pb2))
    with pytest.raises(NotFound):
        jobs.job("b")


def test_jobs_are_capped_in_number_and_memory(tiny_model_files):
    """A job spec comes from any token holder: new names cannot fill the node (issue 18)."""
    from pollinate.node.config import ServingConfig
    from pollinate.node.training import JobManager, job_memory
    from pollinate.protocol.errors import ResourceExhausted
    from pollinate.protocol.v1 import node_pb2

    span = tiny_model_files.load_span(0, 1)

    def manager(**limits):
        class Server:
            start, end = 0, 1
            serving = ServingConfig(**limits)
        Server.span = span
        return JobManager(Server())

    jobs = manager(max_jobs=2)
    jobs.job("a", JobSpec(rank=2).to_proto(node_pb2))
    jobs.job("b", JobSpec(rank=2).to_proto(node_pb2))
    with pytest.raises(ResourceExhausted, match="limit"):
        jobs.job("c", JobSpec(rank=2).to_proto(node_pb2))
    assert sorted(jobs.jobs) == ["a", "b"]

    one = job_memory(jobs.jobs["a"])
    assert one > 0
    jobs = manager(jobs_memory_bytes=one + one // 2)  # room for one rank-2 job, not two
    jobs.job("a", JobSpec(rank=2).to_proto(node_pb2))
    with pytest.raises(ResourceExhausted, match="MiB"):
        jobs.job("b", JobSpec(rank=2).to_proto(node_pb2))
    assert sorted(jobs.jobs) == ["a"]
    jobs.job("a", JobSpec(rank=2).to_proto(node_pb2))  # the existing job is still served


def test_a_check_only_backward_matches_the_training_one_and_changes_nothing(tiny_model_files):
    """Issue 18, Backward spot checks: check_backward answers the input gradient that
    backward_step answers with the same adapter, and leaves no gradient, step or token behind."""
    from pollinate.node.training import check_backward

    spec = JobSpec(rank=4, alpha=8.0, lr=1e-2, micro_batches=2, seed=3)
    host, span = AdapterHost(), tiny_model_files.load_span(1, 3)
    job = make_job("j", spec, span, host)
    with torch.no_grad():  # a trained adapter: B away from its zero init
        for p in job.adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    x, grad = torch.randn(2, 6, 64, generator=g), torch.randn(2, 6, 64, generator=g)
    checked = check_backward(job, span, host, x, grad)
    assert all(p.grad is None for p in job.adapter.parameters())
    assert (job.pending, job.tokens, job.inner_steps) == (0, 0, 0)
    trained = backward_step(job, span, host, x, grad)
    assert torch.allclose(checked, trained, rtol=1e-5, atol=1e-6)
    assert job.pending == 1 and any(p.grad is not None for p in job.adapter.parameters())
    base = backward_step(None, span, host, x, grad)  # the base span: the adapter does matter
    assert not torch.allclose(checked, base, rtol=1e-3, atol=1e-5)

    # with another replica's adapter (flat) in place of its own, restored afterwards
    from pollinate.node.diloco import flatten_params

    other_host, other_span = AdapterHost(), tiny_model_files.load_span(1, 3)
    other = make_job("j", spec, other_span, other_host)  # another replica: the seed's initial adapter
    own = flatten_params(list(job.adapter.parameters()))
    with_other = check_backward(job, span, host, x, grad, flat=flatten_params(list(other.adapter.parameters())))
    assert torch.equal(flatten_params(list(job.adapter.parameters())), own)
    assert torch.allclose(with_other, check_backward(other, other_span, other_host, x, grad), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(with_other, checked, rtol=1e-3, atol=1e-5)


def test_a_backward_returns_the_adapter_it_computed_with(tiny_model_files):
    """Issue 18, Backward spot checks (BackwardHeader.return_adapter): the adapter copied with
    the answer is the one the Backward used, from before the step it takes (micro_batches 1:
    every Backward steps), so a check with that copy reproduces the answer and a check with
    the adapter as it stands afterwards does not."""
    import asyncio

    from pollinate.node.config import ServingConfig
    from pollinate.node.diloco import flatten_params
    from pollinate.node.training import JobManager, check_backward
    from pollinate.protocol.errors import InvalidRequest
    from pollinate.protocol.v1 import node_pb2

    class Server:
        span = tiny_model_files.load_span(1, 3)
        start, end = 1, 3
        serving = ServingConfig()

        def check_hidden(self, hidden):
            pass

        async def run_torch(self, fn, *args):
            return fn(*args)

    server = Server()
    jobs = JobManager(server)
    job = jobs.job("j", JobSpec(rank=4, alpha=8.0, lr=0.1, micro_batches=1, seed=3).to_proto(node_pb2))
    g = torch.Generator().manual_seed(0)
    x, grad = torch.randn(2, 6, 64, generator=g), torch.randn(2, 6, 64, generator=g)
    asyncio.run(jobs.backward(job, x, grad))  # one step: B away from its zero init
    before = flatten_params(list(job.adapter.parameters()))
    used, answer = asyncio.run(jobs.backward(job, x, grad, with_adapter=True))
    assert torch.equal(used, before) and job.inner_steps == 2
    assert not torch.equal(flatten_params(list(job.adapter.parameters())), before)  # it stepped
    assert torch.allclose(check_backward(job, server.span, jobs.host, x, grad, flat=used), answer,
                          rtol=1e-5, atol=1e-6)
    assert not torch.allclose(check_backward(job, server.span, jobs.host, x, grad), answer, rtol=1e-3, atol=1e-5)
    with pytest.raises(InvalidRequest, match="return_adapter"):
        asyncio.run(jobs.backward(job, x, grad, input_grad=False, with_adapter=True))
    assert job.inner_steps == 2  # refused before anything ran
