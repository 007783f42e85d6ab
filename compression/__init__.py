"""Codecs for tensors on the wire: none, fp16, int8 and CocktailSGD, plus error feedback.

``get_codec(codec_id, **params)`` is the entry point; see docs/compression.md.
"""

from pollinate.compression.codec import (
    Codec,
    CompressionError,
    get_codec,
    register,
    registered_codecs,
)

__all__ = ["Codec", "CompressionError", "get_codec", "register", "registered_codecs"]
