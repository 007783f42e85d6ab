"""The codec contract and the registry keyed by the codec id that travels on the wire.

A codec turns a tensor into bytes and back. The bytes are self-describing (codec id, dtype,
shape and the codec's parameters sit in the frame header, see ``frame.py``), so a receiver
needs only the codec id from the message to pick a decoder, and the decoder checks that the
frame agrees. Every decoder raises ``CompressionError`` on bad input and nothing else.

This package depends on torch, numpy and zstandard only: node/, coordinator/, client/ and
protocol/ import it, never the reverse.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import torch

logger = logging.getLogger(__name__)


class CompressionError(ValueError):
    """A frame that cannot be decoded, or a tensor that cannot be encoded (NaN/Inf, dtype).

    A ``ValueError`` so that callers mapping bad input to INVALID_ARGUMENT catch it with the
    rest of their validation errors.
    """


class Codec(ABC):
    """encode(tensor) -> bytes, decode(bytes) -> tensor with the same shape and dtype.

    ``seed`` is the round number for codecs whose output depends on shared randomness
    (cocktail's random mask); deterministic codecs ignore it. ``decode(seed=None)`` trusts
    the seed written in the frame; passing the expected seed makes a mismatch an error.
    """

    # the id carried in protocol's Tensor.codec and in the frame header; lowercase ASCII
    codec_id: ClassVar[str]
    # True when decode(encode(x)) == x bit for bit
    lossless: ClassVar[bool] = False

    @abstractmethod
    def encode(self, tensor: torch.Tensor, *, seed: int = 0) -> bytes:
        """Frame ``tensor``; raises CompressionError on NaN/Inf or an unsupported dtype."""

    @abstractmethod
    def decode(self, data: bytes, *, seed: int | None = None) -> torch.Tensor:
        """The tensor a frame carries; raises CompressionError on any bad frame."""

    def error_bound(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise upper bound on |x - decode(encode(x))| in fp32 arithmetic.

        The bound is for the codec's own rounding; casting the result back to a 16-bit dtype
        adds that dtype's rounding (half an ulp of the value) on top.
        """
        raise NotImplementedError(f"codec {self.codec_id!r} states no elementwise bound")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(codec_id={self.codec_id!r})"


_REGISTRY: dict[str, Callable[..., Codec]] = {}


def register(codec_id: str) -> Callable[[Callable[..., Codec]], Callable[..., Codec]]:
    """Class decorator: make ``get_codec(codec_id, **params)`` build this codec."""
    if not codec_id.isascii() or not codec_id or len(codec_id) > 32:
        raise ValueError(f"codec id must be 1-32 ASCII characters, got {codec_id!r}")

    def wrap(factory: Callable[..., Codec]) -> Callable[..., Codec]:
        if codec_id in _REGISTRY:
            raise ValueError(f"codec id {codec_id!r} is registered twice")
        _REGISTRY[codec_id] = factory
        return factory

    return wrap


def get_codec(codec_id: str, **params: object) -> Codec:
    """The codec registered under ``codec_id``, configured with ``params``.

    Unknown ids and bad parameters raise ``CompressionError`` (a ValueError), which the
    protocol layer reports as INVALID_ARGUMENT.
    """
    _load_builtin_codecs()
    factory = _REGISTRY.get(codec_id)
    if factory is None:
        raise CompressionError(
            f"unknown codec {codec_id!r}; registered: {', '.join(sorted(_REGISTRY))}")
    try:
        return factory(**params)
    except TypeError as exc:  # an unknown keyword
        raise CompressionError(f"codec {codec_id!r}: {exc}") from exc
    except ValueError as exc:  # a config's __post_init__ naming the bad value
        raise CompressionError(f"codec {codec_id!r}: {exc}") from exc


# Codecs for hidden states and their gradients (Forward, Backward, Inference, both ways).
# Their decode costs at most a few bytes per payload byte; pseudo-gradient codecs are left out
# (cocktail decodes a 625-byte payload into a 1 GiB bitmap-driven scatter: a peer could make a
# node allocate that with one small message).
ACTIVATION_CODECS = frozenset({"none", "fp16", "int8", "int8row", "int4row", "int4row-sr", "int8row-zstd",
                               "int4row-zstd"})


def get_activation_codec(codec_id: str) -> Codec:
    """get_codec for activations: LookupError for a codec not in ACTIVATION_CODECS."""
    if codec_id not in ACTIVATION_CODECS:
        raise LookupError(f"{codec_id!r} is not an activation codec (allowed: {', '.join(sorted(ACTIVATION_CODECS))})")
    return get_codec(codec_id)


def registered_codecs() -> tuple[str, ...]:
    _load_builtin_codecs()
    return tuple(sorted(_REGISTRY))


def _load_builtin_codecs() -> None:
    # The codec modules register themselves on import; importing them here (not at module
    # top) keeps codec.py importable by them without a cycle.
    from pollinate.compression import cocktail, fp16, int8, raw, rowquant  # noqa: F401
