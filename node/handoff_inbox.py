"""The receiving side of a session handoff (issue 16): sessions other replicas hand to this node.

node/handoff.py is the sender's side and the shared pieces (config, cache snapshots, kept
span inputs). Here a HandOff is checked as a stranger's input (the header against this
span and its limits, the payload's size before it is read, every shape against the
session's position), the session is rebuilt (a KV frame restored, or span inputs
prefilled through the node's step queue, as a replay's step), held for its client for
`hold_s` seconds, and given only to the holder of the resume secret. A follow-up
(`from_position` > 0, a recompute pre-copy's last steps) extends only a session held here
unclaimed from the same sender.
"""

from __future__ import annotations

import asyncio
import hmac
import logging

import torch

from pollinate.compression.codec import CompressionError
from pollinate.compression.kv_codec import decode_inputs, decode_kv, frame_kind
from pollinate.node.handoff import (
    DIGEST_BYTES,
    SECRET_MAX_BYTES,
    HandoffConfig,
    digest_of,
    expected_shape,
    restore_cache,
)
from pollinate.protocol.errors import (
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)

logger = logging.getLogger(__name__)


class HandoffInbox:
    """Sessions handed to this node, waiting for their clients."""

    def __init__(self, config: HandoffConfig) -> None:
        self.config = config
        self._waiting: dict[str, tuple[bytes, str]] = {}  # session id -> (resume digest, job)
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def check_header(self, server, header) -> int:
        """Validate a HandOff header against `server`; returns the most payload bytes to accept."""
        server.check_blocks(header.blocks.start, header.blocks.end)
        sid = header.session_id
        if not sid or len(sid) > 128 or not sid.isprintable():
            raise InvalidRequest("handoff: session_id must be 1-128 printable characters")
        if len(header.resume_digest) != DIGEST_BYTES:
            raise InvalidRequest(f"handoff of {sid}: resume_digest must be {DIGEST_BYTES} bytes (SHA-256)")
        if header.from_position:
            return self._check_follow_up(server, header)
        limit = min(server.span.config.max_position_embeddings, server.sessions.config.max_session_tokens)
        if not 0 < header.max_length <= limit:
            raise InvalidRequest(f"handoff of {sid}: max_length {header.max_length} outside [1, {limit}]")
        if not 0 < header.position <= header.max_length:
            raise InvalidRequest(f"handoff of {sid}: position {header.position} outside [1, {header.max_length}]")
        if not 0 < header.batch_size <= server.sessions.config.budget_tokens // header.max_length:
            raise InvalidRequest(f"handoff of {sid}: batch size {header.batch_size} does not fit this node's budget")
        need = header.max_length * header.batch_size
        if need > server.sessions.tokens_left:  # before its bytes are read (receive() reserves them)
            raise ResourceExhausted(f"handoff of {sid} needs {need} cache tokens, this node has "
                                    f"{server.sessions.tokens_left} left")
        # fp32 at most (a frame carries fp32, fp16 or bf16 whatever this span computes in or
        # the wire carried): the larger of the cache and the span inputs (inputs are the larger
        # on spans of one or two blocks)
        raw = max(self.max_elements(server, header), self.max_input_elements(server, header)) * 4
        # zstd never expands by more than a few bytes per 128 KiB block; the frame header is
        # 12 + 32 bytes per layer
        bound = raw + raw // 1024 + 64 * server.span.num_blocks + 4096
        if not 0 < header.payload_bytes <= bound:
            raise InvalidRequest(f"handoff of {sid}: {header.payload_bytes} payload bytes, at most {bound} "
                                 f"for {header.position} tokens of blocks {server.start}:{server.end}")
        return header.payload_bytes

    def _held(self, server, header):
        """The unclaimed session a follow-up HandOff names, from the same sender (same digest, job)."""
        sid = header.session_id
        waiting = self._waiting.get(sid)
        if waiting is None or not hmac.compare_digest(waiting[0], bytes(header.resume_digest)) \
                or waiting[1] != header.job:
            raise NotFound(f"handoff of {sid} from position {header.from_position}: no such session waits here")
        return server.sessions.get(sid)

    def _check_follow_up(self, server, header) -> int:
        session = self._held(server, header)
        sid = header.session_id
        if header.from_position != session.position:
            raise FailedPrecondition(f"handoff of {sid}: follow-up from position {header.from_position}, "
                                     f"the session held here is at {session.position}")
        if not header.from_position < header.position <= session.max_length:
            raise InvalidRequest(f"handoff of {sid}: follow-up to position {header.position}, want "
                                 f"({header.from_position}, {session.max_length}]")
        if (header.max_length, header.batch_size) != (session.max_length, session.batch_size):
            raise InvalidRequest(f"handoff of {sid}: follow-up for max_length {header.max_length}, batch "
                                 f"{header.batch_size}; the session held here has {session.max_length}, "
                                 f"{session.batch_size}")
        raw = session.batch_size * (header.position - header.from_position) * server.hidden_size * 4
        bound = raw + raw // 1024 + 4096
        if not 0 < header.payload_bytes <= bound:
            raise InvalidRequest(f"handoff of {sid}: {header.payload_bytes} payload bytes, at most {bound} "
                                 f"for tokens {header.from_position}:{header.position}")
        return header.payload_bytes

    @staticmethod
    def max_elements(server, header) -> int:
        b, h, s, d = expected_shape(server.span, header.batch_size, header.position)
        return 2 * server.span.num_blocks * b * h * s * d

    @staticmethod
    def max_input_elements(server, header) -> int:
        return header.batch_size * header.position * server.hidden_size

    async def receive(self, server, header, payload: bytes, *, scope=None, peer: str = "") -> None:
        """Decode, check, rebuild and hold the session (its cache counted against the sending
        peer's share, node/sessions.py); raises (changing nothing) when anything is wrong.
        `scope` is the session's job adapter scope (JobManager.scope) for a recompute."""
        sid = header.session_id
        if header.from_position:
            return await self._follow_up(server, header, payload, scope)
        try:
            kind = frame_kind(payload)
            if kind == "inputs":
                inputs = await asyncio.to_thread(decode_inputs, payload,
                                                 max_elements=self.max_input_elements(server, header))
                want = (header.batch_size, header.position, server.hidden_size)
                if tuple(inputs.shape) != want:
                    raise InvalidRequest(f"handoff of {sid}: span inputs {list(inputs.shape)}, want {list(want)}")
                mode = "recompute"
            else:
                decoded = await asyncio.to_thread(decode_kv, payload, max_elements=self.max_elements(server, header))
                mode = decoded.mode
        except CompressionError as e:
            raise InvalidRequest(f"handoff of {sid}: {e}") from e
        session = server.open_session(sid, max_length=header.max_length, batch_size=header.batch_size, peer=peer)
        try:
            if kind == "inputs":
                await self._prefill(server, session, inputs, scope)
                session.handed_inputs = [inputs]
            else:
                session.cache = await server.run_torch(
                    lambda: restore_cache(server.span, decoded.layers, batch_size=header.batch_size,
                                          max_length=header.max_length, position=header.position))
                session.position = header.position
        except BaseException:
            server.close_session(sid)
            raise
        session.resume_digest = bytes(header.resume_digest)
        session.job = header.job
        self._waiting[sid] = (session.resume_digest, header.job)
        self._timers[sid] = asyncio.get_running_loop().call_later(self.config.hold_s, self._expire, server, sid)
        logger.info("session %s handed to this node at position %d (%s codec, %d bytes), held %.0f s",
                    sid, header.position, mode, len(payload), self.config.hold_s)

    async def _follow_up(self, server, header, payload: bytes, scope) -> None:
        """The inputs of the steps a pre-copied session ran on the sender meanwhile: run them on
        the held session. Anything wrong frees the held session (its client replays)."""
        sid = header.session_id
        session = self._held(server, header)
        if header.from_position != session.position:
            raise FailedPrecondition(f"handoff of {sid}: follow-up from position {header.from_position}, "
                                     f"the session held here is at {session.position}")
        try:
            try:
                inputs = await asyncio.to_thread(
                    decode_inputs, payload,
                    max_elements=session.batch_size * (header.position - header.from_position) * server.hidden_size)
            except CompressionError as e:
                raise InvalidRequest(f"handoff of {sid}: {e}") from e
            want = (session.batch_size, header.position - header.from_position, server.hidden_size)
            if tuple(inputs.shape) != want:
                raise InvalidRequest(f"handoff of {sid}: span inputs {list(inputs.shape)}, want {list(want)}")
            await self._prefill(server, session, inputs, scope, start=header.from_position)
            session.handed_inputs.append(inputs)
        except BaseException:
            self._forget(server, sid)
            raise
        logger.info("session %s caught up from position %d to %d (%d bytes)", sid, header.from_position,
                    header.position, len(payload))

    def _forget(self, server, sid: str) -> None:
        if self._waiting.pop(sid, None) is not None:
            self._timers.pop(sid).cancel()
            server.close_session(sid)

    async def _prefill(self, server, session, inputs: torch.Tensor, scope, *, start: int = 0) -> None:
        """Rebuild `session`'s cache from its span inputs (tokens from `start` on): the steps a
        replay would run (at most max_step_tokens each), through the node's step queue. The
        session keeps the inputs for a recompute handoff of its own when this node does those."""
        if self.config.recompute and start == 0:
            session.inputs = []
        chunk = max(1, server.serving.max_step_tokens // inputs.shape[0])
        for at in range(0, inputs.shape[1], chunk):
            await server.step(session, inputs[:, at:at + chunk], start + at, scope=scope)

    def _expire(self, server, sid: str) -> None:
        if self._waiting.pop(sid, None) is not None:
            self._timers.pop(sid, None)
            logger.info("handed-off session %s was not resumed within %.0f s: closed", sid, self.config.hold_s)
            server.close_session(sid)

    def claim(self, server, session_id: str, secret: bytes, job: str):
        """The held session `session_id` for the client that proves it owns it."""
        waiting = self._waiting.get(session_id)
        if waiting is None:
            raise NotFound(f"no handed-off session {session_id} waits here")
        digest, held_job = waiting
        if not 0 < len(secret) <= SECRET_MAX_BYTES or not hmac.compare_digest(digest_of(secret), digest):
            raise Unauthenticated(f"session {session_id}: the resume secret does not match")
        if job != held_job:
            raise InvalidRequest(f"session {session_id} was handed off with job {held_job!r}, not {job!r}")
        del self._waiting[session_id]
        self._timers.pop(session_id).cancel()
        session = server.sessions.get(session_id)
        logger.info("session %s resumed at position %d", session_id, session.position)
        return session
