"""The frames of a session handoff (issue 16): a session's keys and values, or its span inputs.

When a node leaves or moves, it sends each open session to a replica of its blocks
(node/handoff.py) instead of letting the client replay the whole history. By default
(``--handoff recompute``) it sends the session's span inputs, from which the replica
rebuilds the cache (the span-inputs frame at the end of this module). The KV frame
carries the cache itself, in two modes:

- ``lossless``: the tensors' own bytes (fp32 on a CPU node), byte planes split apart
  (exponent bytes together, then the noisier mantissa bytes) and zstd-compressed. Decoding
  gives the cache back bit for bit, so the receiver continues exactly as the sender would
  have: greedy tokens equal the local model's.
- ``lossy`` (CacheGen, Liu et al., SIGCOMM 2024): per channel (batch row, KV head, head
  dimension) and per group of ``group_tokens`` neighbouring tokens, one fp16 scale and
  ``bits``-bit symmetric integer codes, laid out channel by channel so that zstd sees a
  channel's neighbouring tokens together. Keys' codes are stored as differences from the
  previous token's inside a group (wrapping in 8 bits, so the integers come back exactly
  and no error accumulates): on SmolLM2 caches that saves about 2% of the frame at 6-8
  bits and costs 1% at 4 (``bench_kv_codec.py --ablate-key-deltas``); values' deltas made them
  larger in a probe of the same caches, so values are stored as plain codes. The error is
  at most half a quantisation step per value. It changes the next greedy tokens on some
  prompts even at 8 bits (benchmarks/results/2026-12-06-handoff.md), which is why
  lossless is the default.

Frame layout (little-endian):

    magic     4 bytes  b"PKV" + format version (1)
    mode      u8       0 lossless, 1 lossy
    bits      u8       lossy: code bits (2..8); lossless: 0
    group     u16      lossy: tokens per scale group; lossless: 0
    delta     u8       lossy: 1 = keys delta-coded, 0 = not; lossless: 0
    dtype     u8       the cache's dtype (compression/frame.py DTYPE_CODES)
    layers    u16      number of layers
    shapes    layers x 2 x 4 x u32: keys then values [batch, kv_heads, tokens, head_dim]
    payload   one zstd frame whose declared content size must equal the size the shapes imply
              lossless: per layer keys then values, byte planes of the raw tensor
              lossy:    per tensor its fp16 scales [b, h, d, groups], then its uint8 codes
                        [b, h, d, groups * group] (the last group padded by repeating the last token;
                        deltas between neighbouring tokens where the delta bit says so)

Every size is checked against ``max_elements`` and against the bytes present before
anything is allocated or decompressed: a stranger's handoff is untrusted input.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import zstandard

from pollinate.compression.codec import CompressionError
from pollinate.compression.frame import CODE_DTYPES, DTYPE_CODES, FLOAT_DTYPES, FrameReader, check_finite, unzstd

MAGIC = b"PKV"
VERSION = 1
MODES = ("lossless", "lossy")
# A model has at most a few hundred layers (Llama 3 405B: 126); 4096 bounds the shape list
# a hostile frame can make us read.
MAX_LAYERS = 4096

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class KVCodecConfig:
    # "lossless" (default: the session continues bit for bit, see the module docstring) or
    # "lossy" (CacheGen-style, about 4-5x smaller than lossless fp32 at 8 bits).
    mode: str = "lossless"
    # lossy: bits per code; 8 keeps the reconstruction error near fp16 rounding's scale.
    bits: int = 8
    # lossy: neighbouring tokens that share one scale per channel. 64 keeps the fp16 scales
    # at 1/32 of a byte per value; 16 costs 0.04 more of the fp16 size at 4-8 bits for a
    # little less error.
    group_tokens: int = 64
    # lossy: store keys' codes as differences between neighbouring tokens (CacheGen's
    # delta encoding); values are stored plain (deltas made them larger on SmolLM2).
    delta_keys: bool = True
    # zstd level; 3 is zstd's default (higher levels gain ~2% on these payloads, cost 3x time).
    zstd_level: int = 3

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"kv codec mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"kv codec bits must be in [2, 8], got {self.bits!r}")
        if not isinstance(self.group_tokens, int) or not 1 <= self.group_tokens <= 1024:
            raise ValueError(f"kv codec group_tokens must be in [1, 1024], got {self.group_tokens!r}")
        if not isinstance(self.zstd_level, int) or not 1 <= self.zstd_level <= 22:
            raise ValueError(f"kv codec zstd_level must be in [1, 22], got {self.zstd_level!r}")


@dataclass(frozen=True, kw_only=True)
class DecodedKV:
    mode: str
    dtype: torch.dtype  # the sender's cache dtype; lossy layers come back in float32
    layers: list[KV]


def fp16_bytes(layers: Sequence[KV]) -> int:
    """Bytes the same cache takes in fp16: the baseline issue 16 measures against."""
    return sum(2 * (k.numel() + v.numel()) for k, v in layers)


def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _groups(tokens: int, group: int) -> int:
    return math.ceil(tokens / group)


def _payload_size(mode: int, itemsize: int, bits: int, group: int, shapes: list[tuple[int, ...]]) -> int:
    total = 0
    for shape in shapes:
        b, h, s, d = shape
        if mode == 0:
            total += b * h * s * d * itemsize
        else:
            g = _groups(s, group)
            total += b * h * d * g * (2 + group)  # fp16 scales, then one uint8 code per padded token
    return total


# ---- encode


def _byte_planes(t: torch.Tensor) -> bytes:
    raw = t.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(-1, t.element_size())
    return np.ascontiguousarray(raw.T).tobytes()


def _lossy_tensor(t: torch.Tensor, bits: int, group: int, delta: bool) -> tuple[bytes, bytes]:
    """(fp16 scales, uint8 delta codes) of one [b, h, s, d] tensor."""
    b, h, s, d = t.shape
    g = _groups(s, group)
    x = t.detach().cpu().float().permute(0, 1, 3, 2)  # [b, h, d, s]: a channel's tokens side by side
    if g * group != s:  # pad by repeating the last token: its deltas are 0
        x = torch.cat([x, x[..., -1:].expand(b, h, d, g * group - s)], dim=-1)
    x = x.reshape(b, h, d, g, group)
    qmax = _qmax(bits)
    scale = (x.abs().amax(dim=-1) / qmax).to(torch.float16).float()  # [b, h, d, g], as the decoder sees it
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe.unsqueeze(-1)).clamp_(-qmax, qmax).to(torch.int16)
    if delta:
        q[..., 1:] = q[..., 1:] - q[..., :-1].clone()  # neighbouring tokens of one channel
    codes = (q & 0xFF).to(torch.uint8)  # wrapping in 8 bits: the decoder's cumsum undoes it exactly
    return scale.to(torch.float16).numpy().tobytes(), codes.numpy().tobytes()


def encode_kv(layers: Sequence[KV], config: KVCodecConfig = KVCodecConfig()) -> bytes:
    """One frame holding every layer's keys and values ([batch, kv_heads, tokens, head_dim] each)."""
    if not layers:
        raise CompressionError("no layers to encode")
    if len(layers) > MAX_LAYERS:
        raise CompressionError(f"{len(layers)} layers, at most {MAX_LAYERS}")
    dtype = layers[0][0].dtype
    if dtype not in FLOAT_DTYPES:
        raise CompressionError(f"KV caches are floating point ({', '.join(map(str, FLOAT_DTYPES))}), got {dtype}")
    shapes = []
    for i, (k, v) in enumerate(layers):
        for name, t in (("keys", k), ("values", v)):
            if t.dim() != 4 or t.dtype != dtype:
                raise CompressionError(f"layer {i} {name}: want a 4-d {dtype} tensor, got {t.dim()}-d {t.dtype}")
            if max(t.shape) >= 1 << 32:
                raise CompressionError(f"layer {i} {name}: shape {tuple(t.shape)} too large")
            check_finite(t, f"layer {i} {name}")
            shapes.append(tuple(t.shape))
    lossy = config.mode == "lossy"
    parts = []
    for k, v in layers:
        for t, delta in ((k, config.delta_keys), (v, False)):
            if lossy:
                parts.extend(_lossy_tensor(t, config.bits, config.group_tokens, delta))
            else:
                parts.append(_byte_planes(t))
    payload = b"".join(parts)
    header = MAGIC + struct.pack(
        "<BBBHBBH", VERSION, int(lossy), config.bits if lossy else 0, config.group_tokens if lossy else 0,
        int(lossy and config.delta_keys), DTYPE_CODES[dtype], len(layers))
    header += b"".join(struct.pack("<4I", *s) for s in shapes)
    return header + zstandard.ZstdCompressor(level=config.zstd_level, write_content_size=True).compress(payload)


# ---- decode


def peek_kv(data: bytes, *, max_elements: int) -> tuple[str, torch.dtype, list[tuple[int, ...]]]:
    """(mode, dtype, [keys shape, values shape, ...]) a frame claims, validated, nothing decompressed."""
    mode, _, _, _, dtype, shapes, _ = _read_header(FrameReader(data), max_elements)
    return MODES[mode], dtype, shapes


def _read_header(reader: FrameReader, max_elements: int):
    magic = bytes(reader.take(4, "magic and version"))
    if magic[:3] != MAGIC:
        raise CompressionError(f"not a KV-cache frame (magic {magic[:3]!r})")
    version = magic[3]
    mode, bits, group, delta, dtype_code, num_layers = reader.unpack("BBHBBH", "header")
    if version != VERSION:
        raise CompressionError(f"KV frame format version {version}, this build reads {VERSION}")
    if mode not in (0, 1):
        raise CompressionError(f"unknown KV frame mode {mode}")
    if mode == 1 and not (2 <= bits <= 8 and 1 <= group <= 1024):
        raise CompressionError(f"lossy KV frame with bits {bits}, group {group}: want bits 2..8, group 1..1024")
    if delta & ~1:
        raise CompressionError(f"KV frame delta flags {delta:#x}: only keys may be delta-coded")
    if mode == 0 and (bits or group or delta):
        raise CompressionError("lossless KV frame with quantisation parameters")
    dtype = CODE_DTYPES.get(dtype_code)
    if dtype not in FLOAT_DTYPES:
        raise CompressionError(f"KV frame dtype code {dtype_code} is not a floating-point cache dtype")
    if not 1 <= num_layers <= MAX_LAYERS:
        raise CompressionError(f"KV frame claims {num_layers} layers, want 1..{MAX_LAYERS}")
    shapes = [reader.unpack("4I", "tensor shape") for _ in range(2 * num_layers)]
    total = sum(math.prod(s) for s in shapes)
    if total > max_elements:
        raise CompressionError(f"KV frame claims {total} values, above the limit {max_elements}")
    return mode, bits, group, delta, dtype, shapes, total


def decode_kv(data: bytes | bytearray | memoryview, *, max_elements: int) -> DecodedKV:
    """The layers a frame carries; CompressionError on any bad frame. ``max_elements`` bounds the
    keys and values the frame may claim (the receiver knows how many its session may hold)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CompressionError(f"expected bytes, got {type(data).__name__}")
    reader = FrameReader(data)
    mode, bits, group, delta, dtype, shapes, _ = _read_header(reader, max_elements)
    size = _payload_size(mode, dtype.itemsize, bits, group, shapes)
    payload = memoryview(unzstd(reader.rest(), "KV payload", size=size))
    tensors, offset = [], 0
    for index, shape in enumerate(shapes):
        if mode == 0:
            n = math.prod(shape) * dtype.itemsize
            planes = np.frombuffer(payload[offset:offset + n], dtype=np.uint8).reshape(dtype.itemsize, -1)
            raw = torch.from_numpy(np.ascontiguousarray(planes.T)).reshape(-1)
            t = raw.view(dtype).reshape(shape).clone()
            if not torch.isfinite(t).all():
                raise CompressionError("lossless KV frame holds NaN/Inf values")
        else:
            keys = index % 2 == 0
            t, n = _lossy_decode(payload[offset:], shape, bits, group, bool(delta & 1) and keys)
        tensors.append(t)
        offset += n
    layers = [(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2)]
    return DecodedKV(mode=MODES[mode], dtype=dtype, layers=layers)


def _lossy_decode(buf: memoryview, shape: tuple[int, ...], bits: int, group: int,
                  delta: bool) -> tuple[torch.Tensor, int]:
    b, h, s, d = shape
    g = _groups(s, group)
    n_scales = b * h * d * g
    scales = torch.from_numpy(np.frombuffer(buf[:2 * n_scales], dtype="<f2").copy()).float()
    if not torch.isfinite(scales).all() or (scales < 0).any():
        raise CompressionError("lossy KV frame holds negative or non-finite scales")
    n_codes = n_scales * group
    codes = torch.from_numpy(np.frombuffer(buf[2 * n_scales:2 * n_scales + n_codes], dtype=np.uint8).copy())
    q = codes.to(torch.int32).reshape(b, h, d, g, group)
    if delta:
        q = q.cumsum(dim=-1) & 0xFF
    q = torch.where(q >= 128, q - 256, q)
    qmax = _qmax(bits)
    if q.numel() and int(q.abs().max()) > qmax:
        raise CompressionError(f"lossy KV code outside the {bits}-bit range")
    x = q.float() * scales.reshape(b, h, d, g, 1)
    x = x.reshape(b, h, d, g * group)[..., :s].permute(0, 1, 3, 2).contiguous()
    return x, 2 * n_scales + n_codes


# ---- span inputs: what `--handoff recompute` sends instead of the cache
#
# A span's KV cache is a function of the hidden states that entered the span (and the span's
# weights): the receiver rebuilds it by one prefill of those inputs, exactly as a client's
# replay would. The inputs are narrower than the cache whenever the span has more than a
# few blocks (SmolLM2: 576 values per token in, 2 x 3 x 64 = 384 per block out), and they are
# the values the node received, so they travel losslessly: byte planes and zstd, as above.
#
#     magic     4 bytes  b"PKI" + format version (1)
#     dtype     u8       the inputs' dtype (compression/frame.py DTYPE_CODES)
#     shape     3 x u32  [batch, tokens, hidden]
#     payload   one zstd frame of the byte planes, declared content size = batch x tokens x hidden x itemsize

INPUTS_MAGIC = b"PKI"
INPUTS_VERSION = 1


def frame_kind(data: bytes | bytearray | memoryview) -> str:
    """"cache" (a KV frame) or "inputs" (a span-inputs frame); CompressionError for anything else."""
    head = bytes(data[:3])
    if head == MAGIC:
        return "cache"
    if head == INPUTS_MAGIC:
        return "inputs"
    raise CompressionError(f"not a handoff frame (magic {head!r})")


def encode_inputs(hidden: torch.Tensor, *, zstd_level: int = 3) -> bytes:
    """One frame holding a session's span inputs [batch, tokens, hidden], bit for bit."""
    if hidden.dim() != 3 or hidden.dtype not in FLOAT_DTYPES:
        raise CompressionError(f"span inputs: want a 3-d float tensor, got {hidden.dim()}-d {hidden.dtype}")
    if hidden.numel() == 0 or max(hidden.shape) >= 1 << 32:
        raise CompressionError(f"span inputs: shape {tuple(hidden.shape)} is empty or too large")
    check_finite(hidden, "span inputs")
    header = INPUTS_MAGIC + struct.pack("<BB3I", INPUTS_VERSION, DTYPE_CODES[hidden.dtype], *hidden.shape)
    return header + zstandard.ZstdCompressor(level=zstd_level, write_content_size=True).compress(_byte_planes(hidden))


def peek_inputs(data: bytes | bytearray | memoryview) -> tuple[torch.dtype, tuple[int, int, int]]:
    """(dtype, [batch, tokens, hidden]) an inputs frame claims, nothing decompressed."""
    reader = FrameReader(data)
    magic = bytes(reader.take(4, "magic and version"))
    if magic[:3] != INPUTS_MAGIC:
        raise CompressionError(f"not a span-inputs frame (magic {magic[:3]!r})")
    if magic[3] != INPUTS_VERSION:
        raise CompressionError(f"span-inputs frame format version {magic[3]}, this build reads {INPUTS_VERSION}")
    (dtype_code,) = reader.unpack("B", "dtype")
    dtype = CODE_DTYPES.get(dtype_code)
    if dtype not in FLOAT_DTYPES:
        raise CompressionError(f"span-inputs frame dtype code {dtype_code} is not a floating-point dtype")
    return dtype, tuple(reader.unpack("3I", "shape"))


def decode_inputs(data: bytes | bytearray | memoryview, *, max_elements: int) -> torch.Tensor:
    """The span inputs a frame carries; CompressionError on any bad frame or one claiming more
    than ``max_elements`` values (checked before anything is decompressed)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CompressionError(f"expected bytes, got {type(data).__name__}")
    dtype, shape = peek_inputs(data)
    numel = math.prod(shape)
    if not 0 < numel <= max_elements:
        raise CompressionError(f"span-inputs frame claims {numel} values, want 1..{max_elements}")
    size = numel * dtype.itemsize
    payload = unzstd(memoryview(data)[4 + 1 + 12:], "span-inputs payload", size=size)
    planes = np.frombuffer(payload, dtype=np.uint8).reshape(dtype.itemsize, -1)
    t = torch.from_numpy(np.ascontiguousarray(planes.T)).reshape(-1).view(dtype).reshape(shape).clone()
    check_finite(t, "span inputs")
    return t
