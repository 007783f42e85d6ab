"""The node's serving domain: a loaded span, its inference sessions, and one torch worker.

Plain async functions (`forward`, `open_session`, `step`) that the gRPC servicer
(node/servicer.py) calls after decoding and whose results it encodes. Torch work runs on one
thread (node/batching.py), so the event loop never blocks: inference steps go first, and
concurrent sessions' steps share passes of the span (node/packed_forward.py), each session
with its own KV cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import torch

from pollinate.node.batching import TorchWorker
from pollinate.node.config import ServingConfig
from pollinate.node.handoff import kept_input
from pollinate.node.packed_forward import PackedStep, forward_packed, packable
from pollinate.node.sessions import Session, SessionConfig, SessionManager
from pollinate.node.span import SpanError
from pollinate.protocol.errors import InvalidRequest, SpanMoved
from pollinate.protocol.tensors import DTYPES, HIDDEN_STATES

logger = logging.getLogger(__name__)


class SpanServer:
    """Serves blocks [span.start, span.end) of one model."""

    def __init__(
        self,
        span,
        *,
        model_id: str,
        num_blocks: int,
        hidden_size: int,
        serving: ServingConfig,
        sessions: SessionConfig,
    ):
        self.span = span
        self.model_id = model_id
        self.num_blocks = num_blocks
        self.hidden_size = hidden_size
        self.start, self.end = span.start, span.end
        self.serving = serving
        self.sessions = SessionManager(sessions)
        self.worker = TorchWorker(serving.batching, run_steps=self._steps_sync, expected_sessions=self._active_sessions)
        self._sweeper: asyncio.Task | None = None
        self.compute_dtype: torch.dtype = span.dtype

    def to_span(self, hidden: torch.Tensor) -> torch.Tensor:
        """A decoded request tensor (CPU, wire dtype) on the span's device in its dtype; the
        answer goes back with ``.to(hidden.device, hidden.dtype)``."""
        return hidden.to(self.span.device, self.compute_dtype)

    async def start_sweeper(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_idle())

    async def shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.worker.stop()

    async def _sweep_idle(self) -> None:
        while True:
            await asyncio.sleep(self.serving.sweep_interval_s)
            self.sessions.expire_idle()

    async def run_torch(self, fn, *args):
        """``fn(*args)`` on the span's one torch thread: every forward, backward, optimizer step
        and round computation of this node runs there, one after another, so none of them races
        another on the span's or an adapter's tensors and the event loop never blocks. Pending
        inference steps run first (node/batching.py)."""
        return await self.worker.run(fn, *args)

    # ---- checks shared by Forward and Inference

    def check_blocks(self, start: int, end: int) -> tuple[int, int]:
        """A request's block range; (0, 0) means the whole span. Only the whole span is served."""
        if (start, end) == (0, 0):
            return self.start, self.end
        if (start, end) != (self.start, self.end):
            # Not the client's fault: its route came from a record this node has since replaced
            # (it moved), so the client routes those blocks again.
            raise SpanMoved(
                f"this node serves blocks {self.start}:{self.end}, the request asked for {start}:{end}"
            )
        return start, end

    def check_hidden(self, hidden: torch.Tensor) -> None:
        self._check_hidden_shape(list(hidden.shape), hidden.dtype)

    def check_activation(self, chunk, names: tuple[str, ...] = ("", HIDDEN_STATES)) -> None:
        """A TensorAssembler check (protocol/tensors.py): an activation's name and the shape
        and dtype check_hidden asks of it, from its first chunk, before its bytes are kept (a
        stream could otherwise hold 512 MiB of a tensor this node then refuses)."""
        if chunk.name not in names:
            raise InvalidRequest(f"unexpected tensor {chunk.name[:100]!r}, want {' or '.join(repr(n) for n in names if n)}")
        self._check_hidden_shape(list(chunk.shape), DTYPES[chunk.dtype])

    def _check_hidden_shape(self, shape: list[int], dtype: torch.dtype) -> None:
        if len(shape) != 3:
            raise InvalidRequest(f"hidden_states must be [batch, seq, hidden], got shape {shape}")
        if shape[-1] != self.hidden_size:
            raise InvalidRequest(f"hidden_states have hidden size {shape[-1]}, this model's is {self.hidden_size}")
        tokens = shape[0] * shape[1]
        if tokens == 0:
            raise InvalidRequest(f"hidden_states are empty: shape {shape}")
        if tokens > self.serving.max_step_tokens:
            raise InvalidRequest(
                f"hidden_states carry {tokens} tokens, over this node's per-request limit "
                f"{self.serving.max_step_tokens}"
            )
        if not dtype.is_floating_point:
            raise InvalidRequest(f"hidden_states must be floating point, got {dtype}")

    # ---- Forward: no cache

    async def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.check_hidden(hidden)
        return await self.run_torch(self._forward_sync, hidden)

    def _forward_sync(self, hidden: torch.Tensor) -> torch.Tensor:
        try:
            with torch.inference_mode():
                out = self.span.forward(self.to_span(hidden))
        except SpanError as e:
            raise InvalidRequest(str(e)) from e
        return out.to(hidden.device, hidden.dtype)

    # ---- Inference: sessions with a KV cache

    def open_session(self, session_id: str, *, max_length: int, batch_size: int, peer: str = "") -> Session:
        limit = self.span.config.max_position_embeddings
        if max_length > limit:
            raise InvalidRequest(f"session {session_id}: max_length {max_length} exceeds the model's context {limit}")
        return self.sessions.open(
            session_id, max_length=max_length, batch_size=batch_size, start=self.start, end=self.end, peer=peer
        )

    async def step(self, session: Session, hidden: torch.Tensor, position: int, *, scope=None) -> torch.Tensor:
        """One step of `session`; `scope()`, if given, is a context manager entered around the
        span's forward on the torch thread (a job's adapter: JobManager.scope)."""
        self.check_hidden(hidden)
        session.check_step(position, hidden.shape[1], hidden.shape[0])
        session.last_used = time.monotonic()
        alone = scope is not None or packable(self.span, session.cache, hidden.shape[0]) is not None
        out = await self.worker.step((session, hidden, position, scope), tokens=hidden.shape[1], packable=not alone)
        session.position = position + hidden.shape[1]
        session.last_used = time.monotonic()
        if session.inputs is not None:  # kept for a recompute handoff (node/handoff.py)
            # as received: the values the client sent, which a resumed session's signed
            # transcript commits to (protocol/answers.py prefix_of)
            session.inputs.append(kept_input(hidden))
        return out

    def _step_sync(self, session: Session, hidden: torch.Tensor, position: int, scope=None) -> torch.Tensor:
        try:
            with torch.inference_mode(), (scope() if scope is not None else contextlib.nullcontext()):
                self._cache_of(session)
                position_ids = torch.arange(position, position + hidden.shape[1]).unsqueeze(0)
                out = self.span.forward(self.to_span(hidden), position_ids, cache=session.cache)
        except SpanError as e:
            raise InvalidRequest(f"session {session.session_id}: {e}") from e
        return out.to(hidden.device, hidden.dtype)

    def _active_sessions(self) -> int:
        """Sessions whose next step may be on its way: those that stepped in the last active_s."""
        return self.sessions.active(time.monotonic() - self.serving.batching.active_s)

    def _steps_sync(self, steps: list[tuple]) -> list:
        """A pass of (session, hidden, position, scope) steps on the torch thread: per step its
        output or the error it raised. Several steps run packed; if the pack is refused (a
        step's check failed before anything ran), each runs alone so only the bad one fails."""
        if len(steps) > 1:
            try:
                with torch.inference_mode():
                    packed = [PackedStep(cache=self._cache_of(session), hidden=self.to_span(hidden),
                                         position_ids=torch.arange(position, position + hidden.shape[1]).unsqueeze(0))
                              for session, hidden, position, _ in steps]
                    outs = forward_packed(self.span, packed)
                return [out.to(hidden.device, hidden.dtype) for out, (_, hidden, _, _) in zip(outs, steps)]
            except SpanError:
                pass
        results = []
        for step in steps:
            try:
                results.append(self._step_sync(*step))
            except Exception as e:
                results.append(e)
        return results

    def _cache_of(self, session: Session):
        if session.cache is None:
            session.cache = self.span.new_cache(session.batch_size, session.max_length)
        return session.cache

    def close_session(self, session_id: str) -> None:
        self.sessions.close(session_id)

