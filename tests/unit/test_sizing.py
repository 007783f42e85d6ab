"""Span sizing from given memory figures: pure arithmetic, checked by hand."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig

from pollinate.node.sizing import (
    GiB,
    MiB,
    BlockShape,
    SizingConfig,
    SpanDoesNotFit,
    choose_num_blocks,
    choose_quant,
    cpu_available_bytes,
    free_memory_bytes,
    plan_span,
    require_fit,
)

SMOLLM2 = BlockShape(hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3, head_dim=64, num_blocks=30)
LLAMA2_7B = BlockShape(hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32, head_dim=128, num_blocks=32)
# No KV cache, no training, no headroom: only weights count.
WEIGHTS_ONLY = SizingConfig(kv_cache_tokens=0, training_tokens=0, headroom_bytes=0, headroom_fraction=0.0)


def test_block_parameter_counts_match_the_published_models():
    # SmolLM2-135M: 134,515,008 parameters = 30 blocks + 49152 x 576 tied embedding + final norm.
    assert 30 * SMOLLM2.params_per_block() + 49152 * 576 + 576 == 134_515_008
    # Llama-2-7B: 6,738,415,616 = 32 blocks + untied embedding and LM head (2 x 32000 x 4096) + norm.
    assert 32 * LLAMA2_7B.params_per_block() + 2 * 32000 * 4096 + 4096 == 6_738_415_616


def test_block_shape_from_transformers_config():
    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30
    )
    shape = BlockShape.from_config(config)
    # Counted on LlamaDecoderLayer itself: the same as the Llama arithmetic.
    assert dataclasses.replace(shape, block_params=0, linear_io=0, linear_params=0) == SMOLLM2
    assert shape.linear_params_per_block() == SMOLLM2.linear_params_per_block()
    assert shape.params_per_block() == SMOLLM2.params_per_block() == 3_540_096
    assert shape.lora_params_per_block(8) == SMOLLM2.lora_params_per_block(8)


@pytest.mark.parametrize("model_type, extra", [
    ("qwen2", lambda h, q, kv: q + 2 * kv),  # q/k/v biases
    ("qwen3", lambda h, q, kv: 2 * 16),  # q_norm and k_norm over head_dim 16
    ("gemma2", lambda h, q, kv: 2 * h),  # four norms instead of two
    ("gemma3_text", lambda h, q, kv: 2 * h + 2 * 16),  # four norms, q/k norms
    ("phi3", lambda h, q, kv: 0),  # fused q/k/v and gate/up: same parameters, fewer Linears
    ("mistral", lambda h, q, kv: 0),
])
def test_block_bytes_per_family_are_counted_on_the_family_layer(model_type, extra):
    from test_families import tiny_config

    config = tiny_config(model_type)
    shape = BlockShape.from_config(config)
    llama = dataclasses.replace(shape, block_params=0, linear_io=0, linear_params=0,
                                attention_bias=False, mlp_bias=False)
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    assert shape.params_per_block() == llama.params_per_block() + extra(shape.hidden_size, q, kv)
    # Phi-3 fuses q/k/v (three inputs of width h become one) and gate/up (two become one).
    fewer_inputs = 3 * shape.hidden_size if model_type == "phi3" else 0
    assert shape.lora_params_per_block(4) == llama.lora_params_per_block(4) - 4 * fewer_inputs


def test_weights_only_smollm2_bf16():
    s = plan_span(100 * MiB, SMOLLM2, torch.bfloat16, WEIGHTS_ONLY)
    assert s.weight_bytes_per_block == 3_540_096 * 2
    assert s.bytes_per_block == 7_080_192
    assert s.blocks_that_fit == 100 * MiB // 7_080_192 == 14


def test_kv_cache_bytes_per_block():
    cfg = SizingConfig(kv_cache_tokens=8192, training_tokens=0, headroom_bytes=0, headroom_fraction=0.0)
    s = plan_span(GiB, SMOLLM2, torch.float16, cfg)
    # 8192 tokens x (K and V) x 3 kv heads x 64 x 2 bytes = 6 MiB
    assert s.kv_bytes_per_block == 6 * MiB


def test_training_reserve_bytes_per_block():
    cfg = SizingConfig(kv_cache_tokens=0, training_tokens=1000, lora_rank=8, headroom_bytes=0, headroom_fraction=0.0)
    s = plan_span(GiB, SMOLLM2, torch.float32, cfg)
    lora = 8 * ((576 + 576) + 2 * (576 + 192) + (576 + 576) + 3 * (576 + 1536))
    activations = 1000 * (10 * 576 + 4 * 1536) * 4
    assert s.training_bytes_per_block == lora * 16 + activations


def test_24gb_card_llama2_7b_bf16_with_defaults():
    free = 23 * GiB  # what a 24 GB card reports free once the CUDA context exists
    s = plan_span(free, LLAMA2_7B, torch.bfloat16)
    headroom = 512 * MiB + int(0.05 * free)
    assert s.headroom_bytes == headroom
    assert s.usable_bytes == free - headroom
    assert s.weight_bytes_per_block == 202_383_360 * 2
    assert s.kv_bytes_per_block == 8192 * 2 * 32 * 128 * 2 == 128 * MiB
    assert s.blocks_that_fit == (free - headroom) // s.bytes_per_block == 25
    assert "25 blocks, 25 of the model's 32 hosted" in s.explain()


def test_small_model_is_capped_at_its_block_count():
    s = plan_span(23 * GiB, SMOLLM2, torch.bfloat16)
    assert s.blocks_that_fit == 30


def test_headroom_larger_than_free_leaves_nothing():
    s = plan_span(100 * MiB, SMOLLM2, torch.float32)
    assert (s.usable_bytes, s.blocks_that_fit) == (0, 0)


def test_requested_span_that_does_not_fit_names_the_numbers():
    s = plan_span(23 * GiB, LLAMA2_7B, torch.bfloat16)
    with pytest.raises(SpanDoesNotFit) as e:
        require_fit(s, 32)
    message = str(e.value)
    assert "32 blocks need" in message
    assert "at most 25 blocks fit" in message
    assert "bfloat16" in message
    assert f"{s.usable_bytes / GiB:.2f} GiB is usable" in message


def test_requested_span_that_fits_passes():
    s = plan_span(23 * GiB, LLAMA2_7B, torch.bfloat16)
    require_fit(s, 25)


def test_choose_num_blocks_auto_and_requested():
    assert choose_num_blocks(23 * GiB, LLAMA2_7B, torch.bfloat16)[0] == 25
    assert choose_num_blocks(23 * GiB, LLAMA2_7B, torch.bfloat16, requested=10)[0] == 10
    # fp32 halves nothing but doubles every per-block figure: 12 blocks fit.
    with pytest.raises(SpanDoesNotFit, match="at most 12 blocks fit"):
        choose_num_blocks(23 * GiB, LLAMA2_7B, torch.float32, requested=20)


def test_choose_num_blocks_not_even_one_block():
    with pytest.raises(SpanDoesNotFit, match="1 blocks need"):
        choose_num_blocks(1 * GiB, LLAMA2_7B, torch.bfloat16)


def test_choose_num_blocks_more_than_the_model_has():
    with pytest.raises(ValueError, match="model has only 30"):
        choose_num_blocks(23 * GiB, SMOLLM2, torch.bfloat16, requested=31)


@pytest.mark.parametrize(
    "kwargs", [{"kv_cache_tokens": -1}, {"headroom_fraction": 1.0}, {"lora_rank": -2}, {"training_tokens": -5}]
)
def test_sizing_config_rejects_bad_values(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        SizingConfig(**kwargs)


def test_block_shape_rejects_bad_gqa():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        BlockShape(hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=2, head_dim=64, num_blocks=30)


def test_cpu_available_bytes_reads_meminfo_and_cgroup(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n")
    no_cgroup = tmp_path / "none"
    assert cpu_available_bytes(str(meminfo), str(no_cgroup)) == 20_000_000 * 1024
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text(f"{8 * GiB}\n")
    (cgroup / "memory.current").write_text(f"{3 * GiB}\n")
    assert cpu_available_bytes(str(meminfo), str(cgroup)) == 5 * GiB
    (cgroup / "memory.max").write_text("max\n")
    assert cpu_available_bytes(str(meminfo), str(cgroup)) == 20_000_000 * 1024


def test_free_memory_on_this_cpu_is_plausible():
    free = free_memory_bytes("cpu")
    assert 64 * MiB < free < 64 * 1024 * GiB


def test_quant_auto_takes_int4_on_cuda_only_when_the_span_does_not_fit():
    """--quant auto (issue 19): Llama-2-7B on a 24 GB card fits 25 of 32 bf16 blocks with the
    default budgets; 20 blocks stay unquantised, the whole model goes int4, a CPU never does."""
    free = 23 * GiB
    quant, why = choose_quant("auto", device_type="cuda", free_bytes=free, shape=LLAMA2_7B, dtype=torch.bfloat16,
                              wanted_blocks=20)
    assert quant == "none" and why.startswith("auto: 20 blocks fit at bfloat16")
    quant, why = choose_quant("auto", device_type="cuda", free_bytes=free, shape=LLAMA2_7B, dtype=torch.bfloat16,
                              wanted_blocks=32)
    int4 = plan_span(free, LLAMA2_7B, torch.bfloat16, quant="int4")
    assert quant == "int4" and int4.blocks_that_fit == 32
    assert "32 blocks need" in why and "(25 fit)" in why and f"{int4.blocks_that_fit} fit" in why
    # a block's int4 weights: 0.5 + 4/32 bytes per Linear weight, norms at bf16
    linear = LLAMA2_7B.linear_params_per_block()
    assert int4.weight_bytes_per_block == round(linear * 0.625) + (LLAMA2_7B.params_per_block() - linear) * 2
    quant, why = choose_quant("auto", device_type="cuda", free_bytes=free, shape=LLAMA2_7B, dtype=torch.bfloat16,
                              wanted_blocks=32,
                              int4_unavailable="int4 on CUDA (tinygemm) needs compute capability 8.0+")
    assert quant == "none" and why.endswith("is usable, and int4 on CUDA (tinygemm) needs compute capability 8.0+")
    for device in ("cpu", "mps"):
        quant, why = choose_quant("auto", device_type=device, free_bytes=None, shape=LLAMA2_7B,
                                  dtype=torch.float32, wanted_blocks=32)
        assert quant == "none" and device in why
    assert choose_quant("int8", device_type="cuda", free_bytes=None, shape=LLAMA2_7B, dtype=torch.bfloat16,
                        wanted_blocks=32) == ("int8", "asked for")


def test_recompute_handoff_inputs_are_counted_once_per_span():
    cfg = SizingConfig(kv_cache_tokens=8192, training_tokens=0, headroom_bytes=0, headroom_fraction=0.0)
    without = plan_span(GiB, SMOLLM2, torch.float32, dataclasses.replace(cfg, session_inputs=False))
    with_inputs = plan_span(GiB, SMOLLM2, torch.float32, cfg)
    # 8192 tokens x 576 hidden x 4 bytes (fp32, the widest wire) = 18 MiB, for the whole span
    assert without.inputs_bytes == 0 and with_inputs.inputs_bytes == 18 * MiB
    assert with_inputs.bytes_per_block == without.bytes_per_block
    assert with_inputs.bytes_for(10) == without.bytes_for(10) + 18 * MiB
    assert with_inputs.blocks_that_fit == min(30, (GiB - 18 * MiB) // with_inputs.bytes_per_block)
    tight = plan_span(18 * MiB + 3 * without.bytes_per_block, SMOLLM2, torch.float32, cfg)
    assert tight.blocks_that_fit == 3
    require_fit(tight, 3)
    with pytest.raises(SpanDoesNotFit, match="session inputs"):
        require_fit(tight, 4)
