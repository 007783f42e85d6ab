"""Vectorised bit packing for cocktail's frame: b-bit codes, the kept-position bitmap and
delta-coded positions. numpy does the byte work (packbits is one C loop); nothing here
iterates over elements in Python.

Bit order is little-endian within a byte everywhere (value i's low bit first), so the
layout does not depend on the machine.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from pollinate.compression.codec import CompressionError

logger = logging.getLogger(__name__)


def packed_size(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """``codes`` (uint8, each < 2**bits) as a dense little-endian bit stream."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes.tobytes()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, one shift-or per slot
        per = 8 // bits
        padded = np.zeros(math.ceil(codes.size / per) * per, dtype=np.uint8)
        padded[:codes.size] = codes
        lanes = padded.reshape(-1, per)
        out = lanes[:, 0].copy()
        for j in range(1, per):
            out |= lanes[:, j] << np.uint8(j * bits)
        return out.tobytes()
    # 3, 5, 6, 7 bits: codes straddle bytes; expand to single bits and let packbits pack
    shifts = np.arange(bits, dtype=np.uint8)
    bit_matrix = (codes[:, None] >> shifts) & np.uint8(1)
    return np.packbits(bit_matrix.reshape(-1), bitorder="little").tobytes()


def unpack_codes(buf: bytes | memoryview, count: int, bits: int) -> np.ndarray:
    """Inverse of ``pack_codes``; ``buf`` must be exactly ``packed_size(count, bits)`` long."""
    if len(buf) != packed_size(count, bits):
        raise CompressionError(
            f"{count} codes of {bits} bits need {packed_size(count, bits)} bytes, "
            f"got {len(buf)}")
    raw = np.frombuffer(buf, dtype=np.uint8)
    if bits == 8:
        return raw.copy()
    if 8 % bits == 0:
        per = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        lanes = np.empty((raw.size, per), dtype=np.uint8)
        for j in range(per):
            lanes[:, j] = (raw >> np.uint8(j * bits)) & mask
        codes = lanes.reshape(-1)
    else:
        bit_stream = np.unpackbits(raw, bitorder="little")
        bit_matrix = bit_stream[:count * bits].reshape(count, bits)
        weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
        codes = (bit_matrix.astype(np.uint16) @ weights).astype(np.uint8)
        codes = np.concatenate([codes, bit_stream[count * bits:]])  # padding, checked below
    if codes[count:].any():
        raise CompressionError("non-zero padding after the last code")
    return codes[:count]


def pack_bitmap(keep: np.ndarray) -> bytes:
    """A bool array as one bit per entry."""
    return np.packbits(keep, bitorder="little").tobytes()


def unpack_bitmap(buf: bytes | memoryview, length: int, expected_ones: int) -> np.ndarray:
    """Positions of set bits in a bitmap of ``length`` entries; checks the count and padding."""
    if len(buf) != math.ceil(length / 8):
        raise CompressionError(f"bitmap of {length} entries needs {math.ceil(length / 8)} "
                               f"bytes, got {len(buf)}")
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")
    if bits[length:].any():
        raise CompressionError("bitmap has bits set past its length")
    positions = np.flatnonzero(bits[:length])
    if positions.size != expected_ones:
        raise CompressionError(
            f"bitmap marks {positions.size} kept values, frame header says {expected_ones}")
    return positions


def is_full_bitmap(buf: bytes | memoryview, length: int) -> bool:
    """Whether ``buf`` is the bitmap of ``length`` entries all set (padding clear): the
    common case of a dense frame, whose positions are then 0..length-1 without unpacking."""
    whole, rest = divmod(length, 8)
    raw = np.frombuffer(buf, dtype=np.uint8)
    if raw.size != whole + (rest > 0) or not (raw[:whole] == 0xFF).all():
        return False
    return rest == 0 or int(raw[whole]) == (1 << rest) - 1


def delta_width(positions: np.ndarray) -> int:
    """Bytes per gap (1, 2 or 4) for sorted, distinct ``positions``."""
    if positions.size == 0:
        return 1
    largest = int(max(positions[0] + 1, np.diff(positions).max(initial=1)))
    return 1 if largest < 1 << 8 else 2 if largest < 1 << 16 else 4


def pack_deltas(positions: np.ndarray, width: int) -> bytes:
    # gaps start from -1 so that every gap is >= 1: a zero gap in a frame is then corrupt
    gaps = np.diff(positions, prepend=-1)
    return gaps.astype({1: "<u1", 2: "<u2", 4: "<u4"}[width]).tobytes()


def unpack_deltas(buf: bytes | memoryview, count: int, width: int, length: int) -> np.ndarray:
    """Positions from gaps; every gap >= 1 and the last position < ``length``."""
    if width not in (1, 2, 4):
        raise CompressionError(f"delta width {width} is not 1, 2 or 4 bytes")
    if len(buf) != count * width:
        raise CompressionError(f"{count} deltas of {width} bytes need {count * width} bytes, "
                               f"got {len(buf)}")
    gaps = np.frombuffer(buf, dtype={1: "<u1", 2: "<u2", 4: "<u4"}[width]).astype(np.int64)
    if count and gaps.min() < 1:
        raise CompressionError("delta-coded positions repeat (a zero gap)")
    positions = np.cumsum(gaps) - 1
    if count and positions[-1] >= length:
        raise CompressionError(
            f"delta-coded position {int(positions[-1])} is outside the mask of {length}")
    return positions
