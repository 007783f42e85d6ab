"""``fp16``: IEEE half precision on the wire, cast back to the tensor's dtype on decode.

For activations between spans: half the bytes of fp32 at 2^-11 relative error. Values
beyond fp16's range (|x| > 65504) are refused rather than sent as Inf, since an Inf
activation would poison the next span silently; use ``int8`` or ``none`` for such tensors.
Values below 2^-24 flush to zero (absolute error at most 2^-25).
"""

from __future__ import annotations

import logging

import torch

from pollinate.compression.codec import CompressionError, register
from pollinate.compression.frame import FrameHeader, FrameReader, FramedCodec, check_finite

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0


@register("fp16")
class Fp16Codec(FramedCodec):
    codec_id = "fp16"

    def _encode_body(self, flat: torch.Tensor, *, seed: int) -> bytes:
        half = flat.to(torch.float16)
        try:
            check_finite(half)
        except CompressionError:
            peak = float(flat.abs().max())
            raise CompressionError(
                f"|x| up to {peak:.4g} exceeds fp16's range ({FP16_MAX}); use codec "
                f"'int8' or 'none' for this tensor") from None
        return half.view(torch.uint8).numpy().tobytes()

    def _decode_body(self, reader: FrameReader, header: FrameHeader, *,
                     seed: int | None) -> torch.Tensor:
        size = 2 * header.numel
        if reader.remaining != size:
            reader.take(size, f"{header.numel} fp16 values")
            reader.expect_end()
        if header.numel == 0:
            return torch.empty(0, dtype=header.dtype)
        half = torch.frombuffer(bytearray(reader.take(size, "values")), dtype=torch.float16)
        check_finite(half, "the frame's values")  # a sender cannot smuggle Inf/NaN past the encoder's check
        return half.to(header.dtype)

    def error_bound(self, tensor: torch.Tensor) -> torch.Tensor:
        # round to nearest: half an ulp = 2^-11 relative in the normal range, 2^-25
        # absolute in the subnormal range
        return torch.clamp(tensor.detach().float().abs() * 2.0**-11, min=2.0**-25)
