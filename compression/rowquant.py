"""``int8row``, ``int4row``, ``int4row-sr``: absmax quantization per token row, outliers exact;
``int8row-zstd``, ``int4row-zstd``: the same, the body zstd-compressed (``ZstdRows``).

For activations and their gradients between spans (issue 12). A hidden-state tensor is
[batch, seq, hidden]; its rows are the last dimension, one token each. The ``int8`` codec's
flat blocks of 128 straddle tokens; these codecs give every row (or, at 4 bits, every group
of ``group`` values inside a row) its own fp32 scale, so a token with large activations
never coarsens its neighbours and a group never mixes two tokens. The last group of a row
may be short; no padding travels.

Outliers: the residual stream of a Llama-family model carries a few channels hundreds to
thousands of times larger than the rest (SmolLM2-135M: channel 507 reaches 2.5e4 at block
20 where the median |x| is 4), so one scale per row spends the whole code range on them
and rounds the rest to a handful of levels: int8 with one scale per row raised SmolLM2's
loss on the benchmark task from 2.763 to 2.825. The ``outliers`` largest |x| of each row
therefore travel exactly (fp32 value + index) and are left out of the scale, as LLM.int8()
keeps outlier features in 16 bits; with 4 of them per row the loss is 2.760, with 8 at
4 bits 2.766 (docs/compression.md).

- ``int8row``: 8 bits, one scale per row, 4 exact outliers per row: 604 bytes per SmolLM2
  token instead of 2304 in fp32. Round to nearest.
- ``int4row``: 4 bits, groups of 64 inside a row, 8 exact outliers per row: 372 bytes per
  SmolLM2 token. Round to nearest.
- ``int4row-sr``: as ``int4row`` with stochastic rounding (unbiased: E[decode] = x), for
  gradients whose rounding errors would otherwise keep the same sign step after step. The
  noise is seeded from the frame's seed and the tensor's bytes, so an encode is
  reproducible.

Error bound per element: 0 for an outlier; else scale / 2 rounding to nearest, one scale
stochastically (scale = absmax of the group without its outliers / qmax), plus fp32
rounding (see ``error_bound``).

Body: bits (u8), group (u32, values per scale; the row length where one scale covers a
row), outliers per row (u16), the scales (fp32, one per group, rows in order), the
outliers' indices in their row (u16, or u32 for rows over 65536 values; strictly
increasing within a row), their values (fp32), the codes (int8 at 8 bits; at 4 bits code
+ 8 packed two per byte, low nibble first; 0 at an outlier's place). The ``-zstd`` codecs
write the same head, then everything after it as one zstd frame with its content size,
which the decoder checks against the size the header implies before decompressing.
"""

from __future__ import annotations

import logging
import math
import threading
import zlib
from dataclasses import dataclass

from typing import ClassVar

import numpy as np
import torch
import zstandard

from pollinate.compression.bitpack import pack_codes, packed_size, unpack_codes
from pollinate.compression.codec import CompressionError, register
from pollinate.compression.frame import FrameHeader, FrameReader, FramedCodec, check_scales, expect_size, unzstd

logger = logging.getLogger(__name__)

MAX_GROUP = 1 << 24  # values per scale a frame may claim (a 1-d tensor's whole row)
MAX_OUTLIERS = 256  # exact values per row a frame may claim
QMAX = {8: 127, 4: 7}  # symmetric: -128 / -8 never produced, so negation is exact


@dataclass(frozen=True, kw_only=True)
class RowQuantConfig:
    # bits per value: 8 (one byte) or 4 (two values per byte)
    bits: int = 8
    # values per fp32 scale inside a row; 0 = the whole row. 64 at 4 bits costs 0.5 bit per
    # value and keeps an outlier channel's damage to its own 64 values (the group sizes of
    # GPTQ/AWQ-style 4-bit weights are 64-128 for the same trade-off)
    group: int = 0
    # stochastic rounding (unbiased) instead of round-to-nearest
    stochastic: bool = False
    # largest-|x| values per row sent exactly (fp32 + index, 6 bytes each) and left out of
    # the scales; 0 = none
    outliers: int = 0

    def __post_init__(self) -> None:
        if self.bits not in QMAX:
            raise ValueError(f"rowquant bits must be one of {sorted(QMAX)}, got {self.bits!r}")
        if not isinstance(self.group, int) or not 0 <= self.group <= MAX_GROUP:
            raise ValueError(f"rowquant group must be an int in [0, {MAX_GROUP}], got {self.group!r}")
        if not isinstance(self.outliers, int) or not 0 <= self.outliers <= MAX_OUTLIERS:
            raise ValueError(f"rowquant outliers must be an int in [0, {MAX_OUTLIERS}], got {self.outliers!r}")


def _row_length(shape: tuple[int, ...]) -> int:
    return shape[-1] if shape else 1


def _groups(x: torch.Tensor, row: int, group: int) -> torch.Tensor:
    """x (flat fp32, whole rows) as (num_groups, group), each row padded to whole groups."""
    rows = x.numel() // row
    per_row = math.ceil(row / group)
    x = x.view(rows, row)
    if per_row * group != row:
        x = torch.nn.functional.pad(x, (0, per_row * group - row))
    return x.reshape(rows * per_row, group)


class RowQuantCodec(FramedCodec):
    config: RowQuantConfig

    def __init__(self, config: RowQuantConfig) -> None:
        self.config = config
        self._local = threading.local()  # the row length of the tensor being encoded

    def _group_for(self, row: int) -> int:
        return min(self.config.group, row) if self.config.group else row

    def _encode_body(self, flat: torch.Tensor, *, seed: int) -> bytes:
        bits, n = self.config.bits, flat.numel()
        qmax = QMAX[bits]
        row = max(1, self._local.row)
        group, k = self._group_for(row), min(self.config.outliers, row)
        head = np.uint8(bits).tobytes() + np.uint32(group).tobytes() + np.uint16(k).tobytes()
        if n == 0:
            return head
        rows = flat.to(torch.float32).view(n // row, row)
        if k:
            index = rows.abs().topk(k, dim=1).indices.sort(dim=1).values
            exact = rows.gather(1, index)
            rows = rows.scatter(1, index, 0.0)  # a copy: the caller's tensor stays as it is
        g = _groups(rows.reshape(-1), row, group)
        scale = g.abs().amax(dim=1) / qmax
        q = g / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
        if self.config.stochastic:
            gen = torch.Generator().manual_seed(_noise_seed(seed, flat))
            q = torch.floor(q + torch.rand(q.shape, generator=gen))
        else:
            q = torch.round(q)
        per_row = math.ceil(row / group)
        codes = q.clamp_(-qmax, qmax).to(torch.int8).view(n // row, per_row * group)[:, :row].reshape(-1).numpy()
        body = codes.tobytes() if bits == 8 else pack_codes((codes + 8).astype(np.uint8), 4)
        parts = [scale.numpy().astype("<f4").tobytes()]
        if k:
            parts += [index.numpy().astype(_index_dtype(row)).tobytes(), exact.numpy().astype("<f4").tobytes()]
        return head + self._pack(b"".join(parts + [body]))

    def _pack(self, rest: bytes) -> bytes:
        """The body after its head (scales, outliers, codes) as it travels."""
        return rest

    def _unpack(self, reader: FrameReader, size: int, what: str) -> FrameReader:
        """A reader over the `size` bytes of scales, outliers and codes that follow the head
        (checked against what the frame holds before anything is allocated)."""
        expect_size(reader.remaining, size, what)
        return reader

    def encode(self, tensor: torch.Tensor, *, seed: int = 0) -> bytes:
        # the row length is the tensor's last dimension, which the flat body alone lacks
        self._local.row = _row_length(tuple(tensor.shape))
        return super().encode(tensor, seed=seed)

    def _decode_body(self, reader: FrameReader, header: FrameHeader, *,
                     seed: int | None) -> torch.Tensor:
        bits, group, k = reader.unpack("BIH", "bits, group and outliers")
        if bits != self.config.bits:
            raise CompressionError(f"{self.codec_id!r} frame holds {bits}-bit codes, "
                                   f"this codec reads {self.config.bits}")
        n, row = header.numel, _row_length(header.shape)
        if n == 0:
            return torch.empty(0, dtype=header.dtype)
        if group != self._group_for(row):
            raise CompressionError(f"{self.codec_id!r} frame has groups of {group} for rows of "
                                   f"{row}, expected {self._group_for(row)}")
        if k > min(MAX_OUTLIERS, row):
            raise CompressionError(f"{self.codec_id!r} frame claims {k} outliers in rows of {row}")
        rows = n // row
        per_row = math.ceil(row / group)
        num_groups = rows * per_row
        index_dtype = np.dtype(_index_dtype(row))
        code_bytes = n if bits == 8 else packed_size(n, 4)
        reader = self._unpack(reader, 4 * num_groups + rows * k * (index_dtype.itemsize + 4) + code_bytes,
                              f"{self.codec_id} body for {n} values")
        scales = torch.from_numpy(np.frombuffer(reader.take(4 * num_groups, "scales"), dtype="<f4").copy())
        check_scales(scales, QMAX[bits], self.codec_id)
        if k:
            index = np.frombuffer(reader.take(rows * k * index_dtype.itemsize, "outlier indices"),
                                  dtype=index_dtype).astype(np.int64).reshape(rows, k)
            if (index[:, 0] < 0).any() or (index[:, -1] >= row).any() or (np.diff(index, axis=1) <= 0).any():
                raise CompressionError(f"{self.codec_id!r} frame's outlier indices are not increasing "
                                       f"positions inside rows of {row}")
            exact = torch.from_numpy(np.frombuffer(reader.take(rows * k * 4, "outlier values"),
                                                   dtype="<f4").copy().reshape(rows, k))
            if not bool(torch.isfinite(exact).all()):
                raise CompressionError(f"{self.codec_id!r} frame holds non-finite outliers")
        raw = reader.take(code_bytes, "values")
        if bits == 8:
            codes = np.frombuffer(raw, dtype=np.int8)
            if (codes == -128).any():
                raise CompressionError(f"{self.codec_id!r} frame holds -128, which the encoder never writes")
        else:
            codes = unpack_codes(raw, n, 4)
            if (codes == 0).any():
                raise CompressionError(f"{self.codec_id!r} frame holds code -8, which the encoder never writes")
            codes = codes.astype(np.int8) - 8
        values = _groups(torch.from_numpy(codes.astype(np.float32)), row, group) * scales[:, None]
        values = values.view(rows, per_row * group)[:, :row]
        if k:
            values = values.scatter(1, torch.from_numpy(index), exact)
        reader.expect_end()
        return values.reshape(-1).to(header.dtype)

    def error_bound(self, tensor: torch.Tensor) -> torch.Tensor:
        x = tensor.detach().float()
        if x.numel() == 0:
            return torch.zeros(tensor.shape)
        row = _row_length(tuple(tensor.shape))
        group, k = self._group_for(row), min(self.config.outliers, row)
        rows = x.reshape(-1, row)
        if k:  # outliers travel exactly and leave the scales
            index = rows.abs().topk(k, dim=1).indices
            rows = rows.scatter(1, index, 0.0)
        g = _groups(rows.reshape(-1), row, group)
        absmax = g.abs().amax(dim=1, keepdim=True).expand_as(g)
        absmax = absmax.reshape(-1, math.ceil(row / group) * group)[:, :row]
        steps = 1.0 if self.config.stochastic else 0.5
        # the rounding step, plus fp32 rounding of the scale and the product (2^-22 relative),
        # plus 2^-140 for groups so small that the scale itself is subnormal
        bound = absmax * steps / QMAX[self.config.bits] + x.reshape(-1, row).abs() * 2.0**-22 + 2.0**-140
        if k:
            bound = bound.scatter(1, index, 0.0)
        return bound.reshape(tensor.shape)


class ZstdRows:
    """Mixin: the body after its head as one zstd frame (lossless: the decoded tensor is the
    plain codec's, bit for bit). What it finds on the wire (docs/compression.md): rows that
    repeat (a batch's examples share their chat template's prefix, and causal attention
    gives a shared prefix the same hidden states in every example, so its rows cross the
    wire once per example), the first span's input (embeddings: one row per vocabulary
    entry), rows of zeros (padding, and every position without a loss token in the last
    span's output gradient) and the codes' skewed distribution."""

    # zstd level: 1 is within 2% of level 9 on SmolLM2's activations (benchmarks/results/
    # 2026-12-07-wan.md) at a fraction of the time
    zstd_level: ClassVar[int] = 1

    def _pack(self, rest: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=self.zstd_level, write_content_size=True).compress(rest)

    def _unpack(self, reader: FrameReader, size: int, what: str) -> FrameReader:
        inner = unzstd(reader.rest(), what, size=size)
        return FrameReader(inner)


def _index_dtype(row: int) -> str:
    return "<u2" if row <= 1 << 16 else "<u4"


def _noise_seed(seed: int, flat: torch.Tensor) -> int:
    # the first 64 KiB name the tensor well enough: two different gradients get different
    # noise, the same one (a retried send) the same frame
    head = flat[:16384].to(torch.float32).numpy().tobytes()
    return (seed * 0x9E3779B1 + zlib.crc32(head)) % (1 << 63)


@register("int8row")
class Int8RowCodec(RowQuantCodec):
    codec_id = "int8row"

    def __init__(self, config: RowQuantConfig | None = None, **params: object) -> None:
        super().__init__(config if config is not None else RowQuantConfig(**{"bits": 8, "outliers": 4, **params}))


@register("int4row")
class Int4RowCodec(RowQuantCodec):
    codec_id = "int4row"

    def __init__(self, config: RowQuantConfig | None = None, **params: object) -> None:
        super().__init__(config if config is not None else RowQuantConfig(**{"bits": 4, "group": 64, "outliers": 8, **params}))


@register("int4row-sr")
class Int4RowSrCodec(RowQuantCodec):
    codec_id = "int4row-sr"

    def __init__(self, config: RowQuantConfig | None = None, **params: object) -> None:
        super().__init__(config if config is not None else RowQuantConfig(
            **{"bits": 4, "group": 64, "outliers": 8, "stochastic": True, **params}))


@register("int8row-zstd")
class Int8RowZstdCodec(ZstdRows, Int8RowCodec):
    codec_id = "int8row-zstd"


@register("int4row-zstd")
class Int4RowZstdCodec(ZstdRows, Int4RowCodec):
    codec_id = "int4row-zstd"
