"""``cocktail``: CocktailSGD's compressor (Wang et al., 2023) for DiLoCo pseudo-gradients.

Three stages, each cheap on a CPU:

1. Random mask of ratio ``p``, seeded by the round: every member regenerates the same
   positions from the seed, so they cost no bytes. The mask comes from numpy's PCG64
   ``random_raw`` stream, 16 bits per coordinate: the bit generator's output is fixed
   across numpy versions and machines (a torch CPU generator is not documented to be, and
   ``torch.rand`` was 8x slower here). ``p`` is applied in steps of 2^-16.
2. Top-k of ratio ``k`` inside the mask, by magnitude. The threshold is the k-quantile of a
   strided sample of the masked magnitudes (the mask already made them a random subset),
   never a ``torch.topk`` over the tensor; so about k of the masked values survive, not
   exactly k. Zeros are never kept: dropping them is lossless.
3. ``bits``-bit symmetric quantization of the kept values, one fp32 scale per ``bucket``
   consecutive kept values (scale = absmax / (2^(bits-1) - 1), round to nearest; 1 bit
   sends sign times the bucket's mean magnitude).

Kept positions travel as a bitmap over the mask, or as delta-coded gaps when fewer than
1/16 of the masked values are kept and the gaps are smaller. zstd compresses the payload.

Body after the common header (little-endian):
    p f64, k f64, bits u8, bucket u32, seed u64, mask_count u64, kept u64,
    index_mode u8 (0 bitmap, 1 deltas), delta_width u8, then one zstd frame holding
    [positions | ceil(kept / bucket) fp32 scales | packed codes], then the CRC-32 of the
    whole frame before it (u32). The checksum matters here more than for the dense codecs:
    the mask is regenerated from the header, so a flipped bit in the shape or the seed
    would otherwise decode to a plausible, wrong tensor; it costs ~1 ms on a 0.5 MB frame.

Error bound: a kept value is off by at most scale / 2, a dropped one by |x|; so for
bits >= 2 no coordinate's error exceeds |x| (the codec never amplifies), and with
p = k = 1 and 8 bits the error is at most the bucket's absmax / 254.
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from pollinate.compression import bitpack
from pollinate.compression.codec import CompressionError, register
from pollinate.compression.frame import FrameHeader, FrameReader, FramedCodec, expect_size

logger = logging.getLogger(__name__)

MASK_RESOLUTION = 1 << 16  # p is compared against 16 random bits per coordinate
MAX_BUCKET = 1 << 16
MASK_CHUNK_WORDS = 1 << 18
BITMAP, DELTAS = 0, 1
PARAMS = "ddBIQQQBB"


@dataclass(frozen=True, kw_only=True)
class CocktailConfig:
    # fraction of coordinates in the round's random mask; 0.1 is CocktailSGD's default
    p: float = 0.1
    # fraction of the masked coordinates kept, by magnitude; 0.2 is CocktailSGD's default
    k: float = 0.2
    # bits per kept value, 1..8; 4 is CocktailSGD's default
    bits: int = 4
    # kept values per fp32 scale; 128 as in CocktailSGD (4 bytes per 128 values = 0.25 bit)
    bucket: int = 128
    # zstd level for the payload; 3 is zstd's default: the packed codes are near-random,
    # so higher levels cost time and gain under 1% (measured on the benchmark's tensor)
    zstd_level: int = 3
    # masked magnitudes sampled to place the top-k threshold; 65536 puts the kept fraction
    # within about 1% of k (binomial error of a quantile from 2^16 draws)
    sample_size: int = 65536

    def __post_init__(self) -> None:
        for name in ("p", "k"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"cocktail {name} must be in (0, 1], got {value!r}")
        if self.p * MASK_RESOLUTION < 1:
            raise ValueError(f"cocktail p must be >= 2^-16 (the mask's step), got {self.p!r}")
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"cocktail bits must be an int in [1, 8], got {self.bits!r}")
        if not isinstance(self.bucket, int) or not 1 <= self.bucket <= MAX_BUCKET:
            raise ValueError(
                f"cocktail bucket must be an int in [1, {MAX_BUCKET}], got {self.bucket!r}")
        if not isinstance(self.zstd_level, int) or not 1 <= self.zstd_level <= 22:
            raise ValueError(f"cocktail zstd_level must be in [1, 22], got {self.zstd_level!r}")
        if not isinstance(self.sample_size, int) or self.sample_size < 1024:
            raise ValueError(f"cocktail sample_size must be >= 1024, got {self.sample_size!r}")


def random_mask(numel: int, p: float, seed: int) -> np.ndarray | None:
    """Sorted positions in the round's mask, or None for p = 1 (every position)."""
    threshold = np.uint16(min(round(p * MASK_RESOLUTION), MASK_RESOLUTION - 1))
    if round(p * MASK_RESOLUTION) >= MASK_RESOLUTION:
        return None
    generator = np.random.PCG64(seed)
    words = math.ceil(numel / 4)  # four 16-bit draws per 64-bit word
    parts = []
    # chunks of 2 MiB of draws stay in cache, where one 30M-element pass would stream
    # 60 MB of draws and 30 MB of comparisons through memory
    for start in range(0, words, MASK_CHUNK_WORDS):
        draws = generator.random_raw(min(MASK_CHUNK_WORDS, words - start))
        hits = np.flatnonzero(draws.astype("<u8", copy=False).view("<u2") < threshold)
        parts.append(hits + 4 * start if start else hits)
    positions = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    if numel % 4:  # the last word's spare draws
        positions = positions[:np.searchsorted(positions, numel)]
    return positions


def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _topk_threshold(magnitude: torch.Tensor, k: float, sample_size: int) -> float:
    m = magnitude.numel()
    if m == 0 or k >= 1:
        return 0.0
    sample = magnitude if m <= 2 * sample_size else magnitude[::m // sample_size]
    keep = max(1, math.ceil(k * sample.numel()))
    return float(torch.kthvalue(sample, sample.numel() - keep + 1).values)


def quantize(values: torch.Tensor, bits: int, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """(fp32 scale per bucket, uint8 codes) for nonzero fp32 ``values``."""
    count = values.numel()
    buckets = math.ceil(count / bucket)
    rows = torch.nn.functional.pad(values, (0, buckets * bucket - count)).view(buckets, bucket)
    if bits == 1:
        lengths = torch.full((buckets,), float(bucket), dtype=torch.float64)
        lengths[-1:] = count - (buckets - 1) * bucket if buckets else 0
        # mean |x| minimises the L2 error of sign x scale; summed in fp64 so that huge
        # values cannot overflow
        scale = (rows.abs().sum(dim=1, dtype=torch.float64) / lengths).to(torch.float32)
        codes = (rows >= 0).to(torch.uint8)
    else:
        qmax = _qmax(bits)
        scale = rows.abs().amax(dim=1) / qmax
        # quantize against the fp32 scale the decoder will see; a zero scale means an
        # all-zero bucket (only padding), whose codes are then the zero level
        step = torch.where(scale > 0, scale, 1.0).unsqueeze(1)
        codes = torch.round(rows / step).clamp_(-qmax, qmax).add_(qmax).to(torch.uint8)
    return scale.numpy(), codes.view(-1)[:count].numpy()


def dequantize(scale: torch.Tensor, codes: np.ndarray, bits: int, bucket: int) -> torch.Tensor:
    count = codes.size
    levels = torch.from_numpy(codes.astype(np.float32))
    levels = levels * 2 - 1 if bits == 1 else levels - _qmax(bits)
    per_value = scale.repeat_interleave(bucket)[:count]
    return levels * per_value


@register("cocktail")
class CocktailCodec(FramedCodec):
    codec_id = "cocktail"
    checksum = True

    def __init__(self, config: CocktailConfig | None = None, **params: object) -> None:
        self.config = config if config is not None else CocktailConfig(**params)

    def _encode_body(self, flat: torch.Tensor, *, seed: int) -> bytes:
        cfg = self.config
        x = flat.to(torch.float32)
        mask = random_mask(x.numel(), cfg.p, seed)
        masked = x if mask is None else x[torch.from_numpy(mask)]
        magnitude = masked.abs()
        threshold = _topk_threshold(magnitude, cfg.k, cfg.sample_size)
        keep = magnitude >= threshold if threshold > 0 else magnitude > 0
        keep_np = keep.numpy()
        positions = torch.from_numpy(np.flatnonzero(keep_np))  # numpy's is 2x torch's here
        scale, codes = quantize(masked[positions], cfg.bits, cfg.bucket)

        m, kept = masked.numel(), positions.numel()
        index_mode, width, index = BITMAP, 0, None
        if kept * 16 < m:  # sparse: gaps may beat one bit per masked coordinate
            pos = positions.numpy()
            width = bitpack.delta_width(pos)
            if kept * width < math.ceil(m / 8):
                index_mode, index = DELTAS, bitpack.pack_deltas(pos, width)
            else:
                width = 0
        if index is None:
            index = bitpack.pack_bitmap(keep_np)
        payload = b"".join((index, scale.tobytes(), bitpack.pack_codes(codes, cfg.bits)))
        packed = zstandard.ZstdCompressor(level=cfg.zstd_level).compress(payload)
        head = struct.pack("<" + PARAMS, cfg.p, cfg.k, cfg.bits, cfg.bucket, seed, m, kept,
                           index_mode, width)
        return head + packed

    def _decode_body(self, reader: FrameReader, header: FrameHeader, *,
                     seed: int | None) -> torch.Tensor:
        p, k, bits, bucket, frame_seed, m, kept, index_mode, width = reader.unpack(
            PARAMS, "cocktail parameters")
        n = header.numel
        if not (math.isfinite(p) and 0 < p <= 1 and p * MASK_RESOLUTION >= 1):
            raise CompressionError(f"cocktail p={p} outside [2^-16, 1]")
        if not (math.isfinite(k) and 0 < k <= 1):
            raise CompressionError(f"cocktail k={k} outside (0, 1]")
        if not 1 <= bits <= 8:
            raise CompressionError(f"cocktail bits={bits} outside 1..8")
        if not 1 <= bucket <= MAX_BUCKET:
            raise CompressionError(f"cocktail bucket={bucket} outside [1, {MAX_BUCKET}]")
        if seed is not None and seed != frame_seed:
            raise CompressionError(f"frame was encoded for seed {frame_seed}, expected {seed}")
        if frame_seed >= 1 << 63:
            raise CompressionError(f"cocktail seed {frame_seed} >= 2^63")
        if m > n or kept > m:
            raise CompressionError(f"cocktail frame claims {kept} kept of {m} masked of {n}")
        spread = 12 * math.sqrt(n * p * (1 - p)) + 16  # the mask size is Binomial(n, p)
        if abs(m - round(p * MASK_RESOLUTION) / MASK_RESOLUTION * n) > spread:
            raise CompressionError(f"cocktail frame claims a mask of {m} of {n} at p={p}")
        if index_mode == BITMAP and width == 0:
            index_size = math.ceil(m / 8)
        elif index_mode == DELTAS and width in (1, 2, 4):
            index_size = kept * width
        else:
            raise CompressionError(f"unknown index mode {index_mode} (width {width})")
        scale_size = 4 * math.ceil(kept / bucket)
        payload_size = index_size + scale_size + bitpack.packed_size(kept, bits)

        compressed = reader.rest()
        try:
            declared = zstandard.frame_content_size(compressed)
            if declared != payload_size:  # checked before zstd allocates what the frame says
                raise CompressionError(f"cocktail payload declares {declared} bytes, "
                                       f"parameters imply {payload_size}")
            payload = memoryview(zstandard.ZstdDecompressor().decompress(
                compressed, max_output_size=payload_size))
        except zstandard.ZstdError as exc:
            raise CompressionError(f"cocktail payload is not a valid zstd frame: {exc}") from exc
        expect_size(len(payload), payload_size, "decompressed cocktail payload")

        index = payload[:index_size]
        scale = torch.frombuffer(bytearray(payload[index_size:index_size + scale_size]),
                                 dtype=torch.float32) if scale_size else torch.empty(0)
        if scale_size and (not bool(torch.isfinite(scale).all()) or bool((scale < 0).any())):
            raise CompressionError("cocktail frame holds negative or non-finite scales")
        codes = bitpack.unpack_codes(payload[index_size + scale_size:], kept, bits)
        if bits > 1 and kept and int(codes.max()) > 2 * _qmax(bits):
            raise CompressionError(f"code {int(codes.max())} outside the {bits}-bit range")

        mask = random_mask(n, p, frame_seed)
        if (n if mask is None else mask.size) != m:
            raise CompressionError(
                f"mask for seed {frame_seed} has {n if mask is None else mask.size} "
                f"positions, frame says {m}")
        if index_mode == BITMAP:
            positions = bitpack.unpack_bitmap(index, m, kept)
        else:
            positions = bitpack.unpack_deltas(index, kept, width, m)
        targets = positions if mask is None else mask[positions]
        out = torch.zeros(n, dtype=torch.float32)
        out[torch.from_numpy(targets)] = dequantize(scale, codes, bits, bucket)
        return out.to(header.dtype)

    def error_bound(self, tensor: torch.Tensor) -> torch.Tensor:
        x = tensor.detach().float().abs()
        if self.config.bits == 1:  # sign x mean magnitude can overshoot small values
            return torch.full_like(x, float(x.max()) if x.numel() else 0.0) * (1 + 2.0**-20)
        return x * (1 + 2.0**-20) + 2.0**-140
