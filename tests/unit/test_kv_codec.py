"""The handoff's KV-cache codec (compression/kv_codec.py): round trips, error bounds, hostile frames."""

import struct

import pytest
import torch
import zstandard

from pollinate.compression.codec import CompressionError
from pollinate.compression.kv_codec import (
    KVCodecConfig,
    decode_inputs,
    decode_kv,
    encode_inputs,
    encode_kv,
    fp16_bytes,
    frame_kind,
    peek_kv,
)


def cache(layers=3, batch=1, heads=2, tokens=37, dim=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # keys drift slowly along the tokens (as rotated keys do), values are noisier
    out = []
    for _ in range(layers):
        k = torch.randn(batch, heads, 1, dim, generator=g) + 0.1 * torch.randn(batch, heads, tokens, dim, generator=g).cumsum(2)
        v = torch.randn(batch, heads, tokens, dim, generator=g)
        out.append((k.to(dtype), v.to(dtype)))
    return out


def total(layers):
    return sum(k.numel() + v.numel() for k, v in layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lossless_round_trip_is_exact(dtype):
    layers = cache(dtype=dtype)
    frame = encode_kv(layers)
    decoded = decode_kv(frame, max_elements=total(layers))
    assert decoded.mode == "lossless" and decoded.dtype == dtype
    for (k, v), (k2, v2) in zip(layers, decoded.layers):
        assert k2.dtype == dtype and torch.equal(k, k2) and torch.equal(v, v2)
    assert peek_kv(frame, max_elements=total(layers))[2][0] == tuple(layers[0][0].shape)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("group", [1, 16, 64])
def test_lossy_error_is_at_most_half_a_step_of_its_group(bits, group):
    layers = cache(tokens=37, batch=2)
    decoded = decode_kv(encode_kv(layers, KVCodecConfig(mode="lossy", bits=bits, group_tokens=group)),
                        max_elements=total(layers))
    qmax = (1 << (bits - 1)) - 1
    for (k, v), (k2, v2) in zip(layers, decoded.layers):
        for x, y in ((k, k2), (v, v2)):
            assert y.shape == x.shape and y.dtype == torch.float32
            # per channel and group of tokens: |error| <= scale / 2, scale = amax / qmax (in fp16)
            pad = -x.shape[2] % group
            xs = torch.cat([x, x[:, :, -1:].expand(-1, -1, pad, -1)], 2) if pad else x
            amax = xs.unflatten(2, (-1, group)).abs().amax(3, keepdim=True)
            step = (amax / qmax).half().float().expand(-1, -1, -1, group, -1).flatten(2, 3)[:, :, : x.shape[2]]
            assert ((x - y).abs() <= step / 2 * (1 + 1e-3) + 1e-6).all()


def test_lossy_is_smaller_and_fewer_bits_smaller_still():
    layers = cache(tokens=256, heads=3, dim=64)
    sizes = {bits: len(encode_kv(layers, KVCodecConfig(mode="lossy", bits=bits))) for bits in (4, 8)}
    lossless = len(encode_kv(layers))
    assert sizes[4] < sizes[8] < fp16_bytes(layers) < lossless


def test_encode_refuses_what_it_cannot_carry():
    layers = cache()
    with pytest.raises(CompressionError, match="NaN/Inf"):
        bad = layers[0][0].clone()
        bad[0, 0, 3, 1] = float("nan")
        encode_kv([(bad, layers[0][1])])
    with pytest.raises(CompressionError, match="floating point"):
        encode_kv([(torch.zeros(1, 1, 2, 2, dtype=torch.int32),) * 2])
    with pytest.raises(CompressionError, match="4-d"):
        encode_kv([(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))])
    with pytest.raises(CompressionError, match="no layers"):
        encode_kv([])
    with pytest.raises(ValueError, match="bits"):
        KVCodecConfig(mode="lossy", bits=9)
    with pytest.raises(ValueError, match="mode"):
        KVCodecConfig(mode="zip")


def test_hostile_frames_get_a_clear_error_before_anything_large_is_allocated():
    layers = cache()
    n = total(layers)
    frame = encode_kv(layers)
    # more values than the receiver's session can hold: refused from the header
    with pytest.raises(CompressionError, match="above the limit"):
        decode_kv(frame, max_elements=n - 1)
    for cut in (3, 10, 20, len(frame) - 5):
        with pytest.raises(CompressionError):
            decode_kv(frame[:cut], max_elements=n)
    with pytest.raises(CompressionError, match="magic"):
        decode_kv(b"XXXX" + frame[4:], max_elements=n)
    with pytest.raises(CompressionError, match="version"):
        decode_kv(frame[:3] + b"\x09" + frame[4:], max_elements=n)
    # a shape that claims 2^32-1 tokens: refused by the element limit, not by an allocation
    header_size = 4 + struct.calcsize("<BBHBBH")
    huge = frame[:header_size] + struct.pack("<4I", 1, 2, 0xFFFFFFFF, 8) + frame[header_size + 16:]
    with pytest.raises(CompressionError, match="above the limit"):
        decode_kv(huge, max_elements=1 << 30)
    # a zstd bomb: small frame whose payload decompresses to far more than the shapes imply
    body_at = header_size + 16 * 2 * len(layers)
    bomb = frame[:body_at] + zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    with pytest.raises(CompressionError, match="declares 67108864 bytes"):
        decode_kv(bomb, max_elements=n)
    # a lossless payload holding NaN
    raw = decode_kv(frame, max_elements=n)
    poisoned = [(torch.full_like(k, float("nan")), v) for k, v in raw.layers]
    planes = zstandard.ZstdDecompressor().decompress(frame[body_at:])
    nan_frame = frame[:body_at] + zstandard.ZstdCompressor().compress(b"\xff" * len(planes))
    assert poisoned  # the same layout, every byte 0xff: NaN in fp32
    with pytest.raises(CompressionError, match="NaN"):
        decode_kv(nan_frame, max_elements=n)
    # lossy frames: negative scales, delta-coded values, impossible parameters
    lossy = encode_kv(layers, KVCodecConfig(mode="lossy", bits=4, group_tokens=16))
    payload = zstandard.ZstdDecompressor().decompress(lossy[body_at:])
    neg = struct.pack("<e", -1.0) + payload[2:]
    with pytest.raises(CompressionError, match="negative or non-finite scales"):
        decode_kv(lossy[:body_at] + zstandard.ZstdCompressor().compress(neg), max_elements=n)
    flags_at = 4 + struct.calcsize("<BBH")
    with pytest.raises(CompressionError, match="only keys may be delta-coded"):
        decode_kv(lossy[:flags_at] + b"\x03" + lossy[flags_at + 1:], max_elements=n)
    with pytest.raises(CompressionError, match="bits 9"):
        decode_kv(lossy[:5] + b"\x09" + lossy[6:], max_elements=n)
    # 4-bit codes outside [-7, 7] (plain-coded values carry the code itself)
    scales = 2 * 1 * 2 * 8 * 3  # keys' fp16 scales of layer 0: batch 1, heads 2, dim 8, 3 groups
    codes = 1 * 2 * 8 * 3 * 16
    bad = bytearray(payload)
    bad[scales + codes + scales] = 100  # layer 0's values: first code
    with pytest.raises(CompressionError, match="outside the 4-bit range"):
        decode_kv(lossy[:body_at] + zstandard.ZstdCompressor().compress(bytes(bad)), max_elements=n)
    with pytest.raises(CompressionError, match="expected bytes"):
        decode_kv("text", max_elements=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_span_inputs_round_trip_bit_for_bit(dtype):
    x = torch.randn(2, 37, 24, generator=torch.Generator().manual_seed(1)).to(dtype)
    frame = encode_inputs(x)
    assert frame_kind(frame) == "inputs" and frame_kind(encode_kv(cache())) == "cache"
    y = decode_inputs(frame, max_elements=x.numel())
    assert y.dtype == dtype and torch.equal(y.view(torch.uint8), x.view(torch.uint8))
    # the frame is the inputs' own bytes, zstd'd: never far above them
    assert len(frame) <= x.numel() * x.element_size() * 1.01 + 64


def test_hostile_span_inputs_frames_are_refused_before_decompressing():
    x = torch.randn(1, 16, 8)
    frame = encode_inputs(x)
    with pytest.raises(CompressionError, match="claims 128 values, want 1..127"):
        decode_inputs(frame, max_elements=127)
    huge = frame[:5] + struct.pack("<3I", 1, 0xFFFFFFFF, 8) + frame[17:]
    with pytest.raises(CompressionError, match="claims"):
        decode_inputs(huge, max_elements=1 << 30)
    bomb = frame[:17] + zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    with pytest.raises(CompressionError, match="declares 67108864 bytes"):
        decode_inputs(bomb, max_elements=1 << 30)
    nan = frame[:17] + zstandard.ZstdCompressor().compress(b"\xff" * (16 * 8 * 4))
    with pytest.raises(CompressionError, match="NaN"):
        decode_inputs(nan, max_elements=128)
    for cut in (2, 6, 16, len(frame) - 3):
        with pytest.raises(CompressionError):
            decode_inputs(frame[:cut], max_elements=128)
    with pytest.raises(CompressionError, match="dtype code"):
        decode_inputs(frame[:4] + b"\x07" + frame[5:], max_elements=128)
    with pytest.raises(CompressionError, match="version"):
        decode_inputs(frame[:3] + b"\x02" + frame[4:], max_elements=128)
    with pytest.raises(CompressionError, match="not a handoff frame"):
        frame_kind(b"XYZ" + frame[3:])
    with pytest.raises(CompressionError, match="3-d float"):
        encode_inputs(torch.ones(4, 8))
    with pytest.raises(CompressionError, match="NaN"):
        encode_inputs(torch.full((1, 2, 3), float("nan")))
