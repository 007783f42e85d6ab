"""A tiny span on CUDA against the same span on the CPU, and each check's CPU twin.

CUDA cases are marked `gpu` and skip cleanly where torch sees no CUDA device; the same
checks run on the CPU everywhere, so the reduced-precision and cached-step paths are
exercised by every test run. benchmarks/gpu_check.sh runs the CUDA cases on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from pollinate.node.device import resolve_placement
from pollinate.node.sizing import BlockShape, choose_num_blocks, free_memory_bytes
from pollinate.node.throughput import ThroughputConfig, measure_throughput

NEEDS_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = pytest.param("cuda", marks=NEEDS_CUDA)

def inputs(hidden: int, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randn(batch, seq, hidden, generator=torch.Generator().manual_seed(1)) * 0.02


@pytest.fixture(autouse=True)
def no_tf32():
    # TF32 matmuls would make fp32 on the GPU differ from the CPU by ~1e-3 relative.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_placement_picks_the_gpu():
    p = resolve_placement("auto", "auto")
    assert p.device.type == "cuda"
    major, _ = torch.cuda.get_device_capability(0)
    assert p.dtype == (torch.bfloat16 if major >= 8 else torch.float16)
    assert p.device_name == torch.cuda.get_device_name(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp32_span_on_cuda_matches_cpu(tiny_model_files):
    n = tiny_model_files.num_blocks
    cpu = tiny_model_files.load_span(0, n, dtype=torch.float32, device="cpu")
    gpu = tiny_model_files.load_span(0, n, dtype=torch.float32, device="cuda")
    x = inputs(cpu.hidden_size)
    with torch.inference_mode():
        expected = cpu(x)
        got = gpu(x.cuda()).cpu()
    # Same fp32 math, other reduction order: ~1e-6 relative on outputs of magnitude ~30.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_span_is_close_to_fp32_cpu(tiny_model_files, device, dtype):
    if device == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("no native bf16 on this GPU")
    n = tiny_model_files.num_blocks
    cpu = tiny_model_files.load_span(0, n, dtype=torch.float32, device="cpu")
    half = tiny_model_files.load_span(0, n, dtype=dtype, device=device)
    x = inputs(cpu.hidden_size)
    with torch.inference_mode():
        expected = cpu(x)
        got = half(x.to(device, dtype)).float().cpu()
    # Relative error of the whole output: bf16 keeps 8 mantissa bits, fp16 11; measured on
    # the CPU, 4 tiny blocks give 0.020 (bf16) and 0.0025 (fp16). Twice that is the bound.
    bound = {torch.bfloat16: 4e-2, torch.float16: 5e-3}[dtype]
    assert float((got - expected).norm() / expected.norm()) < bound


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_cached_steps_match_a_full_forward(tiny_model_files, device):
    span = tiny_model_files.load_span(0, tiny_model_files.num_blocks, dtype=torch.float32, device=device)
    x = inputs(span.hidden_size, batch=1, seq=8).to(device)
    with torch.inference_mode():
        full = span(x)
        cache = span.new_cache(batch_size=1, max_length=8)
        steps = torch.cat([span(x[:, i : i + 1], cache=cache) for i in range(8)], dim=1)
    # Outputs reach ~30 (the tiny model's init range is 0.2): 1e-4 absolute is fp32 rounding.
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_throughput_and_free_memory(tiny_model_files, device):
    n = tiny_model_files.num_blocks
    span = tiny_model_files.load_span(0, n, dtype=torch.float32, device=device)
    t = measure_throughput(span, ThroughputConfig(inference_steps=8, forward_batch=2, forward_seq=32, forward_repeats=2))
    assert t.inference_tokens_per_s > 0 and t.forward_tokens_per_s > 0
    free = free_memory_bytes(device)
    if device == "cuda":
        assert 0 < free <= torch.cuda.get_device_properties(0).total_memory
    chosen, sizing = choose_num_blocks(free, BlockShape.from_config(tiny_model_files.config), torch.float32)
    assert chosen == n and sizing.usable_bytes > 0


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_diloco_round_with_half_precision_adapters_on_the_device(device):
    """Adapters train in bf16 on the node's device; the DiLoCo global state and outer momentum
    stay fp32 on the CPU (issue 7), a round runs, and the members end bit-identical."""
    from pollinate.node.diloco import (DiLoCoConfig, DiLoCoMember, assign_flat,
                                       exchange_in_process, flatten_params)

    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(64, 8, generator=gen), torch.randn(8, generator=gen)]
    replicas = [[t.clone().to(device, torch.bfloat16) for t in start] for _ in range(2)]
    config = DiLoCoConfig()
    members = [DiLoCoMember(flatten_params(r), config) for r in replicas]
    for m in members:
        assert m.global_flat.device.type == "cpu" and m.global_flat.dtype == torch.float32
    for i, params in enumerate(replicas):  # stand-in for H inner steps: replicas drift apart
        for p in params:
            p.sub_(0.01 * (i + 1) * torch.ones_like(p))
    report = exchange_in_process(members, [flatten_params(r) for r in replicas], [100, 100], round_index=0)
    assert len(set(report.checksums)) == 1 and not report.rejected
    for m, params in zip(members, replicas):
        assign_flat(params, m.local_start())
        assert all(p.device.type == torch.device(device).type and p.dtype == torch.bfloat16 for p in params)
    assert not torch.equal(members[0].global_flat, flatten_params(start).float())


@pytest.mark.parametrize("device", ["cpu", CUDA])
async def test_wire_tensors_reach_a_half_precision_span_on_the_device(tiny_model_files, device):
    """What the servicer decodes is an fp32 CPU tensor; the node's span may be bf16 on a GPU.
    Forward, a session step and a LoRA backward take it there and answer in the request's
    device and dtype (a GPU node used to refuse every request: "hidden_states are on cpu")."""
    from pollinate.node.adapters import AdapterHost
    from pollinate.node.config import ServingConfig
    from pollinate.node.sessions import SessionConfig
    from pollinate.node.span_server import SpanServer
    from pollinate.protocol.shared import JobSpec
    from pollinate.node.training import backward_step, make_job

    n = tiny_model_files.num_blocks
    reference = tiny_model_files.load_span(0, n, dtype=torch.float32, device="cpu")
    span = tiny_model_files.load_span(0, n, dtype=torch.bfloat16, device=device)
    server = SpanServer(span, model_id="tiny", num_blocks=n, hidden_size=span.hidden_size,
                        serving=ServingConfig(), sessions=SessionConfig())
    try:
        x = inputs(span.hidden_size, batch=1, seq=4)
        with torch.inference_mode():
            expected = reference(x)

        def close(got: torch.Tensor, want: torch.Tensor) -> None:
            assert got.device.type == "cpu" and got.dtype == torch.float32
            assert float((got - want).norm() / want.norm()) < 4e-2  # bf16, as above

        close(await server.forward(x), expected)
        session = server.open_session("s", max_length=8, batch_size=1)
        close(await server.step(session, x, 0), expected)

        host = AdapterHost()
        job = make_job("j", JobSpec(rank=4, alpha=8.0, lr=1e-2, seed=3), span, host)
        grad_in = backward_step(job, span, host, x, torch.ones_like(x))
        assert grad_in.device.type == "cpu" and grad_in.dtype == torch.float32
        assert bool(torch.isfinite(grad_in).all()) and float(grad_in.abs().sum()) > 0
        assert all(p.device.type == torch.device(device).type for p in job.adapter.parameters())
    finally:
        await server.shutdown()


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_adapters_on_a_half_precision_span_train_in_fp32(tiny_model_files, device):
    """A bf16 span's LoRA keeps fp32 weights (as PEFT does), so a small AdamW step is not
    rounded away: with lr 1e-4 most of A moves, where bf16 weights would keep most of it."""
    from pollinate.node.adapters import AdapterHost
    from pollinate.protocol.shared import JobSpec
    from pollinate.node.training import backward_step, make_job

    span = tiny_model_files.load_span(0, tiny_model_files.num_blocks, dtype=torch.bfloat16, device=device)
    host = AdapterHost()
    job = make_job("j", JobSpec(rank=4, alpha=8.0, lr=1e-4, seed=3), span, host)
    assert {p.dtype for p in job.adapter.parameters()} == {torch.float32}
    before = {k: v.detach().clone() for k, v in job.adapter.named_parameters()}
    x = inputs(span.hidden_size, batch=1, seq=4)
    with host.use(job.adapter), torch.no_grad():
        assert span(x.to(device, torch.bfloat16)).dtype == torch.bfloat16  # the stream stays bf16
    backward_step(job, span, host, x, torch.ones_like(x))  # micro_batches 1: one AdamW step
    a_moved = [float((p.detach() != before[k]).float().mean())
               for k, p in job.adapter.named_parameters() if k.startswith("lora_a")]
    assert min(a_moved) > 0.9, a_moved
