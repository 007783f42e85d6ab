"""``cocktail``: CocktailSGD's compressor (Wang et al., 2023) for DiLoCo pseudo-gradients.

Three stages, each cheap on a CPU:

1. Random mask of ratio ``p``, seeded by the round: every member regenerates the same
   positions from the seed, so they cost no bytes. Each masked position is drawn as a
   geometric gap from the previous one, 32 random bits per gap from numpy's PCG64
   ``random_raw`` stream: the bit generator's output is fixed across numpy versions and
   machines (a torch CPU generator is not documented to be), and p*n draws instead of n
   made the mask 5x cheaper than ``torch.rand(n) < p`` on the benchmark's 30M elements.
   With ``cycled=True`` the mask is instead a window over fixed random phases that moves
   every round (``cycled_mask``): still a random p-subset each round, but every coordinate
   is sent at least once in any ceil(1/p) consecutive rounds.
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
    index_mode u8 (0 bitmap, 1 deltas), delta_width u8, mask schedule u8 (0 Bernoulli,
    1 cycled), then one zstd frame holding
    [positions | ceil(kept / bucket) fp32 scales | packed codes], then the CRC-32 of the
    whole frame before it (u32). The checksum matters here more than for the dense codecs:
    the mask is regenerated from the header, so a flipped bit in the shape or the seed
    would otherwise decode to a plausible, wrong tensor; it costs ~1 ms on a 0.5 MB frame.

Error bound: a kept value is off by at most scale / 2, a dropped one by |x|; so for
bits >= 2 no coordinate's error exceeds |x| (the codec never amplifies), and with
p = k = 1 and 8 bits the error is at most the bucket's absmax / 254.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import threading
import struct
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from pollinate.compression import bitpack
from pollinate.compression.codec import CompressionError, register
from pollinate.compression.frame import FrameHeader, FrameReader, FramedCodec, unzstd

logger = logging.getLogger(__name__)

MAX_BUCKET = 1 << 16
# below this the mask's gap table (about 22/p entries) stops being small
MIN_P = 1e-4
BITMAP, DELTAS = 0, 1
PARAMS = "ddBIQQQBBB"
BERNOULLI, CYCLED = 0, 1  # mask schedules (the frame's last parameter byte)
CYCLE_PHASE_SEED = 0x636F636B  # b"cock": the cycled mask's phases, never changed


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
    # False: a fresh Bernoulli(p) mask every round (a coordinate waits a geometric number of
    # rounds, sometimes many). True: every coordinate gets a fixed random phase and round r
    # sends the phases in a window of width p that moves by p each round, so over 1/p rounds
    # every coordinate is sent and none waits more than ceil(1/p) - 1 rounds; see cycled_mask
    cycled: bool = False

    def __post_init__(self) -> None:
        for name in ("p", "k"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"cocktail {name} must be in (0, 1], got {value!r}")
        if self.p < MIN_P:
            raise ValueError(f"cocktail p must be >= {MIN_P}, got {self.p!r}")
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"cocktail bits must be an int in [1, 8], got {self.bits!r}")
        if not isinstance(self.bucket, int) or not 1 <= self.bucket <= MAX_BUCKET:
            raise ValueError(
                f"cocktail bucket must be an int in [1, {MAX_BUCKET}], got {self.bucket!r}")
        if not isinstance(self.zstd_level, int) or not 1 <= self.zstd_level <= 22:
            raise ValueError(f"cocktail zstd_level must be in [1, 22], got {self.zstd_level!r}")
        if not isinstance(self.sample_size, int) or self.sample_size < 1024:
            raise ValueError(f"cocktail sample_size must be >= 1024, got {self.sample_size!r}")
        if not isinstance(self.cycled, bool):
            raise ValueError(f"cocktail cycled must be a bool, got {self.cycled!r}")

    @property
    def schedule(self) -> int:
        """The mask schedule (the frame's last parameter byte)."""
        return CYCLED if self.cycled else BERNOULLI


@functools.lru_cache(maxsize=16)
def _gap_tables(p: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thresholds for drawing geometric gaps from 32-bit uniforms, and a 16-bit lookup table.

    With ascending thresholds t = [(1 - p)^g * 2^32 for g = 1, 2, ... while >= 1], the gap
    1 + #{t > u} for a uniform 32-bit u has P(gap > g) = (1 - p)^g: the positions are then
    exactly a Bernoulli(p) mask. The thresholds come from repeated IEEE multiplication
    (correctly rounded), so every machine builds the same ones and the same mask.

    A binary search per draw was 80% of the encode time, so the top 16 bits of u index a
    table instead: ``low[h]`` is the gap for every u in bucket h unless a threshold falls
    inside the bucket (``exact[h]`` False, under 1% of draws at p=0.1), where the search runs.
    """
    table, value, keep = [], float(1 << 32), 1.0 - p
    while True:
        value *= keep
        if value < 1.0:
            break
        table.append(value)
    thresholds = np.array(table[::-1], dtype=np.float64)
    starts = np.arange(1 << 16, dtype=np.float64) * (1 << 16)
    low = thresholds.size + 1 - np.searchsorted(thresholds, starts, side="right")
    high = thresholds.size + 1 - np.searchsorted(thresholds, starts + 0xFFFF, side="right")
    return thresholds, low.astype(np.int64), low == high


def _gaps(draws: np.ndarray, p: float) -> np.ndarray:
    thresholds, low, exact = _gap_tables(p)
    bucket = draws >> 16
    gaps = low[bucket]
    inexact = np.flatnonzero(~exact[bucket])
    if inexact.size:
        gaps[inexact] = thresholds.size + 1 - np.searchsorted(
            thresholds, draws[inexact].astype(np.float64), side="right")
    return gaps


def random_mask(numel: int, p: float, seed: int) -> np.ndarray | None:
    """Sorted positions in the round's mask, or None for p = 1 (every position).

    Draws one 32-bit number per masked position (its gap from the previous one) from numpy's
    PCG64 raw stream, whose output numpy guarantees across versions and machines. That is
    about p * n * 4 bytes of randomness instead of a draw per coordinate: 8x less at p=0.1.
    """
    if p >= 1:
        return None
    if numel == 0:
        return np.empty(0, dtype=np.int64)
    generator = np.random.PCG64(seed & 0xFFFFFFFF)  # the bits above are the round
    # enough gaps for the mask in one draw unless we are 8 sigma unlucky; then draw more
    batch = math.ceil(numel * p + 8 * math.sqrt(numel * p * (1 - p)) + 64)
    parts, end = [], -1
    while end < numel - 1:
        words = generator.random_raw(math.ceil(batch / 2)).astype("<u8", copy=False)
        draws = words.view("<u4")[:batch]
        positions = np.cumsum(_gaps(draws, p)) + end
        parts.append(positions)
        end = int(positions[-1])
    positions = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return positions[:np.searchsorted(positions, numel)]


def cycled_mask(numel: int, p: float, seed: int) -> np.ndarray | None:
    """Sorted positions of a cycled mask, or None for p = 1 (every position).

    Each coordinate has a fixed uniform 32-bit phase (PCG64 raw stream from a constant seed,
    fixed across machines like random_mask's; shards of equal length share the pattern,
    which is harmless: they hold different parameters). The seed's bits above the low 32
    are the round r (the low bits, random_mask's seed, are unused here). Round r sends
    the coordinates whose phase lies in the window [o_r, o_r + p) mod 1 with o_r = frac(r p),
    in 32-bit fixed point. Consecutive windows tile the circle, so each round's mask is still
    a random p-subset (the same on every member), but within any ceil(1/p) consecutive rounds
    every coordinate is sent at least once.
    """
    if p >= 1:
        return None
    phases = np.random.PCG64(CYCLE_PHASE_SEED).random_raw(
        math.ceil(numel / 2)).astype("<u8", copy=False).view("<u4")[:numel]
    offset = np.uint32(int(math.fmod((seed >> 32) * p, 1.0) * (1 << 32)) & 0xFFFFFFFF)
    width = np.uint32(int(p * (1 << 32)))
    return np.flatnonzero(phases - offset < width)  # uint32 arithmetic wraps around


# Masks kept for reuse, bytes: one DiLoCo round draws each shard's mask ~5 times on a member
# (contribute: encode and decode; as owner: decode every contribution, encode, decode; apply:
# decode) and once more at the coordinator's rebuild (issue 12); drawing it is about half of
# a decode. 256 MiB holds a round's masks for ~40M elements at p = 0.75 (8 B per position).
MASK_CACHE_BYTES = 256 << 20
_masks: "collections.OrderedDict[tuple, np.ndarray]" = collections.OrderedDict()
_masks_bytes = 0
_masks_lock = threading.Lock()  # encode/decode run in executor threads


def make_mask(numel: int, p: float, seed: int, schedule: int) -> np.ndarray | None:
    """The mask for (numel, p, seed, schedule), read-only, from the cache when drawn lately."""
    global _masks_bytes
    key = (numel, p, seed, schedule)
    with _masks_lock:
        mask = _masks.get(key)
        if mask is not None:
            _masks.move_to_end(key)
            return mask
    mask = (cycled_mask if schedule == CYCLED else random_mask)(numel, p, seed)
    if mask is None or mask.nbytes > MASK_CACHE_BYTES:
        return mask
    mask.flags.writeable = False  # shared by every caller from now on
    with _masks_lock:
        if key not in _masks:
            _masks[key] = mask
            _masks_bytes += mask.nbytes
        while _masks_bytes > MASK_CACHE_BYTES:
            _masks_bytes -= _masks.popitem(last=False)[1].nbytes
    return mask


def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _topk_threshold(magnitude: np.ndarray, k: float, sample_size: int) -> float:
    m = magnitude.size
    if m == 0 or k >= 1:
        return 0.0
    sample = magnitude if m <= 2 * sample_size else magnitude[::m // sample_size]
    keep = max(1, math.ceil(k * sample.size))
    return float(np.partition(sample, sample.size - keep)[sample.size - keep])


# The sparse stages below run in numpy: they touch p*n values, and single-threaded numpy
# beats torch's two-thread kernels there (each of those waits on a thread barrier, which on
# a busy machine cost a scheduler tick per op: 100 ms of a 500 ms encode, measured).

def quantize(values: np.ndarray, bits: int, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """(fp32 scale per bucket, uint8 codes) for nonzero fp32 ``values``."""
    count = values.size
    buckets = math.ceil(count / bucket)
    rows = np.zeros(buckets * bucket, dtype=np.float32)
    rows[:count] = values
    rows = rows.reshape(buckets, bucket)
    if bits == 1:
        lengths = np.full(buckets, float(bucket))
        if buckets:
            lengths[-1] = count - (buckets - 1) * bucket
        # mean |x| minimises the L2 error of sign x scale; summed in fp64 so that huge
        # values cannot overflow
        scale = (np.abs(rows).sum(axis=1, dtype=np.float64) / lengths).astype(np.float32)
        codes = (rows >= 0).astype(np.uint8)
    else:
        qmax = _qmax(bits)
        scale = np.abs(rows).max(axis=1, initial=0.0) / np.float32(qmax)
        # quantize against the fp32 scale the decoder will see; a zero scale means an
        # all-zero bucket (only padding), whose codes are then the zero level
        step = np.where(scale > 0, scale, np.float32(1))[:, None]
        codes = np.clip(np.rint(rows / step), -qmax, qmax)
        codes = (codes + qmax).astype(np.uint8)
    return scale, codes.reshape(-1)[:count]


def dequantize(scale: np.ndarray, codes: np.ndarray, bits: int, bucket: int) -> np.ndarray:
    # in place, and each bucket's scale broadcast rather than repeated: a decode's passes
    # over the values are its cost
    levels = codes.astype(np.float32)
    if bits == 1:
        levels *= 2
        levels -= 1
    else:
        levels -= _qmax(bits)
    full = levels.size // bucket * bucket
    levels[:full].reshape(-1, bucket)[...] *= scale[:full // bucket, None]
    if full < levels.size:
        levels[full:] *= scale[-1]
    return levels


@register("cocktail")
class CocktailCodec(FramedCodec):
    codec_id = "cocktail"
    checksum = True

    def __init__(self, config: CocktailConfig | None = None, **params: object) -> None:
        self.config = config if config is not None else CocktailConfig(**params)

    def mask(self, numel: int, seed: int) -> np.ndarray | None:
        """The positions this codec's frame of ``numel`` elements sends for ``seed`` (None: all),
        from the cache when drawn lately (make_mask): a decoder of that frame draws the same."""
        return make_mask(numel, self.config.p, seed, self.config.schedule)

    def _encode_body(self, flat: torch.Tensor, *, seed: int) -> bytes:
        cfg = self.config
        x = flat.to(torch.float32).numpy()
        mask = self.mask(x.size, seed)
        masked = x if mask is None else x[mask]
        magnitude = np.abs(masked)
        threshold = _topk_threshold(magnitude, cfg.k, cfg.sample_size)
        keep = magnitude >= threshold if threshold > 0 else magnitude > 0
        if keep.all():  # dense (k = 1): no positions to find and gather
            positions, values = None, masked
        else:
            positions = np.flatnonzero(keep)
            values = masked[positions]
        scale, codes = quantize(values, cfg.bits, cfg.bucket)

        m, kept = masked.size, values.size
        index_mode, width, index = BITMAP, 0, None
        if kept * 16 < m:  # sparse: gaps may beat one bit per masked coordinate
            width = bitpack.delta_width(positions)
            if kept * width < math.ceil(m / 8):
                index_mode, index = DELTAS, bitpack.pack_deltas(positions, width)
            else:
                width = 0
        if index is None:
            index = bitpack.pack_bitmap(keep)
        payload = b"".join((index, scale.tobytes(), bitpack.pack_codes(codes, cfg.bits)))
        packed = zstandard.ZstdCompressor(level=cfg.zstd_level).compress(payload)
        head = struct.pack("<" + PARAMS, cfg.p, cfg.k, cfg.bits, cfg.bucket, seed, m, kept,
                           index_mode, width, cfg.schedule)
        return head + packed

    def _decode_body(self, reader: FrameReader, header: FrameHeader, *,
                     seed: int | None) -> torch.Tensor:
        p, k, bits, bucket, frame_seed, m, kept, index_mode, width, schedule = reader.unpack(
            PARAMS, "cocktail parameters")
        n = header.numel
        if not (math.isfinite(p) and MIN_P <= p <= 1):
            raise CompressionError(f"cocktail p={p} outside [{MIN_P}, 1]")
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
        if schedule not in (BERNOULLI, CYCLED):
            raise CompressionError(f"unknown cocktail mask schedule {schedule}")
        if m > n or kept > m:
            raise CompressionError(f"cocktail frame claims {kept} kept of {m} masked of {n}")
        spread = 12 * math.sqrt(n * p * (1 - p)) + 16  # the mask size is Binomial(n, p)
        if abs(m - p * n) > spread:
            raise CompressionError(f"cocktail frame claims a mask of {m} of {n} at p={p}")
        if index_mode == BITMAP and width == 0:
            index_size = math.ceil(m / 8)
        elif index_mode == DELTAS and width in (1, 2, 4):
            index_size = kept * width
        else:
            raise CompressionError(f"unknown index mode {index_mode} (width {width})")
        scale_size = 4 * math.ceil(kept / bucket)
        payload_size = index_size + scale_size + bitpack.packed_size(kept, bits)

        payload = memoryview(unzstd(reader.rest(), "cocktail payload", size=payload_size))

        index = payload[:index_size]
        scale = np.frombuffer(payload[index_size:index_size + scale_size], dtype="<f4")
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise CompressionError("cocktail frame holds negative or non-finite scales")
        codes = bitpack.unpack_codes(payload[index_size + scale_size:], kept, bits)
        if bits > 1 and kept and int(codes.max()) > 2 * _qmax(bits):
            raise CompressionError(f"code {int(codes.max())} outside the {bits}-bit range")

        mask = make_mask(n, p, frame_seed, schedule)
        if (n if mask is None else mask.size) != m:
            raise CompressionError(
                f"mask for seed {frame_seed} has {n if mask is None else mask.size} "
                f"positions, frame says {m}")
        values = dequantize(scale, codes, bits, bucket)
        if index_mode == BITMAP and kept == m and bitpack.is_full_bitmap(index, m):
            # every masked value kept (k = 1, the default): the mask is the positions, and
            # unpacking and gathering 0..m-1 was most of a decode
            if mask is None:
                return torch.from_numpy(values).to(header.dtype)
            targets = mask
        else:
            if index_mode == BITMAP:
                positions = bitpack.unpack_bitmap(index, m, kept)
            else:
                positions = bitpack.unpack_deltas(index, kept, width, m)
            targets = positions if mask is None else mask[positions]
        out = np.zeros(n, dtype=np.float32)  # calloc: untouched pages cost nothing yet
        out[targets] = values
        return torch.from_numpy(out).to(header.dtype)

    def error_bound(self, tensor: torch.Tensor) -> torch.Tensor:
        x = tensor.detach().float().abs()
        if self.config.bits == 1:  # sign x mean magnitude can overshoot small values
            return torch.full_like(x, float(x.max()) if x.numel() else 0.0) * (1 + 2.0**-20)
        return x * (1 + 2.0**-20) + 2.0**-140
