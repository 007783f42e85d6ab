"""Codecs: the contract over every registered codec, stated error bounds, bad frames."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pollinate.compression import CompressionError, get_codec, registered_codecs
from pollinate.compression.cocktail import PARAMS, CocktailConfig, cycled_mask, random_mask
from pollinate.compression.frame import MAGIC, MAX_ELEMENTS, VERSION, peek_header
from pollinate.compression.int8 import Int8Config

CODECS = registered_codecs()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def sample(shape, dtype, kind, seed):
    """Heavy-tailed values (Student-t, 3 dof) at the scale ``kind`` names."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    t = torch.randn(n, generator=g) / torch.randn(3, n, generator=g).square().sum(0).div(3).sqrt()
    big = {torch.float16: 3e4, torch.bfloat16: 1e30, torch.float32: 1e30}[dtype]
    small = {torch.float16: 1e-6, torch.bfloat16: 1e-30, torch.float32: 1e-30}[dtype]
    x = {"normal": t, "zeros": torch.zeros(n), "constant": torch.full((n,), -0.375),
         "huge": torch.tanh(t) * big, "tiny": t * small}[kind]
    return x.reshape(shape).to(dtype)


def with_crc(frame_without_crc: bytes) -> bytes:
    return frame_without_crc + struct.pack("<I", zlib.crc32(frame_without_crc))


def header_len(frame: bytes) -> int:
    id_len = frame[4]
    return 5 + id_len + 2 + 8 * frame[6 + id_len]


def check_roundtrip(codec, x: torch.Tensor, seed: int = 3) -> torch.Tensor:
    y = codec.decode(codec.encode(x, seed=seed), seed=seed)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert bool(torch.isfinite(y.float()).all())
    err = (x.float() - y.float()).abs()
    bound = codec.error_bound(x)
    if x.dtype != torch.float32:  # the cast back to 16 bits rounds once more
        info = torch.finfo(x.dtype)
        bound = bound + (x.float().abs() + bound) * info.eps + info.smallest_normal
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max())}"
    return y


# --- the contract, over every registered codec ---------------------------------------------

@pytest.mark.parametrize("codec_id", CODECS)
@FAST
@given(shape=st.lists(st.integers(0, 9), max_size=3).map(tuple),
       dtype=st.sampled_from(DTYPES),
       kind=st.sampled_from(["normal", "zeros", "constant", "huge", "tiny"]),
       seed=st.integers(0, 2**16))
def test_roundtrip_keeps_shape_dtype_and_bound(codec_id, shape, dtype, kind, seed):
    codec = get_codec(codec_id)
    x = sample(shape, dtype, kind, seed)
    if codec_id == "fp16" and x.numel() and float(x.float().abs().max()) > 65504:
        with pytest.raises(CompressionError, match="fp16's range"):
            codec.encode(x)
        return
    check_roundtrip(codec, x, seed=seed)


@pytest.mark.parametrize("codec_id", CODECS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_encode_rejects_nan_and_inf(codec_id, bad):
    x = torch.randn(300)
    x[17] = bad
    with pytest.raises(CompressionError, match="NaN/Inf"):
        get_codec(codec_id).encode(x)


@pytest.mark.parametrize("codec_id", CODECS)
def test_every_prefix_of_a_frame_is_rejected(codec_id):
    codec = get_codec(codec_id)
    frame = codec.encode(torch.randn(4, 50), seed=2)
    for cut in range(len(frame)):
        with pytest.raises(CompressionError):
            codec.decode(frame[:cut])
    with pytest.raises(CompressionError, match="trailing|header implies|CRC"):
        codec.decode(frame + b"\0")


@pytest.mark.parametrize("codec_id", CODECS)
def test_frame_of_another_codec_is_rejected(codec_id):
    other = next(c for c in CODECS if c != codec_id)
    frame = get_codec(other).encode(torch.randn(10))
    with pytest.raises(CompressionError, match=f"encoded by codec '{other}'"):
        get_codec(codec_id).decode(frame)


@pytest.mark.parametrize("codec_id", CODECS)
def test_header_shape_must_match_body(codec_id):
    codec = get_codec(codec_id)
    frame = bytearray(codec.encode(torch.randn(1000), seed=1))
    shape_at = header_len(frame) - 8
    for claimed in (999, 1001, 2000, 2**29):
        frame[shape_at:shape_at + 8] = struct.pack("<Q", claimed)
        with pytest.raises(CompressionError):
            codec.decode(bytes(frame))


@pytest.mark.parametrize("codec_id", CODECS)
def test_absurd_shape_is_rejected_before_allocation(codec_id):
    codec = get_codec(codec_id)
    frame = bytearray(codec.encode(torch.randn(8, 8)))
    shape_at = header_len(frame) - 16
    frame[shape_at:shape_at + 16] = struct.pack("<QQ", 2**40, 2**40)
    with pytest.raises(CompressionError, match="above the limit"):
        codec.decode(bytes(frame))
    with pytest.raises(CompressionError, match="above the limit"):
        peek_header(bytes(frame))


@pytest.mark.parametrize("codec_id", CODECS)
def test_bad_magic_version_dtype_and_ndim(codec_id):
    codec = get_codec(codec_id)
    frame = codec.encode(torch.randn(5))
    id_end = 5 + frame[4]
    cases = {"magic": b"XYZ" + frame[3:], "version": frame[:3] + b"\x09" + frame[4:],
             "dtype code": frame[:id_end] + b"\xee" + frame[id_end + 1:],
             "dims": frame[:id_end + 1] + b"\xff" + frame[id_end + 2:]}
    for what, bad in cases.items():
        with pytest.raises(CompressionError):
            codec.decode(bad)
    with pytest.raises(CompressionError):
        codec.decode("not bytes")


@pytest.mark.parametrize("codec_id", CODECS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_corrupted_frames_decode_or_raise_compression_error(codec_id, data):
    codec = get_codec(codec_id)
    frame = bytearray(codec.encode(torch.randn(3, 70) * 5, seed=4))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(frame) - 1))
        frame[at] = data.draw(st.integers(0, 255))
    try:
        y = codec.decode(bytes(frame), max_elements=10_000)
    except CompressionError:
        return
    assert y.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) or \
        codec_id == "none"
    if y.is_floating_point() and codec_id != "none":
        assert bool(torch.isfinite(y).all())


@settings(max_examples=100, deadline=None)
@given(junk=st.binary(max_size=200), codec_id=st.sampled_from(CODECS))
def test_random_bytes_raise_compression_error_only(junk, codec_id):
    with pytest.raises(CompressionError):
        get_codec(codec_id).decode(MAGIC + bytes([VERSION]) + junk if junk[:1] == b"x" else junk)


# --- registry and configs -------------------------------------------------------------------

def test_registry_errors_are_compression_errors():
    assert {"none", "fp16", "int8", "cocktail"} <= set(CODECS)
    with pytest.raises(CompressionError, match="unknown codec 'zip'"):
        get_codec("zip")
    with pytest.raises(CompressionError, match="bits must be an int in \\[1, 8\\], got 9"):
        get_codec("cocktail", bits=9)
    with pytest.raises(CompressionError, match="codec 'none'"):
        get_codec("none", p=0.1)


@pytest.mark.parametrize("field,value", [("p", 0.0), ("p", 1.5), ("p", 1e-5), ("k", 0),
                                         ("k", 2.0), ("bits", 0), ("bits", 9), ("bits", 4.0),
                                         ("bucket", 0), ("zstd_level", 0),
                                         ("sample_size", 10)])
def test_cocktail_config_names_the_bad_value(field, value):
    with pytest.raises(ValueError, match=f"{field} .*{value!r}"):
        CocktailConfig(**{field: value})


def test_int8_config_rejects_bad_block():
    with pytest.raises(ValueError, match="block .*0"):
        Int8Config(block=0)


# --- per-codec claims -----------------------------------------------------------------------

def test_none_is_bit_exact_for_every_dtype():
    codec = get_codec("none")
    for x in (torch.randn(3, 4).to(torch.bfloat16), torch.arange(-5, 5), torch.tensor(True),
              torch.randn(2, 0, 3), torch.randn(7, dtype=torch.float64)):
        y = codec.decode(codec.encode(x))
        assert y.dtype == x.dtype and y.shape == x.shape and torch.equal(y, x)


def test_lossy_codecs_refuse_integer_tensors():
    for codec_id in ("fp16", "int8", "cocktail"):
        with pytest.raises(CompressionError, match="cannot encode torch.int64"):
            get_codec(codec_id).encode(torch.arange(10))


def test_fp16_decoder_rejects_inf_in_frame():
    codec = get_codec("fp16")
    frame = bytearray(codec.encode(torch.ones(4)))
    frame[-2:] = np.float16(np.inf).tobytes()
    with pytest.raises(CompressionError, match="NaN/Inf"):
        codec.decode(bytes(frame))


@pytest.mark.parametrize("codec_id, bad_last_byte", [("int8", b"\x80"), ("int4", b"\x00")])  # -128; -8
def test_blockwise_decoders_reject_bad_scale_and_code(codec_id, bad_last_byte):
    codec = get_codec(codec_id)
    frame = codec.encode(torch.randn(10))
    body = header_len(frame) + 4
    nan_scale = frame[:body] + np.float32(np.nan).tobytes() + frame[body + 4:]
    with pytest.raises(CompressionError, match="scales"):
        codec.decode(nan_scale)
    with pytest.raises(CompressionError, match="outside"):
        codec.decode(frame[:-1] + bad_last_byte)


def test_int4_is_int8_at_half_the_value_bytes_within_its_error_bound():
    x = torch.randn(1001, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 1001)
    frames = {c: get_codec(c).encode(x) for c in ("int8", "int4")}
    assert len(frames["int8"]) - len(frames["int4"]) == 1001 - 501
    y = get_codec("int4").decode(frames["int4"])
    assert (y - x).abs().le(get_codec("int4").error_bound(x)).all()


def test_cocktail_full_mask_8_bits_is_near_lossless():
    codec = get_codec("cocktail", p=1.0, k=1.0, bits=8)
    # rows are buckets (128 values each), of scales six orders of magnitude apart
    x = torch.randn(100, 128, generator=torch.Generator().manual_seed(0))
    x = x * torch.logspace(-3, 3, 100).unsqueeze(1)
    y = codec.decode(codec.encode(x))
    per_bucket = x.abs().amax(dim=1, keepdim=True)
    assert bool(((x - y).abs() <= per_bucket / 254 + x.abs() * 2.0**-21).all())  # + fp32 rounding
    assert float(((x - y).norm(dim=1) / x.norm(dim=1)).max()) < 1e-2  # every scale alike


@pytest.mark.parametrize("bits", range(1, 9))
def test_cocktail_every_bit_width_meets_its_step_bound(bits):
    x = sample((64, 32), torch.float32, "normal", bits)  # rows = buckets of 32
    y = check_roundtrip(get_codec("cocktail", p=1.0, k=1.0, bits=bits, bucket=32), x)
    if bits >= 2:  # every value kept: off by at most half a step of its bucket
        step = x.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert bool(((x - y).abs() <= step / 2 + x.abs() * 2.0**-21).all())
    else:  # sign x mean magnitude per bucket
        assert torch.equal(torch.sign(y), torch.sign(x))
        assert torch.allclose(y.abs(), x.abs().mean(dim=1, keepdim=True).expand_as(x))


def test_cocktail_keeps_about_p_times_k_inside_the_seeded_mask():
    n, seed = 400_000, 11
    codec = get_codec("cocktail")  # p=0.1, k=0.2
    x = sample((n,), torch.float32, "normal", 0)
    frame = codec.encode(x, seed=seed)
    y = codec.decode(frame, seed=seed)
    support = torch.nonzero(y).squeeze(1).numpy()
    assert abs(support.size / (0.1 * 0.2 * n) - 1) < 0.1
    assert np.isin(support, random_mask(n, 0.1, seed)).all()
    kept = x[torch.from_numpy(support)].abs()
    masked = x[torch.from_numpy(random_mask(n, 0.1, seed))].abs()
    assert float(kept.min()) >= float(masked.quantile(0.75))  # the largest ~20% of the mask
    assert codec.encode(x, seed=seed) == frame  # deterministic
    other = codec.decode(codec.encode(x, seed=seed + 1))
    assert not torch.equal(other != 0, y != 0)
    assert 4 * n / len(frame) >= 100
    with pytest.raises(CompressionError, match="seed 11, expected 12"):
        codec.decode(frame, seed=12)


def test_cocktail_mask_is_pinned_and_bernoulli():
    # Every member must rebuild the same mask from the seed, on any machine and version:
    # these values may change only with a new frame format version.
    assert random_mask(1000, 0.1, 7).tolist()[:12] == [0, 5, 9, 11, 17, 20, 22, 37, 65, 77,
                                                       89, 91]
    assert random_mask(1000, 0.1, 7).size == 105
    assert random_mask(10, 0.5, 0).tolist() == [0, 1, 2, 4, 6]
    assert random_mask(10, 1.0, 0) is None and random_mask(0, 0.3, 1).size == 0
    gaps = np.diff(random_mask(1_000_000, 0.3, 5))
    frequency = np.bincount(gaps, minlength=6)[1:6] / gaps.size
    assert np.allclose(frequency, [0.3 * 0.7 ** g for g in range(5)], atol=3e-3)
    counts = np.histogram(random_mask(1_000_000, 0.1, 4), bins=10, range=(0, 1e6))[0]
    assert np.all(np.abs(counts - 10_000) < 600)  # uniform over the tensor


def test_cocktail_cycled_mask_sends_every_coordinate_within_ceil_one_over_p_rounds():
    n = 50_000
    for p in (0.7, 0.3, 0.5):
        window = math.ceil(1 / p)
        masks = [cycled_mask(n, p, (r << 32) | 12345) for r in range(3 * window)]
        for mask in masks:  # each round: a random p-subset, sorted, in range
            assert abs(mask.size / n - p) < 0.02 and np.all(np.diff(mask) > 0)
        for r in range(len(masks) - window + 1):  # no coordinate waits ceil(1/p) rounds
            sent = np.zeros(n, dtype=bool)
            for mask in masks[r:r + window]:
                sent[mask] = True
            assert sent.all()
        assert not np.array_equal(masks[0], masks[1])
    # pinned like random_mask: members on any machine must rebuild the same positions
    assert cycled_mask(20, 0.5, 0).tolist() == cycled_mask(20, 0.5, 7).tolist()  # low bits unused
    assert cycled_mask(10, 1.0, 5 << 32) is None
    # each round's mask is the complement of the previous one at p = 1/2
    a, b = cycled_mask(1000, 0.5, 0 << 32), cycled_mask(1000, 0.5, 1 << 32)
    assert np.intersect1d(a, b).size == 0 and np.union1d(a, b).size == 1000


def test_cocktail_cycled_frames_round_trip_and_say_their_schedule():
    x = sample((100_000,), torch.float32, "normal", 3)
    cycled = get_codec("cocktail", p=0.7, k=1.0, bits=1, bucket=512, cycled=True)
    seed = (4 << 32) | 99
    frame = cycled.encode(x, seed=seed)
    y = cycled.decode(frame, seed=seed)
    support = torch.nonzero(y).squeeze(1).numpy()
    assert np.array_equal(support, cycled_mask(x.numel(), 0.7, seed))
    assert torch.equal(torch.sign(y[support]), torch.sign(x[support]))
    assert frame[header_len(frame) + struct.calcsize("<" + PARAMS) - 1] == 1
    assert get_codec("cocktail").decode(frame).equal(y)  # the frame, not the config, decides
    bernoulli = get_codec("cocktail", p=0.7, k=1.0, bits=1, bucket=512).encode(x, seed=seed)
    assert bernoulli[header_len(bernoulli) + struct.calcsize("<" + PARAMS) - 1] == 0
    with pytest.raises(ValueError, match="cycled must be a bool"):
        CocktailConfig(cycled=1)


def test_cocktail_sparse_frames_use_delta_coded_positions():
    x = sample((200_000,), torch.float32, "normal", 5)
    dense, sparse = get_codec("cocktail"), get_codec("cocktail", k=0.01)
    mode_at = lambda f: header_len(f) + struct.calcsize("<" + PARAMS) - 3  # noqa: E731
    f_dense, f_sparse = dense.encode(x), sparse.encode(x)
    assert (f_dense[mode_at(f_dense)], f_sparse[mode_at(f_sparse)]) == (0, 1)
    check_roundtrip(sparse, x)
    assert int((sparse.decode(f_sparse) != 0).sum()) == pytest.approx(0.1 * 0.01 * 2e5, rel=0.3)


def test_cocktail_dense_frames_skip_unpacking_a_full_bitmap_and_still_check_it():
    n, seed = 50_000, 5
    x = sample((n,), torch.float32, "normal", 6)
    codec = get_codec("cocktail", p=0.5, k=1.0, bits=1, bucket=64)
    frame = codec.encode(x, seed=seed)
    at, size = header_len(frame), struct.calcsize("<" + PARAMS)
    m, kept = struct.unpack("<" + PARAMS, frame[at:at + size])[5:7]
    assert kept == m and m % 8  # every masked value kept; the bitmap has padding bits
    y = codec.decode(frame, seed=seed).numpy()
    mask = random_mask(n, 0.5, seed)
    masked = x.numpy()[mask]  # sign x mean magnitude per bucket of 64 masked values
    means = np.array([np.abs(masked[i:i + 64]).mean() for i in range(0, m, 64)])
    assert np.allclose(y[mask], np.sign(masked) * np.repeat(means, 64)[:m], rtol=1e-6)
    assert np.count_nonzero(y) == m

    payload = bytearray(zstandard.ZstdDecompressor().decompress(frame[at + size:-4]))
    for edit, message in [(lambda b: b.__setitem__(0, b[0] ^ 1), "bitmap marks"),
                          (lambda b: b.__setitem__(m // 8, b[m // 8] | 0x80), "past its length")]:
        broken = bytearray(payload)
        edit(broken)
        with pytest.raises(CompressionError, match=message):
            codec.decode(with_crc(frame[:at + size] + zstandard.ZstdCompressor().compress(bytes(broken))))


def test_cocktail_decoder_validates_parameters_before_decompressing():
    codec = get_codec("cocktail")
    frame = codec.encode(torch.randn(5000), seed=3)
    at = header_len(frame)
    size = struct.calcsize("<" + PARAMS)
    p, k, bits, bucket, seed, m, kept, mode, width, schedule = struct.unpack(
        "<" + PARAMS, frame[at:at + size])

    def patched(**change):  # a well-formed frame (valid CRC) with one field changed
        fields = dict(p=p, k=k, bits=bits, bucket=bucket, seed=seed, m=m, kept=kept,
                      mode=mode, width=width, schedule=schedule) | change
        return with_crc(frame[:at] + struct.pack("<" + PARAMS, *fields.values())
                        + frame[at + size:-4])

    for change, message in [({"bits": 0}, "bits=0"), ({"bits": 9}, "bits=9"),
                            ({"p": 2.0}, "p=2.0"), ({"p": math.nan}, "p=nan"),
                            ({"k": 0.0}, "k=0.0"), ({"bucket": 0}, "bucket=0"),
                            ({"kept": m + 1}, "kept of"), ({"m": 4000}, "mask of 4000"),
                            ({"mode": 7}, "index mode"), ({"kept": kept - 1}, "declares"),
                            ({"schedule": 2}, "mask schedule 2"),
                            ({"seed": seed + 1}, "mask for seed|bitmap marks")]:
        with pytest.raises(CompressionError, match=message):
            codec.decode(patched(**change))

    payload = bytearray(zstandard.ZstdDecompressor().decompress(frame[at + size:-4]))
    payload[math.ceil(m / 8):math.ceil(m / 8) + 4] = np.float32(-1).tobytes()
    with pytest.raises(CompressionError, match="scales"):
        codec.decode(with_crc(frame[:at + size] + zstandard.ZstdCompressor().compress(payload)))
    with pytest.raises(CompressionError, match="CRC-32"):
        codec.decode(frame[:-5] + bytes([frame[-5] ^ 1]) + frame[-4:])


def test_max_elements_bounds_what_a_frame_may_claim():
    codec = get_codec("cocktail")
    frame = codec.encode(torch.zeros(100_000))
    assert len(frame) < 200  # a big tensor of zeros is a legitimately tiny frame ...
    with pytest.raises(CompressionError, match="above the limit 1000"):
        codec.decode(frame, max_elements=1000)  # ... so the receiver's limit is what bounds it
    assert MAX_ELEMENTS == 1 << 30


def test_a_version_1_frame_is_refused_naming_both_versions():
    frame = get_codec("cocktail").encode(torch.randn(64), seed=1)
    with pytest.raises(CompressionError, match="frame format version 1, this build reads 2"):
        get_codec("cocktail").decode(frame[:3] + b"\x01" + frame[4:])


# --- row codecs for activations and their gradients (issue 12) -------------------------------

def test_row_codecs_give_every_token_its_own_scale():
    # tokens six orders of magnitude apart: each row keeps its own relative precision,
    # where the flat int8 blocks (128 values, straddling rows of 96) would not
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 96, generator=g) * torch.logspace(-3, 3, 40).view(1, 40, 1)
    for codec_id, worst in (("int8row", 1 / 127), ("int4row", 1 / 7)):
        y = get_codec(codec_id).decode(get_codec(codec_id).encode(x))
        rel = (x - y).abs().amax(dim=-1) / x.abs().amax(dim=-1)
        assert float(rel.max()) <= worst / 2 * (1 + 1e-5), (codec_id, float(rel.max()))
    flat = get_codec("int8")
    y = flat.decode(flat.encode(x))
    rel = (x - y).abs().amax(dim=-1) / x.abs().amax(dim=-1)
    assert float(rel.max()) > 1 / 127  # the contrast: a small row sharing a block with a big one


def test_row_codec_sizes_are_a_byte_or_half_a_byte_per_value():
    x = torch.randn(8, 50, 576)
    header = header_len(get_codec("none").encode(x))  # the same header layout for every codec
    id_extra = {"int8row": len("int8row") - len("none"), "int4row": len("int4row") - len("none")}
    rows = 8 * 50  # per row: the codes, the fp32 scales, and the outliers (fp32 value, u16 index)
    assert len(get_codec("int8row").encode(x)) == header + id_extra["int8row"] + 7 + rows * (576 + 4 + 4 * 6)
    assert len(get_codec("int4row").encode(x)) == header + id_extra["int4row"] + 7 + rows * (288 + 9 * 4 + 8 * 6)


def test_outlier_channels_travel_exactly_and_do_not_coarsen_the_rest():
    # a residual stream with a few massive channels, as SmolLM2's (channel 507 ~ 1e4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, 576, generator=g)
    x[..., 507] += 5000.0
    x[..., 247] -= 300.0
    for codec_id, step in (("int8row", 1 / 127), ("int4row", 1 / 7)):
        codec = get_codec(codec_id)
        y = codec.decode(codec.encode(x))
        assert torch.equal(y[..., [247, 507]], x[..., [247, 507]])  # exact
        rest = torch.ones(576, dtype=torch.bool)
        rest[[247, 507]] = False
        err = (x - y)[..., rest].abs().amax()
        assert float(err) <= x[..., rest].abs().amax() * step / 2 * (1 + 1e-5), codec_id
    no_outliers = get_codec("int8row", outliers=0)
    y = no_outliers.decode(no_outliers.encode(x))
    assert int(torch.count_nonzero(y[..., rest])) == 0  # one scale per row: every other value rounds to 0


def test_row_codec_decoder_rejects_bad_outlier_indices():
    codec = get_codec("int8row")
    x = torch.randn(2, 10)
    frame = bytearray(codec.encode(x))
    at = header_len(bytes(frame)) + 7 + 2 * 4  # the first row's outlier indices
    frame[at:at + 2] = np.uint16(10).tobytes()  # past the row
    with pytest.raises(CompressionError, match="outlier indices"):
        codec.decode(bytes(frame))
    frame = bytearray(codec.encode(x))
    frame[at + 2:at + 4] = frame[at:at + 2]  # a repeated index
    with pytest.raises(CompressionError, match="outlier indices"):
        codec.decode(bytes(frame))


def test_stochastic_rounding_is_unbiased_and_reproducible():
    # scale = 0.7 / 7 = 0.1 per step; 0.15 sits half-way between codes 1 and 2
    y = torch.full((1, 64), 0.15)
    y[0, 0] = 0.7
    nearest = get_codec("int4row", outliers=0).decode(get_codec("int4row", outliers=0).encode(y))
    assert abs(float(nearest[0, 1]) - 0.15) == pytest.approx(0.05, rel=1e-4)  # always one side
    codec = get_codec("int4row-sr", outliers=0)
    draws = torch.stack([codec.decode(codec.encode(y, seed=s)) for s in range(400)])
    assert draws[:, 0, 1:].unique().tolist() == pytest.approx([0.1, 0.2], rel=1e-5)  # the two neighbours
    assert abs(float(draws[:, 0, 1:].mean()) - 0.15) < 0.003  # unbiased: the mean is the value
    assert codec.encode(y, seed=5) == codec.encode(y, seed=5)  # reproducible per seed and tensor
    assert codec.encode(y, seed=5) != codec.encode(y, seed=6)


def test_row_codec_decoder_rejects_a_frame_of_other_bits_and_bad_codes():
    frame = get_codec("int8row").encode(torch.randn(3, 10))
    body = header_len(frame)
    with pytest.raises(CompressionError, match="4-bit|8-bit"):
        get_codec("int8row").decode(frame[:body] + b"\x04" + frame[body + 1:])
    with pytest.raises(CompressionError, match="-128"):
        get_codec("int8row").decode(frame[:-1] + b"\x80")
    frame4 = get_codec("int4row").encode(torch.randn(3, 10))
    with pytest.raises(CompressionError, match="-8"):
        get_codec("int4row").decode(frame4[:-1] + b"\x00")


@pytest.mark.parametrize("plain_id", ["int8row", "int4row"])
def test_zstd_row_codec_decodes_the_plain_codecs_tensor_in_fewer_bytes(plain_id):
    # a batch as the trainer sends it: a prefix shared by every example, right padding of zeros
    x = torch.randn(8, 50, 576)
    x[:, :30] = x[0, :30]
    x[:, 45:] = 0
    plain, zstd = get_codec(plain_id), get_codec(f"{plain_id}-zstd")
    assert torch.equal(zstd.decode(zstd.encode(x)), plain.decode(plain.encode(x)))  # lossless on top
    assert len(zstd.encode(x)) < 0.5 * len(plain.encode(x))  # 8 x 30 shared rows cross once, pads ~free
    y = torch.randn(3, 576)  # nothing to find: at worst a few bytes of zstd's framing more
    assert len(zstd.encode(y)) <= len(plain.encode(y)) + 32


def _zstd_frame(codec_id: str, x: torch.Tensor, inner: bytes, **zstd_args) -> bytes:
    """A frame of `codec_id` for x's header whose compressed body is `inner`, zstd-framed."""
    good = get_codec(codec_id).encode(x)
    head = header_len(good) + 7  # the frame header, then bits (u8), group (u32), outliers (u16)
    return good[:head] + zstandard.ZstdCompressor(**zstd_args).compress(inner)


def test_zstd_row_codec_refuses_a_body_that_disagrees_with_the_header_before_allocating():
    x = torch.randn(2, 16)
    size = 4 * 2 + 2 * 4 * 6 + 32  # scales, outliers (u16 index + fp32), int8 codes
    plain = get_codec("int8row").encode(x)
    assert len(plain) == header_len(plain) + 7 + size
    ok = _zstd_frame("int8row-zstd", x, plain[-size:])
    assert torch.equal(get_codec("int8row-zstd").decode(ok), get_codec("int8row").decode(plain))
    # 1 MiB of zeros, a few hundred bytes compressed, under a header that claims 32 values
    with pytest.raises(CompressionError, match="declares"):
        get_codec("int8row-zstd").decode(_zstd_frame("int8row-zstd", x, bytes(1 << 20)))
    with pytest.raises(CompressionError, match="declares"):  # no declared size: refused too
        get_codec("int8row-zstd").decode(_zstd_frame("int8row-zstd", x, plain[-size:], write_content_size=False))
    with pytest.raises(CompressionError, match="declares"):  # one byte short
        get_codec("int8row-zstd").decode(_zstd_frame("int8row-zstd", x, plain[-size:-1]))
    with pytest.raises(CompressionError, match="trailing"):
        get_codec("int8row-zstd").decode(ok + ok[-8:])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 1_234_567, 4_000_000 - 1])
def test_all_finite_finds_one_bad_value_anywhere(bad, where):
    """compression/frame.all_finite (one aminmax pass, in place of isfinite().all()) is what
    the outer step and the owners' screen rely on against poisoned pseudo-gradients."""
    from pollinate.compression.frame import all_finite

    x = torch.randn(4_000_000)
    assert all_finite(x) and all_finite(torch.empty(0)) and all_finite(torch.arange(3))
    x[where] = bad
    assert not all_finite(x) and not all_finite(x[where:where + 1])
    assert not all_finite(x.to(torch.float16)) and not all_finite(x.to(torch.bfloat16))
