"""Inference sessions on a node: who holds how much KV cache, and for how long.

Budget accounting is in tokens: a session reserves its declared `max_length` (times its
batch size) for its whole life, so a step never fails halfway for lack of memory; a new
session that would push the total past the node's budget is refused with
ResourceExhausted, which tells the client to go to another replica. Sessions idle for longer
than the configured timeout are expired (their reservation returns to the pool).

Per peer (issue 18, item 5): the sessions one peer holds reserve at most ``peer_share`` of the
budget, so one caller holding many streams cannot take the whole cache. A peer is the
caller's IP as gRPC saw it: weak against Sybils (one attacker with many addresses gets a
share per address), and every caller behind one address (a NAT, this machine's loopback, a
relay's local daemon) shares one share.

Plain domain code, no gRPC: the server maps the errors raised here to status codes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pollinate.protocol.errors import FailedPrecondition, InvalidRequest, NotFound, ResourceExhausted, one_line

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SessionConfig:
    # KV-cache budget of the node, in tokens summed over open sessions (x batch size).
    # 8192 tokens of a 30-block SmolLM2 span in fp32 is ~0.9 GB; lower it on small hosts.
    budget_tokens: int = 8192
    # Longest a single session may declare, tokens; 2048 is SmolLM2's context length.
    max_session_tokens: int = 8192
    # A session with no step for this many seconds is closed and its cache freed.
    idle_timeout_s: float = 300.0
    # Most of budget_tokens the sessions of one peer (the caller's IP) may reserve, a fraction
    # in (0, 1]; 0.5: a greedy peer leaves at least half of the cache to the others (issue 18).
    peer_share: float = 0.5

    def __post_init__(self) -> None:
        if self.budget_tokens <= 0:
            raise ValueError(f"budget_tokens must be > 0, got {self.budget_tokens}")
        if self.max_session_tokens <= 0:
            raise ValueError(f"max_session_tokens must be > 0, got {self.max_session_tokens}")
        if not self.idle_timeout_s > 0:
            raise ValueError(f"idle_timeout_s must be > 0, got {self.idle_timeout_s}")
        if not 0 < self.peer_share <= 1:
            raise ValueError(f"peer_share must be in (0, 1], got {self.peer_share}")

    @property
    def peer_tokens(self) -> int:
        """The most cache tokens one peer's sessions may reserve."""
        return int(self.budget_tokens * self.peer_share)


@dataclass(kw_only=True)
class Session:
    session_id: str
    max_length: int  # tokens the session declared it will ever hold
    batch_size: int  # fixed by the first step
    start: int  # first block this session runs
    end: int  # one past its last block
    peer: str = ""  # the caller's IP (its sessions share peer_share of the budget); "": in-process
    position: int = 0  # tokens processed so far == position of the next step's first token
    cache: Any = None  # the span's KV cache object for this session
    last_used: float = field(default_factory=time.monotonic)
    # Session handoff (node/handoff.py): SHA-256 of the client's resume secret (b"": the
    # client allows none), the job its stream names, and the state its stream and a sender share.
    resume_digest: bytes = b""
    job: str = ""
    handoff: Any = None
    # The span inputs of every step so far, as received (node/handoff.py kept_input), for a
    # recompute handoff; None: not kept (the client allows no handoff, or the node sends
    # caches). At most position x batch tokens: the session's reservation bounds them too.
    inputs: list | None = None
    # A session handed to this node by recompute (node/handoff_inbox.py): the span inputs it
    # was prefilled with, in order, until its client resumes it; the resumed call's signed
    # transcript starts from them (protocol/answers.py prefix_of). None: not such a session.
    handed_inputs: list | None = None

    @property
    def reserved_tokens(self) -> int:
        return self.max_length * self.batch_size

    def check_step(self, position: int, num_tokens: int, batch_size: int) -> None:
        """Raise unless a step of `num_tokens` tokens at `position` may run now."""
        if position != self.position:
            raise FailedPrecondition(
                f"session {self.session_id}: step position {position} does not follow the "
                f"{self.position} tokens already processed"
            )
        if batch_size != self.batch_size:
            raise InvalidRequest(
                f"session {self.session_id}: batch size {batch_size} differs from the "
                f"session's {self.batch_size}"
            )
        if num_tokens <= 0:
            raise InvalidRequest(f"session {self.session_id}: a step needs at least one token")
        if self.position + num_tokens > self.max_length:
            raise InvalidRequest(
                f"session {self.session_id}: {self.position} + {num_tokens} tokens exceed the "
                f"declared max_length {self.max_length}"
            )


class SessionManager:
    """The node's open sessions and its KV-cache token budget."""

    def __init__(self, config: SessionConfig):
        self.config = config
        self._sessions: dict[str, Session] = {}

    @property
    def reserved_tokens(self) -> int:
        return sum(s.reserved_tokens for s in self._sessions.values())

    @property
    def tokens_left(self) -> int:
        return self.config.budget_tokens - self.reserved_tokens

    def __len__(self) -> int:
        return len(self._sessions)

    def all(self) -> list[Session]:
        """The open sessions, a snapshot (the caller may open or close sessions meanwhile)."""
        return list(self._sessions.values())

    def peer_reserved(self, peer: str) -> int:
        return sum(s.reserved_tokens for s in self._sessions.values() if s.peer == peer)

    def open(self, session_id: str, *, max_length: int, batch_size: int, start: int, end: int,
             peer: str = "") -> Session:
        if not session_id:
            raise InvalidRequest("session_id is empty")
        if session_id in self._sessions:
            raise FailedPrecondition(f"session {session_id} is already open on this node")
        if max_length <= 0:
            raise InvalidRequest(f"session {session_id}: max_length must be > 0, got {max_length}")
        if max_length > self.config.max_session_tokens:
            raise InvalidRequest(
                f"session {session_id}: max_length {max_length} exceeds this node's limit "
                f"{self.config.max_session_tokens}"
            )
        self.expire_idle()
        need = max_length * batch_size
        if need > self.tokens_left:
            raise ResourceExhausted(
                f"session {session_id} needs {need} cache tokens, node has {self.tokens_left} "
                f"of {self.config.budget_tokens} left"
            )
        held = self.peer_reserved(peer) if peer else 0
        if peer and held + need > self.config.peer_tokens:
            raise ResourceExhausted(
                f"session {session_id} needs {need} cache tokens; its peer {one_line(peer, 64)} already holds "
                f"{held} of the {self.config.peer_tokens} one peer may hold on this node "
                f"({self.config.peer_share:g} of {self.config.budget_tokens})"
            )
        s = Session(session_id=session_id, max_length=max_length, batch_size=batch_size, start=start, end=end,
                    peer=peer)
        self._sessions[session_id] = s
        logger.info(
            "session %s opened for blocks %d:%d, %d tokens reserved, %d left",
            session_id, start, end, need, self.tokens_left,
        )
        return s

    def active(self, since: float) -> int:
        """Open sessions that stepped (sent or finished a step) at or after `since` (monotonic)."""
        return sum(1 for s in self._sessions.values() if s.last_used >= since)

    def get(self, session_id: str) -> Session:
        s = self._sessions.get(session_id)
        if s is None:
            raise NotFound(f"unknown session {session_id} (closed or expired)")
        return s

    def close(self, session_id: str) -> None:
        s = self._sessions.pop(session_id, None)
        if s is not None:
            s.cache = None
            logger.info("session %s closed after %d tokens, %d tokens left", session_id, s.position, self.tokens_left)

    def expire_idle(self, now: float | None = None) -> list[str]:
        """Close sessions idle past the timeout; returns their ids."""
        now = time.monotonic() if now is None else now
        stale = [sid for sid, s in self._sessions.items() if now - s.last_used > self.config.idle_timeout_s]
        for sid in stale:
            logger.info("session %s expired after %.0f s idle", sid, now - self._sessions[sid].last_used)
            self.close(sid)
        return stale
