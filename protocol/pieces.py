"""Coordinator requests and replies too large for one gRPC message, in pieces (issue 18).

The coordinator used to take messages of up to 64 MiB (a round's whole state travelled in one
CommitRound), so any caller with the token could make it hold about twice that per
concurrent call before a handler saw a byte: four 60 MiB CommitRounds at once raised its RSS
by 511 MB, and nothing bounded how many. Now it takes 1 MiB + 64 KiB per message, as nodes
do, and what is larger travels in pieces:

- a request (CommitRound with a state, ReportLiar with a session's evidence) is serialized and
  split into `Piece`s (`to_pieces`); the server reads the first piece's declared size, holds
  it against a `PieceBudget` (protocol/budget.py: in all, and per caller's host) and only then
  reads on, refusing with RESOURCE_EXHAUSTED what the budget cannot hold (`PieceBudget.request`);
- a reply (GetCommittedState) is a stream of replies, each with the next piece of the state,
  read from its file as it goes (`state_replies`), joined by the caller (`get_committed_state`).

A signed call's signature covers the whole request, as in the unary call: the server checks
it once the pieces are joined.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from google.protobuf.message import DecodeError

from pollinate.protocol.budget import ByteBudget
from pollinate.protocol.channels import COORDINATOR_MAX_MESSAGE_BYTES
from pollinate.protocol.errors import InvalidRequest
from pollinate.protocol.framing import DEFAULT_FRAMING
from pollinate.protocol.v1 import coordinator_pb2

PIECE_BYTES = DEFAULT_FRAMING.max_message_bytes  # 1 MiB: one piece and its fields fit a message
# A caller that declared a size has this long to send it, seconds: its budget is held meanwhile
# (64 MiB over a 10 Mbit/s home uplink is under a minute).
READ_TIMEOUT_S = 300.0


def to_pieces(message) -> Iterator[coordinator_pb2.Piece]:
    """`message`, serialized as a signature covers it, in pieces of at most PIECE_BYTES."""
    data = message.SerializeToString(deterministic=True)
    for offset in range(0, max(len(data), 1), PIECE_BYTES):
        yield coordinator_pb2.Piece(total_bytes=len(data) if offset == 0 else 0,
                                    data=data[offset:offset + PIECE_BYTES])


class PieceBudget(ByteBudget):
    """The bytes of requests in pieces the server holds at once (protocol/budget.py)."""

    @contextlib.asynccontextmanager
    async def request(self, pieces: AsyncIterator[coordinator_pb2.Piece], cls, *, host: str, max_bytes: int,
                      what: str):
        """The `cls` message the pieces carry, its declared size held (twice: the bytes and the
        parsed message) until the block ends. InvalidRequest: a size over `max_bytes`, pieces
        that do not add up to it or do not parse; ResourceExhausted: over the budget."""
        it = aiter(pieces)
        first = await anext(it, None)
        if first is None:
            raise InvalidRequest(f"{what}: no pieces")
        total = first.total_bytes
        if not 0 < total <= max_bytes:
            raise InvalidRequest(f"{what}: the first piece declares {total} bytes, want 1 to {max_bytes}")
        # one piece costs what a unary message does (gRPC bounds those): only more is held
        with self.hold(host, 2 * total if total > PIECE_BYTES else 0, what):
            data = bytearray()
            piece = first
            async with asyncio.timeout(READ_TIMEOUT_S):
                while piece is not None:
                    if piece is not first and piece.total_bytes:
                        raise InvalidRequest(f"{what}: only the first piece declares a size")
                    if len(data) + len(piece.data) > total:
                        raise InvalidRequest(f"{what}: the pieces carry more than the {total} bytes declared")
                    data += piece.data
                    piece = await anext(it, None)
            if len(data) != total:
                raise InvalidRequest(f"{what}: the pieces end after {len(data)} of the {total} bytes declared")
            try:
                message = cls.FromString(memoryview(data))
            except DecodeError:
                raise InvalidRequest(f"{what}: the pieces are not a {cls.__name__}") from None
            del data
            yield message


async def state_replies(round_index: int, checksum: str, path: Path) -> AsyncIterator:
    """GetCommittedStateInPieces' replies: the state file at `path` in pieces, read as they go."""
    size = path.stat().st_size
    with path.open("rb") as f:  # a file pruned meanwhile stays readable while open
        offset = 0
        while True:
            data = await asyncio.to_thread(f.read, PIECE_BYTES)
            if offset == 0:
                yield coordinator_pb2.GetCommittedStateReply(round=round_index, checksum=checksum, state=data,
                                                             state_bytes=size)
            elif data:
                yield coordinator_pb2.GetCommittedStateReply(state=data)
            offset += len(data)
            if not data or offset >= size:
                return


async def get_committed_state(stub, request: coordinator_pb2.GetCommittedStateRequest, *,
                              timeout_s: float) -> coordinator_pb2.GetCommittedStateReply:
    """GetCommittedStateInPieces on `stub` (a CoordinatorStub), its replies joined into one
    GetCommittedStateReply; InvalidRequest where they do not add up to the size the first
    declares (at most the coordinator's COORDINATOR_MAX_MESSAGE_BYTES)."""
    max_bytes = COORDINATOR_MAX_MESSAGE_BYTES
    head, parts, size = None, [], 0
    async for reply in stub.GetCommittedStateInPieces(request, timeout=timeout_s):
        if head is None:
            head = reply
            if reply.state_bytes > max_bytes:
                raise InvalidRequest(f"GetCommittedState: a state of {reply.state_bytes} bytes, over {max_bytes}")
        size += len(reply.state)
        if size > head.state_bytes:
            raise InvalidRequest(f"GetCommittedState: more than the {head.state_bytes} bytes declared")
        parts.append(reply.state)
    if head is None or size != head.state_bytes:
        raise InvalidRequest(f"GetCommittedState: the pieces end after {size} of "
                             f"{head.state_bytes if head is not None else '?'} bytes declared")
    return coordinator_pb2.GetCommittedStateReply(round=head.round, checksum=head.checksum, state=b"".join(parts),
                                                  state_bytes=size)
