"""Quantised spans: a node holds its blocks' Linear weights in 8 or 4 bits (issue 19).

    span = files.load_span(0, 10, quant="int8")      # or quantize_span(span, "int4")

Both use torchao's weight-only quantisation (`torchao.quantization.quantize_`):

- `int8`: `Int8WeightOnlyConfig(granularity=PerGroup(32))`: int8 weights with a scale (and a
  zero point) per 32 weights, llama.cpp's Q8_0 layout; activations and the matmul stay in
  the span's dtype. One scale per output row, torchao's default, takes 13% fewer bytes but
  measured top-1 agreement 0.965 against fp32 on SmolLM2 (1024 tokens), below the 0.98 the
  issue asks; groups of 32 measured 0.980 (docs/models.md has both runs).
- `int4`: 4-bit values packed two to a byte, with a bf16 scale and a bf16 zero point per 32
  weights: tinygemm's asymmetric layout (as llama.cpp's Q4_1, the zero point a float),
  0.5 + 4/32 bytes per weight (0.156 of fp32). On the CPU, torchao's
  `PrototypeInt4WeightOnlyConfig` (`Int4OpaqueTensor`; the matmul is
  `aten._weight_int4pack_mm_for_cpu`, in torch itself: no extra kernels); on CUDA,
  `Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")` (tinygemm, compute
  capability 8.0+). Both kernels take bf16: the Linear's input is cast to bf16 and its output
  back to the span's dtype (what torchao's CUDA path does itself), accumulation is fp32 inside
  the kernel. Why bf16 on a fp32 span too: the CPU kernel's fp32 path is a scalar loop, 430 ms
  for 256 tokens through one 576x1536 Linear against 9 ms in bf16 and 4.6 ms for the fp32
  Linear (and fp32 scales would take 0.5 + 8/32 = 0.75 bytes per weight, not 0.625). Neither kernel has a
  derivative, so the input gradient (what Backward returns, and what adapters below need) is
  taken against the dequantised weight that the same kernel produces from an identity
  matrix, see `_Int4Linear`. The int4 layout before this one, torchao's `IntxWeightOnlyConfig`
  (`unpacked_to_int8`), stored one value per byte and saved nothing over int8. bitsandbytes'
  NF4 was tried and left out: importing it on an AVX512-BF16 CPU asks the Hugging Face hub
  for a kernel (DESIGN.md invariant 6: nothing downloads unless the user named a remote model).

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
import types

import torch
from torch import nn

logger = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8", "int4")
# Weights per scale, both modes: llama.cpp's Q8_0 and Q4_1 blocks (GPTQ uses 32-128); smaller
# groups track outliers better, at more scale bytes per group (int8: fp32 scale + int8 zero
# point, 5; int4: bf16 scale + bf16 zero point, 4).
GROUP = 32
# What int4's kernels compute in, and its scales' and zero points' dtype (see above).
INT4_DTYPE = torch.bfloat16


class QuantError(ValueError):
    """A quantisation mode that is unknown or cannot run here; the message says why."""


def check_mode(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise QuantError(f"unknown quantisation {mode!r}; known: {', '.join(QUANT_MODES)}")
    return mode


def weight_bytes_per_param(mode: str, dtype: torch.dtype) -> float:
    """Bytes one Linear weight takes under `mode` (dtype: the span's). int8: a byte per value
    plus an fp32 scale and an int8 zero point per GROUP weights; int4: half a byte per value
    plus a bf16 scale and a bf16 zero point per GROUP weights. (On CUDA, tinygemm
    also pads in_features to a multiple of 1024 and out_features to one of 8: not counted.)"""
    check_mode(mode)
    if mode == "none":
        return float(dtype.itemsize)
    if mode == "int8":
        return 1.0 + 5.0 / GROUP
    return 0.5 + 2.0 * INT4_DTYPE.itemsize / GROUP


def int4_unavailable(device: torch.device) -> str:
    """Why int4's kernels cannot run on `device`, or "" when they can."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return "int4 on CUDA (tinygemm) needs compute capability 8.0+ (Ampere or newer)"
    if device.type not in ("cpu", "cuda"):
        return f"int4 runs on the CPU or CUDA, not on {device.type}"
    return ""


def int4_config(device: torch.device):
    """torchao's packed int4 weight-only config for bf16 weights on `device` (see the module
    docstring); QuantError where neither kernel runs."""
    if why := int4_unavailable(device):
        raise QuantError(why)
    if device.type == "cpu":
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=GROUP, set_inductor_config=False)
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=GROUP, int4_packing_format="tile_packed_to_4d",
                                set_inductor_config=False)


def quantize_span(span: nn.Module, mode: str) -> nn.Module:
    """Quantise the Linear weights of `span`'s blocks in place (see the module docstring)."""
    check_mode(mode)
    if mode == "none":
        return span
    if getattr(span, "quant", "none") != "none":
        raise QuantError(f"span is already quantised ({span.quant})")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup
    except ImportError as e:
        raise QuantError(f"{mode} spans need torchao: pip install --no-deps torchao") from e
    for block in span.layers.values():
        bad = [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and m.in_features % GROUP]
        if bad:
            raise QuantError(f"{mode} needs Linear inputs that are multiples of {GROUP}; {bad} are not")
    if mode == "int8":  # set_inductor_config=False: no global torch.compile settings
        quantize_(span.layers, Int8WeightOnlyConfig(granularity=PerGroup(GROUP), set_inductor_config=False))
    else:
        config = int4_config(span.device)
        linears = [m for m in span.layers.modules() if isinstance(m, nn.Linear)]
        for module in linears:  # the kernels quantise from, and compute in, bf16
            module.weight = nn.Parameter(module.weight.detach().to(INT4_DTYPE), requires_grad=False)
        quantize_(span.layers, config)
        for module in linears:
            module.forward = types.MethodType(_int4_linear_forward, module)
    span.quant = mode
    span.requires_grad_(False)
    logger.info("blocks %d:%d quantised to %s: %.1f MiB of weights", span.start, span.end, mode,
                span_weight_bytes(span) / 2**20)
    return span


class _Int4Linear(torch.autograd.Function):
    """y = x W^T + b through torchao's int4 kernel (x cast to bf16, y back to x's dtype, b
    added in x's dtype), with the input gradient the kernel lacks: dL/dx = dL/dy W, W
    dequantised by the kernel itself (identity @ W^T: each output is one weight times 1). The
    weight is frozen; a bias (frozen on every span) gets no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight
        y = nn.functional.linear(x.to(INT4_DTYPE), weight).to(x.dtype)
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = ctx.weight
        with torch.no_grad():
            eye = torch.eye(weight.shape[1], dtype=INT4_DTYPE, device=grad_out.device)
            dequantised_t = nn.functional.linear(eye, weight).to(grad_out.dtype)  # (in, out): W^T
        return grad_out @ dequantised_t.T, None, None


def _int4_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _Int4Linear.apply(x, self.weight, self.bias)


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


