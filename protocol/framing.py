"""Framing limits for tensors on the wire: how big a chunk, a tensor and a decoded tensor may be.

Apart from protocol/tensors.py (which needs torch) so that protocol/channels.py, and with it
the coordinator and its clients, can size gRPC messages without importing torch (~5 s per
process start).
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class FramingConfig:
    """Limits for tensors on the wire; the same object configures sending and receiving."""

    # Most encoded bytes per chunk (one gRPC message), bytes. 1 MiB is DESIGN.md's limit:
    # messages stay small enough to interleave on a connection and to bound per-message
    # memory. The channel's max message size (channels.py) sits a little above it.
    max_message_bytes: int = 1 * MiB
    # Fewest bytes in a chunk other than a tensor's only or last one, bytes. Stops a sender
    # from splitting a tensor into millions of tiny messages; 64 KiB caps a 512 MiB tensor
    # at 8192 chunks. Must not exceed max_message_bytes.
    min_chunk_bytes: int = 64 * 1024
    # Largest encoded payload of one tensor, bytes. 512 MiB: bigger than any activation
    # batch or adapter slice Pollinate sends (SmolLM2 hidden states for 16 x 2048 tokens in
    # fp32 are 72 MiB), small enough that one stream cannot exhaust a volunteer's RAM.
    max_tensor_bytes: int = 512 * MiB
    # Largest decoded tensor (shape product x dtype size), bytes. Separate from
    # max_tensor_bytes because compressed codecs expand on decode (cocktail by ~175x), so
    # the encoded size alone does not bound the memory decoding takes. 1 GiB holds any
    # single weight matrix of a 7B Llama block in fp32 (45M elements = 180 MiB) with room.
    max_decoded_bytes: int = 1024 * MiB
    # Most dimensions a tensor may declare. Hidden states have 3; 8 leaves room and bounds
    # the header a peer can make us parse.
    max_rank: int = 8

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "min_chunk_bytes", "max_tensor_bytes", "max_decoded_bytes", "max_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"FramingConfig.{name} must be a positive int, got {value!r}")
        if self.min_chunk_bytes > self.max_message_bytes:
            raise ValueError(
                f"FramingConfig.min_chunk_bytes ({self.min_chunk_bytes}) exceeds "
                f"max_message_bytes ({self.max_message_bytes})"
            )


DEFAULT_FRAMING = FramingConfig()
