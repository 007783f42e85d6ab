"""``int8`` and ``int4``: blockwise absmax quantization, one fp32 scale per block of values.

For activations and dense pseudo-gradients: a quarter (int8) or an eighth (int4) of fp32's
bytes plus 4 bytes per block. Each block of ``block`` consecutive values (flattened order)
stores scale = absmax / QMAX and round(x / scale), QMAX = 127 (int8) or 7 (int4), so an
outlier only coarsens its own block. Error bound per element: scale / 2 (plus fp32
rounding; see ``error_bound``).

Body: block (u32), ceil(n / block) scales (fp32), n values: int8 (-128 never appears), or
int4 as code + 8, two per byte, low nibble first, as int4row's (-8 never appears).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from pollinate.compression.bitpack import pack_codes, packed_size, unpack_codes
from pollinate.compression.codec import CompressionError, register
from pollinate.compression.frame import FrameHeader, FrameReader, FramedCodec, check_scales, expect_size

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
    qmax = QMAX  # codes in [-qmax, qmax]
    bits = 8

    def __init__(self, config: Int8Config | None = None, **params: object) -> None:
        self.config = config if config is not None else Int8Config(**params)

    def _encode_body(self, flat: torch.Tensor, *, seed: int) -> bytes:
        block, x = self.config.block, flat.to(torch.float32).numpy()
        n = x.size
        scales = np.empty(math.ceil(n / block), dtype="<f4")
        codes = np.empty(n, dtype=np.int8)
        for start, end in _chunks(n, block):
            rows = _rows(x[start:end], block)
            scale = np.maximum(rows.max(axis=1), -rows.min(axis=1)) / np.float32(self.qmax)
            scales[start // block:start // block + scale.size] = scale
            q = rows / np.where(scale > 0, scale, np.float32(1))[:, None]
            np.rint(q, out=q)
            np.clip(q, -self.qmax, self.qmax, out=q)
            codes[start:end] = q.reshape(-1)[:end - start]
        values = codes.tobytes() if self.bits == 8 else pack_codes((codes + self.qmax + 1).astype(np.uint8), self.bits)
        return b"".join((np.uint32(block).tobytes(), scales.tobytes(), values))

    def _decode_body(self, reader: FrameReader, header: FrameHeader, *,
                     seed: int | None) -> torch.Tensor:
        (block,) = reader.unpack("I", "block size")
        name = self.codec_id
        if not 1 <= block <= MAX_BLOCK:
            raise CompressionError(f"{name} block size {block} outside [1, {MAX_BLOCK}]")
        n = header.numel
        num_blocks = math.ceil(n / block)
        value_bytes = packed_size(n, self.bits)
        expect_size(reader.remaining, 4 * num_blocks + value_bytes, f"{name} body for {n} values")
        if n == 0:
            return torch.empty(0, dtype=header.dtype)
        scales = np.frombuffer(reader.take(4 * num_blocks, "scales"), dtype="<f4")
        check_scales(scales, self.qmax, name)
        values = reader.take(value_bytes, "values")
        if self.bits == 8:
            codes = np.frombuffer(values, dtype=np.int8)
        else:
            codes = unpack_codes(values, n, self.bits).astype(np.int8) - np.int8(self.qmax + 1)
        if codes.min() < -self.qmax or codes.max() > self.qmax:  # two reductions, no mask as large as the frame
            raise CompressionError(f"{name} frame holds a code outside [-{self.qmax}, {self.qmax}], which the "
                                   "encoder never writes")
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
        bound = absmax / (2 * self.qmax) + x.abs() * 2.0**-22 + 2.0**-140
        return bound.reshape(tensor.shape)


@register("int4")
class Int4Codec(Int8Codec):
    """Half of int8's value bytes at 1/18 of its resolution: for frames whose rounding error
    is carried into the next round by error feedback (DiLoCoConfig.solo_codec)."""

    codec_id = "int4"
    qmax = 7
    bits = 4
