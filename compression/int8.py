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
CHUNK = 1 << 16  # values per step: 256 KiB of fp32, an L2's worth


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


def _chunks(n: int, block: int):
    """(start, end) ranges of whole blocks, about CHUNK values each (the last may be short).

    Working a cache-sized chunk at a time keeps the temporaries (|x|, x / scale, rounding)
    in L2; whole-tensor ops stream each through memory and were 3-5x slower on 30M values.
    """
    step = block * max(1, CHUNK // block)
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _rows(segment: np.ndarray, block: int) -> np.ndarray:
    if segment.size % block:
        padded = np.zeros(math.ceil(segment.size / block) * block, dtype=segment.dtype)
        padded[:segment.size] = segment
        segment = padded
    return segment.reshape(-1, block)


@register("int8")
class Int8Codec(FramedCodec):
    codec_id = "int8"

    def __init__(self, config: Int8Config | None = None, **params: object) -> None:
        self.config = config if config is not None else Int8Config(**params)

    def _encode_body(self, flat: torch.Tensor, *, seed: int) -> bytes:
        block, x = self.config.block, flat.to(torch.float32).numpy()
        n = x.size
        scales = np.empty(math.ceil(n / block), dtype="<f4")
        codes = np.empty(n, dtype=np.int8)
        for start, end in _chunks(n, block):
            rows = _rows(x[start:end], block)
            scale = np.maximum(rows.max(axis=1), -rows.min(axis=1)) / np.float32(QMAX)
            scales[start // block:start // block + scale.size] = scale
            q = rows / np.where(scale > 0, scale, np.float32(1))[:, None]
            np.rint(q, out=q)
            np.clip(q, -QMAX, QMAX, out=q)
            codes[start:end] = q.reshape(-1)[:end - start]
        return b"".join((np.uint32(block).tobytes(), scales.tobytes(), codes.tobytes()))

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
        scales = np.frombuffer(reader.take(4 * num_blocks, "scales"), dtype="<f4")
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise CompressionError("int8 frame holds negative or non-finite scales")
        codes = np.frombuffer(reader.take(n, "values"), dtype=np.int8)
        if (codes == -128).any():
            raise CompressionError("int8 frame holds -128, which the encoder never writes")
        out = np.empty(n, dtype=np.float32)
        for start, end in _chunks(n, block):
            rows = _rows(codes[start:end], block).astype(np.float32)
            rows *= scales[start // block:start // block + rows.shape[0], None]
            out[start:end] = rows.reshape(-1)[:end - start]
        return torch.from_numpy(out).to(header.dtype)

    def error_bound(self, tensor: torch.Tensor) -> torch.Tensor:
        x = tensor.detach().reshape(-1).float()
        rows = _blocks(x, self.config.block)
        absmax = rows.abs().amax(dim=1, keepdim=True).expand_as(rows).reshape(-1)[:x.numel()]
        # half a step, plus fp32 rounding of the scale and the product (2^-22 relative),
        # plus 2^-140 for blocks so small that the scale itself is subnormal
        bound = absmax / (2 * QMAX) + x.abs() * 2.0**-22 + 2.0**-140
        return bound.reshape(tensor.shape)
