"""Quantised spans: a node holds its blocks' Linear weights in 8 or 4 bits (issue 19).

    span = files.load_span(0, 10, quant="int8")      # or quantize_span(span, "int4")

Both use torchao's weight-only quantisation (`torchao.quantization.quantize_`):

- `int8`: `Int8WeightOnlyConfig(granularity=PerGroup(32))`: int8 weights with a scale (and a
  zero point) per 32 weights, llama.cpp's Q8_0 layout; activations and the matmul stay in
  the span's dtype. One scale per output row, torchao's default, takes 13% fewer bytes but
  measured top-1 agreement 0.965 against fp32 on SmolLM2 (1024 tokens), below the 0.98 the
  issue asks; groups of 32 measured 0.980 (docs/models.md has both runs).
- `int4`: `IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32),
  mapping_type=ASYMMETRIC)`: 4-bit values with a scale and a zero point per 32 weights (the
  layout of GPTQ's and llama.cpp's Q4_1; on SmolLM2, whose weights come from a Q4_1 GGUF, it
  measured perplexity x1.24 where symmetric int4 measured x1.67, over 256 tokens of
  benchmarks/bench_models.py --quick), dequantised for the matmul. torchao
  stores these values one per byte (its `unpacked_to_int8` layout, the one that runs on any
  device), so int4 takes the same 1.16 bytes per weight as int8, for less fidelity. It is
  here as the 4-bit path to build on, not as a memory saving: torchao's packed int4 layouts need CUDA (`tile_packed_to_4d`, bf16) or
  kernels this CPU build lacks, and are not used yet. bitsandbytes' NF4 was tried
  and left out: importing it on an AVX512-BF16 CPU asks the Hugging Face hub for a kernel
  (DESIGN.md invariant 6: nothing downloads unless the user named a remote model).

Only the decoder blocks' Linear weights are quantised; norms, biases and rotary tables keep
the span's dtype, and nothing on the client part changes. Quantisation happens after the
full-precision weights are loaded, so the converted cache stays exact and one cache serves
every choice. A quantised span is frozen as every span is; adapters hook its Linear modules
as before and keep their own parameters in fp32 (QLoRA: a frozen quantised base, an fp32
adapter). Full fine-tuning needs full-precision weights and is refused on it.

What it costs in fidelity and what it saves in memory is measured on SmolLM2 by
benchmarks/bench_models.py and written down in docs/models.md.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8", "int4")
# Weights per scale, both modes: llama.cpp's Q8_0 and Q4_1 blocks (GPTQ uses 32-128); smaller
# groups track outliers better, at more scale bytes (5 per group: fp32 scale, int8 zero point).
GROUP = 32


class QuantError(ValueError):
    """A quantisation mode that is unknown or cannot run here; the message says why."""


def check_mode(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise QuantError(f"unknown quantisation {mode!r}; known: {', '.join(QUANT_MODES)}")
    return mode


def weight_bytes_per_param(mode: str, dtype: torch.dtype) -> float:
    """Bytes one Linear weight takes under `mode` (dtype: the span's): int8 and int4 both
    store a byte per value (torchao's unpacked layout) plus an fp32 scale and an int8 zero
    point per GROUP weights."""
    check_mode(mode)
    if mode == "none":
        return float(dtype.itemsize)
    return 1.0 + 5.0 / GROUP


def quantize_span(span: nn.Module, mode: str) -> nn.Module:
    """Quantise the Linear weights of `span`'s blocks in place (see the module docstring)."""
    check_mode(mode)
    if mode == "none":
        return span
    if getattr(span, "quant", "none") != "none":
        raise QuantError(f"span is already quantised ({span.quant})")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup
        from torchao.quantization.quant_primitives import MappingType
    except ImportError as e:
        raise QuantError(f"{mode} spans need torchao: pip install --no-deps torchao") from e
    if mode == "int8":  # set_inductor_config=False: no global torch.compile settings
        config = Int8WeightOnlyConfig(granularity=PerGroup(GROUP), set_inductor_config=False)
    else:
        config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(GROUP),
                                      mapping_type=MappingType.ASYMMETRIC)
    for block in span.layers.values():
        bad = [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and m.in_features % GROUP]
        if bad:
            raise QuantError(f"{mode} needs Linear inputs that are multiples of {GROUP}; {bad} are not")
    quantize_(span.layers, config)
    span.quant = mode
    span.requires_grad_(False)
    logger.info("blocks %d:%d quantised to %s: %.1f MiB of weights", span.start, span.end, mode,
                span_weight_bytes(span) / 2**20)
    return span


def span_weight_bytes(module: nn.Module) -> int:
    """Bytes the parameters and buffers of `module` hold, quantised data and scales included."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor: the inner tensors (values, scales, zero points) of a torchao
    tensor subclass, else numel x element size."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


