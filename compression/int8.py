"""``int8``: blockwise absmax quantization, one fp32 scale per block of values.

For activations and dense pseudo-gradients: a quarter of fp32's bytes plus 4 bytes per
block. Each block of ``block`` consecutive values (flattened order) stores
scale = absmax / 127 and round(x / scale) as int8, so an outlier only coarsens its own
block. Error bound per element: scale / 2 (plus fp32 rounding; see ``error_bound``).

Body: block (u32), ceil(n / block) scales (fp32), n values (int8).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from pollinate.compression.codec import CompressionError, register
from pollinate.compression.frame import FrameHeader, FrameReader, FramedCodec, expect_size

logger = logging.getLogger(__name__)

QMAX = 127  # symmetric: -128 is never produced, so negation is exact
MAX_BLOCK = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Int8Config:
    # values per fp32 scale; 128 costs 4/128 = 3% extra bytes and keeps an outlier's damage
    # to 128 neighbours (bitsandbytes uses 64-4096 for the same trade-off)
    block: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.block, int) or not 1 <= self.block <= MAX_BLOCK:
            raise ValueError(f"int8 block must be an int in [1, {MAX_BLOCK}], got {self.block!r}")


def _blocks(flat32: torch.Tensor, block: int) -> torch.Tensor:
    """flat32 padded with zeros to whole blocks, as (num_blocks, block)."""
    n = flat32.numel()
    num_blocks = math.ceil(n / block)
    if num_blocks * block != n:
        flat32 = torch.nn.functional.pad(flat32, (0, num_blocks * block - n))
    return flat32.view(num_blocks, block)


@register("int8")
class Int8Codec(FramedCodec):
    codec_id = "int8"

    def __init__(self, config: Int8Config | None = None, **params: object) -> None:
        self.config = config if config is not None else Int8Config(**params)

    def _encode_body(self, flat: torch.Tensor, *, seed: int) -> bytes:
        block = self.config.block
        rows = _blocks(flat.to(torch.float32), block)
        scale = rows.abs().amax(dim=1) / QMAX
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
        q = torch.round(rows / safe).clamp_(-QMAX, QMAX).to(torch.int8).view(-1)[:flat.numel()]
        return b"".join((np.uint32(block).tobytes(), scale.numpy().tobytes(), q.numpy().tobytes()))

    def _decode_body(self, reader: FrameReader, header: FrameHeader, *,
                     seed: int | None) -> torch.Tensor:
        (block,) = reader.unpack("I", "block size")
        if not 1 <= block <= MAX_BLOCK:
            raise CompressionError(f"int8 block size {block} outside [1, {MAX_BLOCK}]")
        n = header.numel
        num_blocks = math.ceil(n / block)
        expect_size(reader.remaining, 4 * num_blocks + n, f"int8 body for {n} values")
        if n == 0:
            return torch.empty(0, dtype=header.dtype)
        scale = torch.frombuffer(bytearray(reader.take(4 * num_blocks, "scales")),
                                 dtype=torch.float32)
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise CompressionError("int8 frame holds negative or non-finite scales")
        q = torch.frombuffer(bytearray(reader.take(n, "values")), dtype=torch.int8)
        if bool((q == -128).any()):
            raise CompressionError("int8 frame holds -128, which the encoder never writes")
        rows = _blocks(q.to(torch.float32), block)
        return (rows * scale.unsqueeze(1)).view(-1)[:n].to(header.dtype)

    def error_bound(self, tensor: torch.Tensor) -> torch.Tensor:
        x = tensor.detach().reshape(-1).float()
        rows = _blocks(x, self.config.block)
        absmax = rows.abs().amax(dim=1, keepdim=True).expand_as(rows).reshape(-1)[:x.numel()]
        # half a step, plus fp32 rounding of the scale and the product (2^-22 relative),
        # plus 2^-140 for blocks so small that the scale itself is subnormal
        bound = absmax / (2 * QMAX) + x.abs() * 2.0**-22 + 2.0**-140
        return bound.reshape(tensor.shape)
