"""Quantised spans: a node holds its blocks' Linear weights in 8 or 4 bits (issue 19).

    span = files.load_span(0, 10, quant="int8")      # or quantize_span(span, "int4")

Both use torchao's weight-only quantisation (`torchao.quantization.quantize_`):

- `int8`: `Int8WeightOnlyConfig`: symmetric int8 weights with one scale per output row;
  activations and the matmul stay in the span's dtype.
- `int4`: `IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32),
  mapping_type=ASYMMETRIC)`: 4-bit values with a scale and a zero point per 32 weights (the
  layout of GPTQ's and llama.cpp's Q4_1; on SmolLM2, whose weights come from a Q4_1 GGUF, it
  measured perplexity x1.24 where symmetric int4 measured x1.67, over 256 tokens of
  benchmarks/bench_models.py --quick), dequantised for the matmul. torchao
  stores these values one per byte (its `unpacked_to_int8` layout, the one that runs on any
  device), so int4 takes about 1.16 bytes per weight: a little more than int8 (1 byte + a
  scale per row), for less fidelity. It is here as the 4-bit path to build on, not as a
  memory saving: torchao's packed int4 layouts need CUDA (`tile_packed_to_4d`, bf16) or
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
# int4: weights per scale. 32 is torchao's usual group for 4-bit weight-only (GPTQ and
# llama.cpp's Q4_0 use 32-128); smaller groups track outliers better, at more scale bytes.
INT4_GROUP = 32


class QuantError(ValueError):
    """A quantisation mode that is unknown or cannot run here; the message says why."""


def check_mode(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise QuantError(f"unknown quantisation {mode!r}; known: {', '.join(QUANT_MODES)}")
    return mode


def weight_bytes_per_param(mode: str, dtype: torch.dtype, *, in_features: int = 0) -> float:
    """Bytes one Linear weight takes under `mode` (dtype: the span's), scales included:
    int8: 1 byte + an fp32 scale and an int8 zero point per row of `in_features` weights
    (0: scales ignored); int4: 1 byte (torchao's unpacked layout) + an fp32 scale and an
    int8 zero point per INT4_GROUP weights."""
    check_mode(mode)
    if mode == "none":
        return float(dtype.itemsize)
    if mode == "int8":
        return 1.0 + (5.0 / in_features if in_features else 0.0)
    return 1.0 + 5.0 / INT4_GROUP


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
    if mode == "int8":
        config = Int8WeightOnlyConfig(set_inductor_config=False)  # no global torch.compile settings
    else:
        config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP),
                                      mapping_type=MappingType.ASYMMETRIC)
    for block in span.layers.values():
        bad = [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and m.in_features % INT4_GROUP]
        if mode == "int4" and bad:
            raise QuantError(f"int4 needs Linear inputs that are multiples of {INT4_GROUP}; {bad} are not")
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


