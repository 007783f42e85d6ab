"""``none``: the tensor's own bytes, any dtype, lossless.

For fp32 pseudo-gradients in warm-up rounds and for bf16 activations that must arrive bit
for bit. The body is ``numel * itemsize`` bytes in the tensor's dtype, little-endian.
"""

from __future__ import annotations

import logging

import torch

from pollinate.compression.codec import register
from pollinate.compression.frame import DTYPE_CODES, FrameHeader, FrameReader, FramedCodec

logger = logging.getLogger(__name__)


@register("none")
class RawCodec(FramedCodec):
    codec_id = "none"
    lossless = True
    dtypes = tuple(DTYPE_CODES)

    def _encode_body(self, flat: torch.Tensor, *, seed: int) -> bytes:
        # A uint8 view reinterprets the storage (bf16 has no numpy dtype); no copy.
        return flat.view(torch.uint8).numpy().tobytes()

    def _decode_body(self, reader: FrameReader, header: FrameHeader, *,
                     seed: int | None) -> torch.Tensor:
        itemsize = torch.empty((), dtype=header.dtype).element_size()
        size = header.numel * itemsize
        if reader.remaining != size:
            reader.take(size, f"{header.numel} x {header.dtype} values")  # names a short frame
            reader.expect_end()  # or a long one
        if header.numel == 0:
            return torch.empty(0, dtype=header.dtype)
        # bytearray: torch.frombuffer wants writable memory to hand back a normal tensor
        raw = torch.frombuffer(bytearray(reader.take(size, "values")), dtype=torch.uint8)
        return raw.view(header.dtype)

    def error_bound(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.zeros(tensor.shape, dtype=torch.float32)
