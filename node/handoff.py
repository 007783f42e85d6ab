"""Session handoff (issue 16): a leaving node moves its sessions' KV caches to a replica.

When a node leaves gracefully (SIGTERM) or the coordinator moves it to other blocks, every
open session on its span would otherwise be rebuilt by the client replaying its whole
history through a replacement. Instead the node (the sender, `hand_off_sessions`):

1. finds the other nodes serving exactly its blocks on the DHT (`find_replicas`);
2. per session whose client allowed it (its `InferenceOpen.resume_digest` is set), by
   default (`recompute`): sends the session's span inputs so far (the hidden states this
   node received for it, kept at the wire's precision: `kept_input`) to a replica while the
   session keeps running here; the replica rebuilds the cache by the prefill a replay would
   run; then freezes the session between two steps and sends only the inputs of the steps
   it ran meanwhile (`HandOffHeader.from_position`). Otherwise (`--handoff lossless|lossy`,
   or a session that kept no inputs): freezes it, snapshots its cache on the torch thread,
   encodes it (compression/kv_codec.py) and streams it. Each frame goes with the session's
   id, position, budget and resume digest (`Node.HandOff`), to the next replica if one refuses;
3. ends the session's Inference stream with UNAVAILABLE "session handed off: to ADDRESS
   peer ID" (protocol/errors.py SessionHandedOff); the client opens a stream to that
   address with the secret whose SHA-256 is the digest (`resume_secret`), and continues at
   its position. When no replica takes the session the stream goes on until the server
   stops, and the client replays as before.

The receiver (node/handoff_inbox.py `HandoffInbox`) treats a handoff as a stranger's input:
the header is checked against its span (blocks, model context, session limits), the payload's size is bounded
before it is read, the frame's shapes must be exactly what the session's position implies
for this span, and the session's token budget is reserved as for a new session (refused
with RESOURCE_EXHAUSTED when full). A follow-up (from_position > 0) only extends a session
it holds unclaimed from the same sender (same digest and job) at exactly that position;
anything wrong with it frees the held session, whose client then replays. A received
session is held for `hold_s` seconds for its client; only the holder of the secret can
claim it, once, and only while it waits: nobody takes over a live session by guessing its id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass, field

import torch

from pollinate.compression.codec import CompressionError
from pollinate.compression.kv_codec import KVCodecConfig, encode_inputs, encode_kv
from pollinate.protocol.errors import (
    FailedPrecondition,
    InvalidRequest,
    PollinateError,
    SessionHandedOff,
    translate_rpc_errors,
)

logger = logging.getLogger(__name__)

DIGEST_BYTES = 32  # SHA-256
SECRET_MAX_BYTES = 64  # a resume secret is 32 random bytes; anything longer is refused


@dataclass(frozen=True, kw_only=True)
class HandoffConfig:
    # Hand sessions off on SIGTERM and on a move; False: they end and clients replay.
    enabled: bool = True
    # Send each session's span inputs (the hidden states this node received, kept while the
    # session lives) instead of its cache; the receiver rebuilds the cache by one prefill, as a
    # replay would. Exact, and ~0.15-0.3 of the fp16 cache's bytes on a 10-block SmolLM2
    # span (docs/serving.md). A session without kept inputs (one this node itself received
    # as a cache) travels with `codec` instead.
    recompute: bool = True
    # How a cache travels when it does; lossless by default: lossy 8-bit changed greedy tokens on
    # some SmolLM2 prompts (benchmarks/results/2026-12-06-handoff.md).
    codec: KVCodecConfig = field(default_factory=KVCodecConfig)
    # A received session waits this long for its client before its cache is freed, seconds.
    hold_s: float = 60.0
    # Longest one session's handoff to one replica may take (send and its answer), seconds.
    send_timeout_s: float = 30.0
    # Longest the sender waits for a session's step in progress to finish before it snapshots
    # it (a step on a CPU span takes well under a second), seconds.
    quiesce_timeout_s: float = 30.0
    # Longest the DHT lookup of the replicas may take, seconds.
    lookup_timeout_s: float = 10.0
    # Payload bytes per HandOff message (under the transport's 1 MiB + 64 KiB limit).
    chunk_bytes: int = 1 << 20
    # Sessions handed off at once. Recompute: their histories' prefills share the replica's
    # passes and the node leaves after the slowest, not the sum (one SmolLM2 10-block prefill
    # of 512 tokens took 2-3 s on the contended 2-core box); 4 bounds the frames in memory.
    concurrent_sessions: int = 4

    def __post_init__(self) -> None:
        for name in ("hold_s", "send_timeout_s", "quiesce_timeout_s", "lookup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"handoff {name} must be > 0, got {getattr(self, name)}")
        if self.concurrent_sessions < 1:
            raise ValueError(f"handoff concurrent_sessions must be >= 1, got {self.concurrent_sessions}")
        if not 1 <= self.chunk_bytes <= 1 << 20:
            raise ValueError(f"handoff chunk_bytes must be in [1, 2^20], got {self.chunk_bytes}")


def digest_of(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


# ---- the span inputs a session keeps for a recompute handoff


def kept_input(hidden: torch.Tensor) -> torch.Tensor:
    """`hidden` as a session keeps it for a recompute handoff: in the narrowest float dtype that
    holds its values exactly (fp16 for what arrived as fp16 on the wire and was decoded to
    fp32), so keeping costs the wire's bytes, not the compute dtype's."""
    for dtype in (torch.float16, torch.bfloat16):
        if hidden.dtype.itemsize > dtype.itemsize:
            narrow = hidden.to(dtype)
            if torch.equal(narrow.to(hidden.dtype), hidden):
                return narrow
    return hidden


def session_inputs(session) -> torch.Tensor | None:
    """The session's kept span inputs as one [batch, position, hidden] tensor, or None when it
    kept none or they do not add up to its position (then its cache travels instead)."""
    kept = session.inputs
    if not kept or sum(t.shape[1] for t in kept) != session.position:
        return None
    return joined(kept)


def joined(inputs: list[torch.Tensor]) -> torch.Tensor:
    """Kept inputs as one tensor along the tokens, in their common dtype (fp32 where they
    differ: it holds fp16 and bf16 values exactly)."""
    dtypes = {t.dtype for t in inputs}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return torch.cat([t.to(dtype) for t in inputs], dim=1)


# ---- the cache itself


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a SpanCache, as they are; run on the torch thread."""
    layers = []
    for i, layer in enumerate(cache.kv.layers):
        if getattr(layer, "is_sliding", False):
            raise FailedPrecondition(f"layer {i} has a sliding-window cache: handoff supports full attention only")
        if getattr(layer, "keys", None) is None or not isinstance(layer.keys, torch.Tensor):
            raise FailedPrecondition(f"layer {i} of the cache holds nothing")
        layers.append((layer.keys, layer.values))
    return layers


def expected_shape(span, batch_size: int, tokens: int) -> tuple[int, int, int, int]:
    """[batch, kv_heads, tokens, head_dim] of one layer's keys (and values) on `span`."""
    cfg = span.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return (batch_size, cfg.num_key_value_heads, tokens, head_dim)


def restore_cache(span, layers, *, batch_size: int, max_length: int, position: int):
    """A SpanCache of `span` holding `layers` for `position` tokens; InvalidRequest unless every
    tensor has exactly the shape such a cache has on this span. Run on the torch thread."""
    if any(kind != "full_attention" for kind in span.layer_types):
        raise InvalidRequest("handoff supports full-attention spans only")
    if len(layers) != span.num_blocks:
        raise InvalidRequest(f"handoff carries {len(layers)} layers, blocks {span.start}:{span.end} have "
                             f"{span.num_blocks}")
    want = expected_shape(span, batch_size, position)
    for i, (k, v) in enumerate(layers):
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise InvalidRequest(f"handoff layer {i}: keys {list(k.shape)}, values {list(v.shape)}, "
                                 f"want {list(want)}")
    cache = span.new_cache(batch_size, max_length)
    for i, (k, v) in enumerate(layers):
        cache.kv.update(k.to(span.device, span.dtype), v.to(span.device, span.dtype), i)
    cache.length = position
    cache.next_positions = torch.full((batch_size,), position, dtype=torch.long)
    return cache


# ---- the session's side: its stream and the sender meet here


class HandoffState:
    """Attached to a Session (session.handoff) by its Inference stream when the client
    allowed handoff: the sender freezes it, waits until no step runs, and sets `result`
    to the new home's (address, peer id), or to None when no replica took it."""

    def __init__(self) -> None:
        self.frozen = False
        self.frozen_s = 0.0  # how long the sender kept it frozen before it moved
        self.idle = asyncio.Event()
        self.idle.set()
        self.result: asyncio.Future = asyncio.get_running_loop().create_future()

    @contextlib.contextmanager
    def stepping(self):
        self.idle.clear()
        try:
            yield
        finally:
            self.idle.set()

    async def before_step(self, session_id: str) -> None:
        """Return when a step may run here; raise SessionHandedOff when the session has moved."""
        if self.frozen:
            moved = await self.result
            if moved is not None:
                raise handed_off(session_id, *moved)

    async def next_or_moved(self, next_message, session_id: str):
        """The stream's next message (the awaitable `next_message`), unless the session moves first."""
        nxt = asyncio.ensure_future(next_message)
        try:
            await asyncio.wait({nxt, self.result}, return_when=asyncio.FIRST_COMPLETED)
            if nxt.done() or self.result.result() is None:
                return await nxt
        except BaseException:
            nxt.cancel()
            raise
        nxt.cancel()
        raise handed_off(session_id, *self.result.result())


def handed_off(session_id: str, address: str, peer_id: str) -> SessionHandedOff:
    return SessionHandedOff(f"{SessionHandedOff.PREFIX} to {address} peer {peer_id} (session {session_id})")


# ---- sending


async def find_replicas(dht, *, model_id: str, num_blocks: int, start: int, end: int, exclude: str,
                        token: str | None, timeout_s: float) -> list[tuple[str, str]]:
    """(address, peer id) of the online nodes announcing exactly blocks [start, end), fastest
    first; with the swarm `token`, only nodes whose records a token holder wrote (sessions,
    their caches and the token go there)."""
    from pollinate.client.dht_lookup import fetch_peers

    peers = await asyncio.to_thread(fetch_peers, dht, model_id, num_blocks, token=token, timeout_s=timeout_s)
    same = [p for p in peers if (p.start, p.end) == (start, end) and p.state == "online" and p.peer_id != exclude]
    same.sort(key=lambda p: -p.throughput)
    return [(p.address, p.peer_id) for p in same]


@dataclass
class HandoffReport:
    """What hand_off_sessions did, for the log and the benchmark."""

    moved: dict[str, str] = field(default_factory=dict)  # session id -> new address
    failed: dict[str, str] = field(default_factory=dict)  # session id -> why it stays (client replays)
    payload_bytes: int = 0  # compressed bytes sent, all sessions
    fp16_bytes: int = 0  # what the same caches take in fp16
    kinds: dict[str, int] = field(default_factory=dict)  # "recompute" / "lossless" / "lossy" -> sessions
    seconds: float = 0.0
    frozen_s: float = 0.0  # longest a session was frozen (its client waiting on this node), seconds


async def _hand_off_one(server, session, state: HandoffState, replicas, stub, config: HandoffConfig,
                        report: HandoffReport) -> None:
    """Move one session (see hand_off_sessions), recording the outcome in `report`."""
    moved, sent, kind, errors = None, 0, "", []
    try:
        if config.recompute:
            moved, sent = await _pre_copy(server, session, state, replicas, stub, config, errors)
            kind = "recompute"
        if moved is None:
            state.frozen = True
            frozen_at = time.perf_counter()
            await asyncio.wait_for(state.idle.wait(), config.quiesce_timeout_s)
            blob, kind = await session_payload(server, session, config)
            header = _header(server, session, position=session.position, payload_bytes=len(blob))
            moved = await _send_to_first(header, blob, replicas, stub, config, errors)
            sent = len(blob)
            report.frozen_s = max(report.frozen_s, time.perf_counter() - frozen_at)
        else:
            report.frozen_s = max(report.frozen_s, state.frozen_s)
        if moved is None:
            report.failed[session.session_id] = "; ".join(errors) or "no replica of these blocks"
        else:
            report.moved[session.session_id] = moved[0]
            report.payload_bytes += sent
            # the cache as it is, in fp16 (for sliding-window layers: their window)
            cache = session.cache  # None if the client closed it meanwhile
            report.fp16_bytes += cache.nbytes // server.span.dtype.itemsize * 2 if cache is not None else 0
            report.kinds[kind] = report.kinds.get(kind, 0) + 1
    except (PollinateError, CompressionError, asyncio.TimeoutError) as e:
        report.failed[session.session_id] = str(e)
    except Exception as e:  # a leaving node must leave: this session's client replays
        logger.exception("handing off session %s failed unexpectedly", session.session_id)
        report.failed[session.session_id] = f"{type(e).__name__}: {e}"
    finally:
        state.result.set_result(moved)
        if moved is None:
            state.frozen = False


async def hand_off_sessions(server, replicas: list[tuple[str, str]], stub, config: HandoffConfig) -> HandoffReport:
    """Move every open session of `server` (a SpanServer) that allows it to one of `replicas`.
    `stub(address)` gives a Node stub. Never raises for a session: a failure is reported and
    that session's client replays.

    A session that kept its span inputs (`config.recompute`) is pre-copied: its history goes
    to the replica while it keeps running here (the replica's prefill takes as long as a
    replay's), then it is frozen and only the inputs of the steps it ran meanwhile follow, so
    its client waits for a step or two of work, not for the whole prefill. Any other session
    is frozen first and its cache (or inputs) sent whole."""
    report = HandoffReport()
    t0 = time.perf_counter()
    # sessions go concurrently (up to config.concurrent_sessions): with recompute, a replica
    # packs their prefills into shared passes, and the leaving node waits for the slowest,
    # not for their sum
    limit = asyncio.Semaphore(config.concurrent_sessions)

    async def one(session, state: HandoffState) -> None:
        async with limit:
            await _hand_off_one(server, session, state, replicas, stub, config, report)

    await asyncio.gather(*(one(s, s.handoff) for s in server.sessions.all()
                           if getattr(s, "handoff", None) is not None and s.cache is not None
                           and not s.handoff.result.done()))
    report.seconds = time.perf_counter() - t0
    for sid, address in report.moved.items():
        logger.info("session %s handed off to %s", sid, address)
    for sid, why in report.failed.items():
        logger.warning("session %s not handed off (its client replays): %s", sid, why)
    if report.moved:
        logger.info("handed off %d session(s) of blocks %d:%d in %.2f s, %d bytes (%.3f of fp16), codec %s, "
                    "frozen %.3f s at most", len(report.moved), server.start, server.end, report.seconds,
                    report.payload_bytes, report.payload_bytes / max(report.fp16_bytes, 1),
                    "+".join(sorted(report.kinds)), report.frozen_s)
    return report


async def session_payload(server, session, config: HandoffConfig) -> tuple[bytes, str]:
    """(frame, kind) for a frozen session: its span inputs when it kept them and `recompute`
    is on, else its cache through `config.codec`."""
    if config.recompute:
        inputs = session_inputs(session)
        if inputs is not None:
            return await asyncio.to_thread(encode_inputs, inputs, zstd_level=config.codec.zstd_level), "recompute"
    layers = await server.run_torch(cache_layers, session.cache)
    return await asyncio.to_thread(encode_kv, layers, config.codec), config.codec.mode


def _header(server, session, *, position: int, payload_bytes: int, from_position: int = 0):
    from pollinate.protocol.v1 import common_pb2, node_pb2

    return node_pb2.HandOffHeader(
        session_id=session.session_id, blocks=common_pb2.Span(start=server.start, end=server.end),
        max_length=session.max_length, batch_size=session.batch_size, position=position,
        resume_digest=session.resume_digest, job=session.job, payload_bytes=payload_bytes,
        from_position=from_position)


async def _send_to_first(header, blob: bytes, replicas, stub, config: HandoffConfig,
                         errors: list[str]) -> tuple[str, str] | None:
    """Send a session's frame to the first replica that takes it: (address, peer id), or None."""
    for address, peer_id in replicas:
        try:
            await asyncio.wait_for(_send(stub(address), header, blob, config.chunk_bytes, address),
                                   config.send_timeout_s)
        except (PollinateError, asyncio.TimeoutError, OSError) as e:
            errors.append(f"{address}: {e}")
            continue
        return address, peer_id
    return None


async def _pre_copy(server, session, state: HandoffState, replicas, stub, config: HandoffConfig,
                    errors: list[str]) -> tuple[tuple[str, str] | None, int]:
    """Recompute handoff with the session running: ((address, peer id), bytes sent) once the
    replica holds it at its current position and the session is frozen; (None, 0) when it kept
    no inputs or no replica took them (the caller then freezes it and sends it whole)."""
    kept = len(session.inputs or ())
    first = session.position  # read with `kept` between two awaits: they agree
    inputs = session_inputs(session)
    if inputs is None:
        return None, 0
    try:
        blob = await asyncio.to_thread(encode_inputs, inputs, zstd_level=config.codec.zstd_level)
    except CompressionError as e:
        errors.append(f"span inputs: {e}")
        return None, 0
    header = _header(server, session, position=first, payload_bytes=len(blob))
    taken = await _send_to_first(header, blob, replicas, stub, config, errors)
    if taken is None:
        return None, 0
    address, peer_id = taken
    # the replica holds the history: freeze, and send what the session computed meanwhile
    state.frozen = True
    frozen_at = time.perf_counter()
    await asyncio.wait_for(state.idle.wait(), config.quiesce_timeout_s)
    sent = len(blob)
    if session.position > first:
        rest = session.inputs[kept:]
        if sum(t.shape[1] for t in rest) != session.position - first:
            errors.append(f"{address}: the inputs kept since position {first} do not add up")
            return None, 0
        delta = await asyncio.to_thread(encode_inputs, joined(rest), zstd_level=config.codec.zstd_level)
        header = _header(server, session, position=session.position, payload_bytes=len(delta), from_position=first)
        try:
            await asyncio.wait_for(_send(stub(address), header, delta, config.chunk_bytes, address),
                                   config.send_timeout_s)
        except (PollinateError, asyncio.TimeoutError, OSError) as e:
            errors.append(f"{address} (the steps after position {first}): {e}")
            return None, 0
        sent += len(delta)
    state.frozen_s = time.perf_counter() - frozen_at
    logger.info("session %s pre-copied to %s at position %d, then %d more token(s) while frozen %.3f s",
                session.session_id, address, first, session.position - first, state.frozen_s)
    return (address, peer_id), sent


async def _send(stub, header, blob: bytes, chunk: int, address: str):
    from pollinate.protocol.v1 import node_pb2

    def requests():
        yield node_pb2.HandOffRequest(header=header, data=blob[:chunk])
        for i in range(chunk, len(blob), chunk):
            yield node_pb2.HandOffRequest(data=blob[i:i + chunk])

    with translate_rpc_errors(peer=address):
        return await stub.HandOff(requests())
