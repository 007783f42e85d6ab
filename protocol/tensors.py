"""Tensors on the wire: encode with a codec, split into Tensor chunks, reassemble, check.

A tensor of any size travels as a run of `pollinate.v1.Tensor` messages (chunks) of at
most `FramingConfig.max_message_bytes` of encoded payload each. The receiver checks every
chunk before it keeps any bytes, so a peer cannot make it allocate more than the configured
limits, whatever the headers claim:

- the header (dtype, shape, codec, total_bytes, num_chunks, name) is checked on chunk 0:
  dtype in the whitelist, rank and dims sane, decoded size (shape product x dtype size)
  and encoded size (total_bytes) under their limits, codec known;
- chunking is exact: chunk 0 fixes the chunk size C (at most max_message_bytes, at least
  min_chunk_bytes unless the tensor fits one chunk); every chunk but the last carries
  exactly C bytes, the last one the remainder, and num_chunks = ceil(total_bytes / C);
- chunk indices run 0, 1, 2, ... and every chunk repeats chunk 0's header;
- bytes are kept only as they arrive (never preallocated from total_bytes);
- after decoding, the codec's tensor must have the header's shape and dtype.

Any violation raises InvalidRequest (INVALID_ARGUMENT on the wire) with a message naming
the tensor and what was wrong. Encoding and decoding are CPU work: call `encode_tensor`
and `EncodedTensor.decode` through `asyncio.to_thread` (or an executor) from async code;
`TensorAssembler.feed` only checks and appends and is cheap enough for the event loop.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pollinate.protocol.errors import InvalidRequest
from pollinate.protocol.framing import DEFAULT_FRAMING, MiB, FramingConfig  # noqa: F401 (re-exported)
from pollinate.protocol.v1 import common_pb2

if TYPE_CHECKING:  # protocol imports and serves Health without loading the codecs
    from pollinate.compression.codec import Codec

# Names of the activation tensors Forward, Backward and Inference carry (Tensor.name).
HIDDEN_STATES = "hidden_states"  # a span's input (requests) or output (Forward/Inference replies)
GRAD_OUTPUTS = "grad_outputs"  # Backward: the loss gradient with respect to the span's output
GRAD_INPUTS = "grad_inputs"  # Backward's reply: the gradient with respect to the span's input
ADAPTER_FLAT = "adapter.flat"  # a job's trainable tensors as one flat fp32 tensor (Backward spot checks)


# dtype names allowed on the wire (torch names without "torch."). A whitelist, because the
# name comes from a peer: getattr(torch, name) on arbitrary strings is not a parser.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}




CodecLookup = Callable[[str], "Codec"]  # codec id -> compression/codec.py Codec


def _default_lookup(codec_id: str) -> Codec:
    # Imported on use: protocol must import (and generate, and serve Health) without the
    # codecs, and compression may not depend on protocol, so no import cycle either way.
    from pollinate.compression.codec import get_codec

    return get_codec(codec_id)


def _get_codec(codec_id: str, lookup: CodecLookup | None, what: str) -> Codec:
    if not codec_id:
        raise InvalidRequest(f"{what}: no codec id")
    try:
        return (lookup or _default_lookup)(codec_id)
    except (KeyError, LookupError, ValueError) as exc:  # CompressionError is a ValueError
        raise InvalidRequest(f"{what}: unknown codec {codec_id!r} ({exc})") from exc


def _describe(name: str) -> str:
    return f"tensor {name!r}" if name else "tensor"


@dataclass(frozen=True)
class EncodedTensor:
    """A whole encoded tensor: header plus payload, before chunking or after reassembly.

    Kept as its own value so that a payload can be sent to several peers, or decoded by
    several parties, from the same bytes (DiLoCo members all decode the owner's result).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    codec: str
    payload: bytes

    def chunks(self, config: FramingConfig = DEFAULT_FRAMING) -> Iterator[common_pb2.Tensor]:
        """The Tensor messages that carry this payload, in order (one empty chunk if empty)."""
        size = config.max_message_bytes
        total = len(self.payload)
        if total > config.max_tensor_bytes:
            raise InvalidRequest(
                f"{_describe(self.name)}: encoded payload of {total} bytes exceeds "
                f"max_tensor_bytes {config.max_tensor_bytes}"
            )
        num_chunks = max(1, math.ceil(total / size))
        view = memoryview(self.payload)
        for index in range(num_chunks):
            yield common_pb2.Tensor(
                dtype=self.dtype,
                shape=self.shape,
                codec=self.codec,
                data=bytes(view[index * size : (index + 1) * size]),
                total_bytes=total,
                chunk_index=index,
                num_chunks=num_chunks,
                name=self.name,
            )

    def decode(self, *, seed: int | None = None, lookup: CodecLookup | None = None) -> torch.Tensor:
        """Decode the payload and check it against the header (CPU work: use a thread).

        The codecs' frames describe themselves (dtype, shape); a frame that disagrees with
        the message header means an inconsistent sender and is refused, not reconciled."""
        what = _describe(self.name)
        codec = _get_codec(self.codec, lookup, what)
        try:
            decoded = codec.decode(self.payload, seed=seed)
        except ValueError as exc:  # CompressionError: a truncated or inconsistent frame
            raise InvalidRequest(f"{what}: codec {self.codec!r} rejected the payload: {exc}") from exc
        numel = math.prod(self.shape)
        if decoded.numel() != numel:
            raise InvalidRequest(
                f"{what}: header shape {list(self.shape)} has {numel} elements but codec "
                f"{self.codec!r} decoded {decoded.numel()}"
            )
        if tuple(decoded.shape) != self.shape:
            raise InvalidRequest(
                f"{what}: header shape {list(self.shape)} but codec {self.codec!r} decoded {list(decoded.shape)}"
            )
        if decoded.dtype != DTYPES[self.dtype]:
            raise InvalidRequest(f"{what}: header dtype {self.dtype} but codec {self.codec!r} decoded {decoded.dtype}")
        return decoded


def encode_tensor(
    tensor: torch.Tensor,
    *,
    codec: str = "none",
    name: str = "",
    seed: int = 0,
    lookup: CodecLookup | None = None,
) -> EncodedTensor:
    """Encode `tensor` with the codec `codec` (CPU work: use a thread from async code).

    `seed`: the DiLoCo round for cocktail's shared random mask; other codecs ignore it.
    A codec refusing the tensor (NaN/Inf, out of range for fp16) raises CompressionError."""
    what = _describe(name)
    dtype_name = DTYPE_NAMES.get(tensor.dtype)
    if dtype_name is None:
        raise InvalidRequest(f"{what}: dtype {tensor.dtype} is not allowed on the wire (allowed: {sorted(DTYPES)})")
    encoder = _get_codec(codec, lookup, what)
    payload = encoder.encode(tensor.detach(), seed=seed)
    return EncodedTensor(name=name, dtype=dtype_name, shape=tuple(tensor.shape), codec=codec, payload=bytes(payload))


def tensor_to_chunks(
    tensor: torch.Tensor,
    *,
    codec: str = "none",
    name: str = "",
    seed: int = 0,
    config: FramingConfig = DEFAULT_FRAMING,
    lookup: CodecLookup | None = None,
) -> list[common_pb2.Tensor]:
    """Encode and chunk in one call."""
    return list(encode_tensor(tensor, codec=codec, name=name, seed=seed, lookup=lookup).chunks(config))


class TensorAssembler:
    """Reassembles tensors from a stream of chunks, checking as it goes.

        assembler = TensorAssembler(config)
        async for request in request_iterator:
            encoded = assembler.feed(request.tensor)
            if encoded is not None:
                tensor = await asyncio.to_thread(encoded.decode)
        assembler.close()  # raises if the stream stopped inside a tensor

    Holds at most one partial tensor; what to do with several complete ones is the caller's.
    """

    def __init__(self, config: FramingConfig = DEFAULT_FRAMING, *, lookup: CodecLookup | None = None,
                 check: Callable[[common_pb2.Tensor], None] | None = None,
                 hold: Callable[[int], None] | None = None) -> None:
        self._config = config
        self._lookup = lookup
        # The receiver's own expectations of a tensor (its name, a shape it can serve), asked of
        # each tensor's chunk 0 once the checks above passed and before its bytes are kept:
        # raises InvalidRequest to refuse. Without it a stream holds up to max_tensor_bytes.
        self._check = check
        # Told the bytes a tensor in progress may take (encoded and decoded, at its chunk 0)
        # and 0 once it is whole or dropped: a caller's share of a budget (protocol/budget.py
        # StreamHold), which raises ResourceExhausted to refuse.
        self._hold = hold
        self._first: common_pb2.Tensor | None = None  # chunk 0 of the tensor in progress
        self._header: tuple | None = None
        self._parts: list[bytes] = []
        self._received = 0
        self._chunk_size = 0

    @property
    def in_progress(self) -> bool:
        """True between a tensor's first and last chunk."""
        return self._first is not None

    def feed(self, chunk: common_pb2.Tensor) -> EncodedTensor | None:
        """Take the next chunk; returns the whole tensor when this was its last chunk."""
        if self._first is None:
            self._start(chunk)
        else:
            self._continue(chunk)
        self._parts.append(chunk.data)
        self._received += len(chunk.data)
        first = self._first
        assert first is not None
        if chunk.chunk_index + 1 < first.num_chunks:
            return None
        if self._received != first.total_bytes:  # unreachable if the size checks hold
            raise InvalidRequest(
                f"{_describe(first.name)}: received {self._received} bytes, header declared {first.total_bytes}"
            )
        payload = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        encoded = EncodedTensor(
            name=first.name, dtype=first.dtype, shape=tuple(first.shape), codec=first.codec, payload=payload
        )
        self._reset()
        return encoded

    def close(self) -> None:
        """Call at end of stream: a stream that stopped inside a tensor is truncated."""
        if self._first is not None:
            first = self._first
            got = len(self._parts)
            self._reset()
            raise InvalidRequest(
                f"{_describe(first.name)}: stream ended after {got} of {first.num_chunks} chunks "
                f"({first.total_bytes} bytes declared)"
            )

    def _reset(self) -> None:
        if self._hold is not None and self._first is not None:
            self._hold(0)
        self._first = None
        self._header = None
        self._parts = []
        self._received = 0
        self._chunk_size = 0

    @staticmethod
    def _header_of(chunk: common_pb2.Tensor) -> tuple:
        return (chunk.dtype, tuple(chunk.shape), chunk.codec, chunk.total_bytes, chunk.num_chunks, chunk.name)

    def _start(self, chunk: common_pb2.Tensor) -> None:
        cfg = self._config
        what = _describe(chunk.name)
        if chunk.chunk_index != 0:
            raise InvalidRequest(f"{what}: a tensor must start with chunk 0, got chunk {chunk.chunk_index}")
        if chunk.dtype not in DTYPES:
            raise InvalidRequest(f"{what}: dtype {chunk.dtype!r} is not allowed (allowed: {sorted(DTYPES)})")
        shape = tuple(chunk.shape)
        if len(shape) > cfg.max_rank:
            raise InvalidRequest(f"{what}: rank {len(shape)} exceeds max_rank {cfg.max_rank}")
        if any(dim < 0 for dim in shape):
            raise InvalidRequest(f"{what}: negative dimension in shape {list(shape)}")
        # Python ints: a hostile shape cannot overflow this product.
        decoded_bytes = math.prod(shape) * DTYPES[chunk.dtype].itemsize
        if decoded_bytes > cfg.max_decoded_bytes:
            raise InvalidRequest(
                f"{what}: shape {list(shape)} of {chunk.dtype} is {decoded_bytes} bytes decoded, "
                f"over max_decoded_bytes {cfg.max_decoded_bytes}"
            )
        total = chunk.total_bytes
        if total > cfg.max_tensor_bytes:
            raise InvalidRequest(
                f"{what}: declared total_bytes {total} exceeds max_tensor_bytes {cfg.max_tensor_bytes}"
            )
        _get_codec(chunk.codec, self._lookup, what)  # unknown codec: fail before taking bytes
        if chunk.num_chunks < 1:
            raise InvalidRequest(f"{what}: num_chunks must be at least 1, got {chunk.num_chunks}")
        size = len(chunk.data)
        if size > cfg.max_message_bytes:
            raise InvalidRequest(f"{what}: chunk 0 carries {size} bytes, over max_message_bytes {cfg.max_message_bytes}")
        if chunk.num_chunks == 1:
            if size != total:
                raise InvalidRequest(f"{what}: single chunk carries {size} bytes but total_bytes is {total}")
        else:
            if size < cfg.min_chunk_bytes:
                raise InvalidRequest(
                    f"{what}: chunk size {size} bytes is under min_chunk_bytes {cfg.min_chunk_bytes} "
                    f"for a tensor of {chunk.num_chunks} chunks"
                )
            expected = math.ceil(total / size)
            if chunk.num_chunks != expected:
                raise InvalidRequest(
                    f"{what}: num_chunks {chunk.num_chunks} does not fit total_bytes {total} in chunks "
                    f"of {size} bytes (expected {expected})"
                )
        if self._check is not None:
            self._check(chunk)
        if self._hold is not None:
            self._hold(total + decoded_bytes)
        self._first = chunk
        self._header = self._header_of(chunk)
        self._chunk_size = size

    def _continue(self, chunk: common_pb2.Tensor) -> None:
        first = self._first
        assert first is not None
        what = _describe(first.name)
        expected_index = len(self._parts)
        if chunk.chunk_index != expected_index:
            raise InvalidRequest(
                f"{what}: expected chunk {expected_index} of {first.num_chunks}, got chunk {chunk.chunk_index}"
            )
        if self._header_of(chunk) != self._header:
            raise InvalidRequest(f"{what}: chunk {chunk.chunk_index} header differs from chunk 0's")
        size = len(chunk.data)
        is_last = chunk.chunk_index + 1 == first.num_chunks
        remaining = first.total_bytes - self._received
        expected_size = remaining if is_last else self._chunk_size
        if size != expected_size:
            raise InvalidRequest(
                f"{what}: chunk {chunk.chunk_index} of {first.num_chunks} carries {size} bytes, expected {expected_size}"
            )


def chunks_to_tensor(
    chunks: Iterable[common_pb2.Tensor],
    *,
    seed: int | None = None,
    config: FramingConfig = DEFAULT_FRAMING,
    lookup: CodecLookup | None = None,
) -> torch.Tensor:
    """Reassemble and decode exactly one tensor from its chunks."""
    assembler = TensorAssembler(config, lookup=lookup)
    result: EncodedTensor | None = None
    for chunk in chunks:
        if result is not None:
            raise InvalidRequest(f"{_describe(chunk.name)}: chunk after the end of {_describe(result.name)}")
        result = assembler.feed(chunk)
    assembler.close()
    if result is None:
        raise InvalidRequest("no tensor chunks received")
    return result.decode(seed=seed, lookup=lookup)


async def stream_tensors(call, requests: list, timeout: float, received: list | None = None,
                         raw: list | None = None) -> list:
    """Send `requests` on a bidi stream, collect the reply tensors (decoded), in order;
    `received`, if given, gets (name, encoded size in bytes) of each reply tensor, and `raw`
    (EncodedTensor, the node's AnswerSignature on it or None)."""
    assembler = TensorAssembler()
    out = []

    async def gen():
        for r in requests:
            yield r

    async def run():
        async for reply in call(gen()):
            encoded = assembler.feed(reply.tensor)
            if encoded is not None:
                if received is not None:
                    received.append((encoded.name, len(encoded.payload)))
                if raw is not None:
                    raw.append((encoded, reply.signature if reply.HasField("signature") else None))
                out.append(await asyncio.to_thread(encoded.decode))

    await asyncio.wait_for(run(), timeout)
    return out
