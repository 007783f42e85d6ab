"""The header every codec's frame starts with, and the bounded reader that parses frames.

Layout (little-endian), identical for every codec so that a receiver can say what a frame
claims before it trusts any of it:

    magic    4 bytes  b"PLC" + format version (2)
    id_len   u8       length of the codec id
    codec    id_len   ASCII codec id, e.g. b"cocktail"
    dtype    u8       DTYPE_CODES below
    ndim     u8       at most MAX_NDIM
    shape    ndim x u64
    body     codec-specific (see each codec module)

Every size is checked against the bytes actually present and against ``max_elements``
before anything is allocated, so a hostile or truncated frame costs the receiver nothing
but the parse.
"""

from __future__ import annotations

import logging
import math
import struct
import zlib
from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import zstandard

from pollinate.compression.codec import Codec, CompressionError

logger = logging.getLogger(__name__)

MAGIC = b"PLC"
# 2: the cocktail body gained its mask-schedule byte (version 1 frames lack it)
VERSION = 2
# Tensors in Pollinate are at most 4-d (activations: batch x seq x hidden); 16 leaves room
# and keeps a hostile ndim from making the parser read a huge shape list.
MAX_NDIM = 16
# 2^30 elements = 4 GiB of fp32: above any single span's adapter state or activation
# batch, and the most a receiver allocates for one decoded tensor unless it passes a
# smaller ``max_elements`` (a sparse cocktail frame of a few hundred bytes can legitimately
# describe a tensor this large, so only this limit bounds what a frame makes us allocate).
MAX_ELEMENTS = 1 << 30

# Wire codes, never renumbered: a frame must mean the same thing to every version.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float64: 4,
    torch.int8: 5,
    torch.uint8: 6,
    torch.int16: 7,
    torch.int32: 8,
    torch.int64: 9,
    torch.bool: 10,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
# What the lossy codecs accept. float64 is left out: its values may exceed fp32's range,
# in which the lossy codecs compute; send it with ``none``.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class FrameHeader:
    codec_id: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def pack_header(codec_id: str, dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    if dtype not in DTYPE_CODES:
        raise CompressionError(f"dtype {dtype} cannot be framed")
    if len(shape) > MAX_NDIM:
        raise CompressionError(f"{len(shape)}-d tensor: frames carry at most {MAX_NDIM} dims")
    ident = codec_id.encode("ascii")
    return b"".join((
        MAGIC, bytes((VERSION, len(ident))), ident,
        bytes((DTYPE_CODES[dtype], len(shape))),
        struct.pack(f"<{len(shape)}Q", *shape),
    ))


class FrameReader:
    """Reads a frame front to back; every read names what it wanted when the frame is short."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self.offset = 0

    def drop_tail(self, size: int) -> memoryview:
        """Split off the last ``size`` bytes (a trailer) so that reads stop before them."""
        if size > self.remaining:
            raise CompressionError(f"truncated frame: no room for a {size}-byte trailer")
        tail = self._view[len(self._view) - size:]
        self._view = self._view[:len(self._view) - size]
        return tail

    @property
    def remaining(self) -> int:
        return len(self._view) - self.offset

    def take(self, size: int, what: str) -> memoryview:
        if size < 0 or size > self.remaining:
            raise CompressionError(
                f"truncated frame: {what} needs {size} bytes at offset {self.offset}, "
                f"{self.remaining} left")
        out = self._view[self.offset:self.offset + size]
        self.offset += size
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        fmt = "<" + fmt
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def rest(self) -> memoryview:
        return self.take(self.remaining, "body")

    def expect_end(self) -> None:
        if self.remaining:
            raise CompressionError(f"{self.remaining} trailing bytes after the frame")


def read_header(reader: FrameReader, *, expected_codec: str | None,
                max_elements: int = MAX_ELEMENTS) -> FrameHeader:
    """Parse and validate the common header; nothing the header claims is allocated here."""
    magic = bytes(reader.take(4, "magic"))
    if magic[:3] != MAGIC:
        raise CompressionError(f"not a Pollinate codec frame (magic {magic[:3]!r})")
    if magic[3] != VERSION:
        raise CompressionError(f"frame format version {magic[3]}, this build reads {VERSION}")
    (id_len,) = reader.unpack("B", "codec id length")
    try:
        codec_id = bytes(reader.take(id_len, "codec id")).decode("ascii")
    except UnicodeDecodeError as exc:
        raise CompressionError("codec id is not ASCII") from exc
    if expected_codec is not None and codec_id != expected_codec:
        raise CompressionError(
            f"frame was encoded by codec {codec_id!r}, decoder is {expected_codec!r}")
    dtype_code, ndim = reader.unpack("BB", "dtype and ndim")
    if dtype_code not in CODE_DTYPES:
        raise CompressionError(f"unknown dtype code {dtype_code}")
    if ndim > MAX_NDIM:
        raise CompressionError(f"frame claims {ndim} dims, at most {MAX_NDIM} allowed")
    shape = reader.unpack(f"{ndim}Q", "shape")
    numel = math.prod(shape)  # Python ints: a hostile shape cannot overflow this
    if numel > max_elements:
        raise CompressionError(
            f"frame claims shape {tuple(shape)} = {numel} elements, above the limit "
            f"{max_elements}")
    return FrameHeader(codec_id=codec_id, dtype=CODE_DTYPES[dtype_code], shape=tuple(shape))


def peek_header(data: bytes, *, max_elements: int = MAX_ELEMENTS) -> FrameHeader:
    """What a frame claims to be (codec, dtype, shape), validated, without decoding it."""
    return read_header(FrameReader(data), expected_codec=None, max_elements=max_elements)


def expect_size(got: int, want: int, what: str) -> None:
    if got != want:
        raise CompressionError(f"{what}: frame holds {got} bytes, header implies {want}")


def unzstd(compressed, what: str, *, size: int | None = None, max_size: int = 0) -> bytes:
    """The content of one zstd frame, its declared size checked before zstd allocates it: equal
    to ``size`` where a header implies the size, else at most ``max_size``. CompressionError for
    a frame without a declared size, a corrupt one, or one with trailing bytes."""
    try:
        declared = zstandard.frame_content_size(compressed)
        if declared != size if size is not None else not 0 <= declared <= max_size:
            want = f"{size}" if size is not None else f"at most {max_size}"
            raise CompressionError(f"{what}: the zstd frame declares {declared} bytes, want {want}")
        content = zstandard.ZstdDecompressor().decompress(compressed, max_output_size=declared,
                                                          allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CompressionError(f"{what}: not one valid zstd frame without trailing bytes: {exc}") from exc
    expect_size(len(content), declared, what)
    return content


def check_scales(scales, qmax: int, codec_id: str) -> None:
    """A decoder's fp32 scales (numpy array or CPU tensor): finite, non-negative and small
    enough that qmax x scale is finite too (an encoder's scale is absmax / qmax of finite
    values), so that no corrupt frame decodes to an infinity."""
    arr = np.asarray(scales, dtype=np.float32)
    if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0
                         and float(arr.max()) * qmax <= float(np.finfo(np.float32).max)):
        raise CompressionError(f"{codec_id!r} frame holds negative, non-finite or out-of-range scales")


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or +-Inf in `tensor`. min and max propagate NaN and expose +-Inf in one
    reduction pass; isfinite().all() is ~15x slower on a CPU (8 ms for 4M values) and
    allocates a mask as large as the tensor."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    low, high = torch.aminmax(tensor.reshape(-1))
    return math.isfinite(low.item()) and math.isfinite(high.item())


def check_finite(tensor: torch.Tensor, where: str = "the tensor to encode") -> None:
    if not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CompressionError(f"{bad} NaN/Inf values in {where}")


class FramedCodec(Codec):
    """A codec that writes the common header; subclasses handle the flat body only."""

    # dtypes this codec accepts; lossy codecs take floating point only
    dtypes: ClassVar[tuple[torch.dtype, ...]] = FLOAT_DTYPES
    # append a CRC-32 of the frame: for codecs whose small frames drive large outputs
    # (cocktail regenerates its mask from header fields), not for bulk activations
    checksum: ClassVar[bool] = False

    def encode(self, tensor: torch.Tensor, *, seed: int = 0) -> bytes:
        if not isinstance(tensor, torch.Tensor):
            raise CompressionError(f"expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in self.dtypes:
            raise CompressionError(
                f"codec {self.codec_id!r} cannot encode {tensor.dtype} "
                f"(accepts {', '.join(str(d) for d in self.dtypes)})")
        if not 0 <= seed < 1 << 63:
            raise CompressionError(f"seed must be in [0, 2^63), got {seed}")
        flat = tensor.detach().reshape(-1)
        if flat.device.type != "cpu":
            flat = flat.cpu()
        check_finite(flat)
        header = pack_header(self.codec_id, tensor.dtype, tuple(tensor.shape))
        frame = header + self._encode_body(flat.contiguous(), seed=seed)
        if self.checksum:
            frame += struct.pack("<I", zlib.crc32(frame))
        return frame

    def decode(self, data: bytes, *, seed: int | None = None,
               max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CompressionError(f"expected bytes, got {type(data).__name__}")
        reader = FrameReader(data)
        header = read_header(reader, expected_codec=self.codec_id, max_elements=max_elements)
        if header.dtype not in self.dtypes:
            raise CompressionError(f"codec {self.codec_id!r} does not carry {header.dtype}")
        if self.checksum:
            (stored,) = struct.unpack("<I", reader.drop_tail(4))
            if zlib.crc32(memoryview(data)[:len(data) - 4]) != stored:
                raise CompressionError(f"{self.codec_id!r} frame fails its CRC-32 check "
                                       "(corrupted or truncated)")
        try:
            flat = self._decode_body(reader, header, seed=seed)
        except CompressionError:
            raise
        except (ValueError, RuntimeError, OverflowError, struct.error) as exc:
            # zstd, numpy and torch report corrupt input in their own words; the caller
            # gets one error type whatever went wrong inside
            raise CompressionError(f"corrupt {self.codec_id!r} frame: {exc}") from exc
        reader.expect_end()
        return flat.reshape(header.shape)

    @abstractmethod
    def _encode_body(self, flat: torch.Tensor, *, seed: int) -> bytes:
        """Body bytes for a finite, contiguous 1-d CPU tensor of an accepted dtype."""

    @abstractmethod
    def _decode_body(self, reader: FrameReader, header: FrameHeader, *,
                     seed: int | None) -> torch.Tensor:
        """A 1-d tensor of header.numel elements in header.dtype; consume the whole body."""
