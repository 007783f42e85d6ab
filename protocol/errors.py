"""Pollinate's error types and the one table that maps them to gRPC status codes.

Servers raise these from domain code; the servicer wrapper (`map_errors`, installed on
every server by `pollinate.protocol.channels.RpcServer`) turns them into a status with the
exception's message, and turns anything unexpected into INTERNAL while the server keeps
serving. Clients turn a failed call back into one of these with `from_rpc_error` (or the
`translate_rpc_errors()` context manager), so callers handle `PeerUnavailable` and
`RpcTimeout` as values (reroute, drop from the round) instead of inspecting status codes.

CompressionError lives in pollinate.compression (compression must not depend on protocol);
it is a ValueError and is looked up lazily, so this module imports without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterator

import grpc
import grpc.aio

logger = logging.getLogger(__name__)


class PollinateError(Exception):
    """Base of every error that crosses a Pollinate RPC boundary."""


class InvalidRequest(PollinateError):
    """The request is malformed: bad shape, dtype, codec, chunking, position, size."""


class NotFound(PollinateError):
    """The request names something that does not exist here: a job, a session, a round."""


class InputNotKept(NotFound):
    """Backward named a kept Forward input (BackwardHeader.keep_id) this node does not hold
    (evicted, expired, restarted, or another replica): send the input again. Travels as
    NOT_FOUND whose details start with PREFIX, which the client side turns back into this."""

    PREFIX = "input not kept:"

    def __init__(self, message: str) -> None:
        super().__init__(message if message.startswith(self.PREFIX) else f"{self.PREFIX} {message}")


class FailedPrecondition(PollinateError):
    """The request is well-formed but the system is not in a state to serve it."""


class SpanMoved(PollinateError):
    """The peer no longer serves the blocks the caller's route assumed (it moved to others since
    the record the route came from); route those blocks again."""


class ResourceExhausted(PollinateError):
    """No room for this request now (KV-cache budget, too many sessions); try another peer."""


class Unauthenticated(PollinateError):
    """Missing or wrong swarm token."""


class PeerUnavailable(PollinateError):
    """The peer cannot be reached or went away mid-call; an expected event, handled by rerouting."""


class SessionHandedOff(PeerUnavailable):
    """The node left (or moved) and handed this session's KV cache to another node, named in
    the message: "session handed off: to ADDRESS peer PEER_ID (...)" (node/handoff.py). The
    client resumes there with its resume secret instead of replaying. Travels as UNAVAILABLE
    whose details start with PREFIX, so an older client simply fails over as before."""

    PREFIX = "session handed off:"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        import re

        found = re.search(r" to (\S+) peer (\S+)", message)
        self.address = found.group(1) if found else ""  # the node holding the session now
        self.peer_id = found.group(2) if found else ""


class RpcTimeout(PollinateError):
    """A call ran past its deadline."""


class ProtocolMismatch(PollinateError):
    """The peer speaks another protocol version or lacks the method."""


class InternalError(PollinateError):
    """The peer failed unexpectedly (a bug or a crash on its side)."""


class SetupError(Exception):
    """A set-up problem the user fixes (a flag, an address, a firewall): the DHT cannot reach
    its bootstrap peers, the coordinator refuses the announced address. Never crosses the
    wire; `pollinate` prints its message on one line and exits 1 (cli/main.py)."""


# The one table: each error type -> one status code. Subclasses inherit their base's
# code (looked up along the MRO). CompressionError is added at lookup time, see below.
STATUS_CODES: dict[type[BaseException], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    SpanMoved: grpc.StatusCode.ABORTED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PeerUnavailable: grpc.StatusCode.UNAVAILABLE,
    RpcTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    ProtocolMismatch: grpc.StatusCode.UNIMPLEMENTED,
    InternalError: grpc.StatusCode.INTERNAL,
}
# A codec rejecting a frame means the sender sent bad bytes: the caller's fault.
COMPRESSION_ERROR_CODE = grpc.StatusCode.INVALID_ARGUMENT

# Client side: status code -> error type. Codes Pollinate servers never send on purpose
# still get the closest meaning; anything not listed becomes InternalError.
_ERRORS_BY_CODE: dict[grpc.StatusCode, type[PollinateError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: FailedPrecondition,
    grpc.StatusCode.ABORTED: SpanMoved,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
    # CANCELLED reaches a client when the server side went away mid-stream (shutdown,
    # killed peer) as well as on its own cancel; either way the peer is gone for this call.
    grpc.StatusCode.UNAVAILABLE: PeerUnavailable,
    grpc.StatusCode.CANCELLED: PeerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: RpcTimeout,
    grpc.StatusCode.UNIMPLEMENTED: ProtocolMismatch,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}


def _compression_error_type() -> type[BaseException] | None:
    # Imported lazily: pollinate.compression may not be installed or importable yet, and
    # protocol must keep working without it (dependencies point protocol <- compression's
    # users, never compression -> protocol).
    try:
        from pollinate.compression.codec import CompressionError
    except ImportError:
        return None
    return CompressionError


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """The status code a server answers with for `exc` (INTERNAL if it is not a known error)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    compression_error = _compression_error_type()
    if compression_error is not None and isinstance(exc, compression_error):
        return COMPRESSION_ERROR_CODE
    return grpc.StatusCode.INTERNAL


def is_domain_error(exc: BaseException) -> bool:
    """True for errors the table knows (their message goes to the caller as is)."""
    if isinstance(exc, PollinateError):
        return True
    compression_error = _compression_error_type()
    return compression_error is not None and isinstance(exc, compression_error)


# Longest status details sent back, characters: an error that echoes a 16 kB request string
# would otherwise exceed the client's metadata limit and arrive as a transport error.
MAX_DETAILS_CHARS = 2000


def one_line(text: str, limit: int = 300) -> str:
    """`text` on one line (a peer's newlines cannot forge log lines), at most `limit` chars."""
    text = text.encode("unicode_escape", "backslashreplace").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _details_for(exc: BaseException) -> str:
    if is_domain_error(exc):
        text = str(exc) or type(exc).__name__
        return text if len(text) <= MAX_DETAILS_CHARS else text[:MAX_DETAILS_CHARS] + f"... ({len(text)} chars)"
    # Unexpected: the type tells the caller what kind of bug; the traceback stays in our log.
    return f"internal error: {type(exc).__name__}: {exc}"


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the current call with the status mapped from `exc`; never returns (raises AbortError)."""
    await context.abort(status_code_for(exc), _details_for(exc))


class RateLimitedLog:
    """At most one line per key per `period_s`; the next line that passes says how many were
    dropped. A hostile peer's garbage must not turn into megabytes of log."""

    def __init__(self, period_s: float = 10.0) -> None:
        self.period_s = period_s
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def __call__(self, log: Callable, key: str, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -float("inf")) < self.period_s:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return
        if len(self._last) > 4096:  # keys are method names and peers: bounded, but be sure
            self._last.clear()
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            msg += f" ({dropped} more like it in the last {self.period_s:g} s not logged)"
        log(msg, *args)


_bad_input_log = RateLimitedLog()


class Undecodable:
    """What a request that does not parse as its message type is passed on as: touching any
    field raises InvalidRequest, so the call ends with INVALID_ARGUMENT and one log line
    (ErrorMappingInterceptor), not UNKNOWN and a traceback from inside grpc."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem

    def __getattr__(self, name: str):
        raise InvalidRequest(self.problem)


def tolerant_deserializer(deserialize: Callable | None) -> Callable | None:
    """`deserialize` that returns an Undecodable instead of raising."""
    if deserialize is None:
        return None
    message_type = getattr(getattr(deserialize, "__self__", None), "__name__", "request")

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or anything a corrupt message makes protobuf raise
            return Undecodable(f"undecodable {message_type} message ({len(data)} bytes): "
                               f"{type(exc).__name__}: {str(exc)[:120]}")

    return parse


def _log_failure(method: str, exc: BaseException) -> None:
    if isinstance(exc, InvalidRequest):  # a peer's bad input: it may come by the thousand
        _bad_input_log(logger.info, method, "%s answered INVALID_ARGUMENT: %s", method, one_line(str(exc)))
    elif is_domain_error(exc):
        # The caller's problem or an expected condition: one short line, no traceback, and
        # rate-limited too: a stranger can make every one of these happen in a loop.
        code = status_code_for(exc).name
        _bad_input_log(logger.info, f"{method} {code}", "%s answered %s: %s", method, code, one_line(str(exc)))
    else:
        logger.exception("%s failed unexpectedly, answered INTERNAL", method, exc_info=exc)


def _passes_through(exc: BaseException) -> bool:
    # AbortError: the servicer already chose a status with context.abort. CancelledError:
    # the client cancelled or the server is stopping; grpc handles it. Neither is ours to map.
    return isinstance(exc, (grpc.aio.AbortError, asyncio.CancelledError))


# A refused call that streams requests reads what its caller still sends before the status
# goes (map_errors `drain`): a grpc.aio client whose write fails because the call already
# ended reports INTERNAL "Internal error from Core" instead of the server's status
# (grpc/grpc#36066), so under load a clear refusal reached the caller as an internal error.
# Bounded: it stops when the caller half-closes, after DRAIN_IDLE_S without a message (a
# long-lived stream such as Inference waits for our reply, not sending), or after DRAIN_S.
DRAIN_S = 5.0
DRAIN_IDLE_S = 0.5


async def _drain(requests) -> None:
    """Read and drop what is left of a request stream, within the bounds above."""
    stop = time.monotonic() + DRAIN_S
    iterator = requests.__aiter__()
    with contextlib.suppress(Exception):  # a broken or cancelled stream: nothing left to wait for
        while (left := stop - time.monotonic()) > 0:
            await asyncio.wait_for(iterator.__anext__(), min(DRAIN_IDLE_S, left))


def map_errors(behavior: Callable, *, drain: bool = False) -> Callable:
    """Wrap a grpc.aio servicer method so that exceptions become statuses.

    Works for coroutine methods (unary or stream responses written with context.write) and
    async-generator methods (stream responses with `yield`); the wrapper keeps the kind, since
    grpc.aio inspects it to decide how to drive the method. Domain errors become their
    mapped code with their message; anything else becomes INTERNAL and is logged with its
    traceback. Either way only this call fails; the server keeps serving. `drain`: the method
    takes a request stream, read to its end (bounded, _drain) before a refusal is sent.
    """
    name = getattr(behavior, "__qualname__", repr(behavior))

    if inspect.isasyncgenfunction(behavior):

        @functools.wraps(behavior)
        async def wrapped_stream(request, context):
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as exc:
                if _passes_through(exc) or not isinstance(exc, Exception):
                    raise
                _log_failure(name, exc)
                if drain:
                    await _drain(request)
                await abort_with(context, exc)

        return wrapped_stream

    if inspect.iscoroutinefunction(behavior):

        @functools.wraps(behavior)
        async def wrapped(request, context):
            try:
                return await behavior(request, context)
            except BaseException as exc:
                if _passes_through(exc) or not isinstance(exc, Exception):
                    raise
                _log_failure(name, exc)
                if drain:
                    await _drain(request)
                await abort_with(context, exc)

        return wrapped

    # A synchronous behavior would run in grpc's thread pool; Pollinate servicers are async.
    return behavior


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Applies `map_errors` to every method of every servicer on the server, so no servicer
    can forget it. RpcServer installs it after the auth interceptor."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        deserialize = tolerant_deserializer(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                map_errors(handler.unary_unary), deserialize, handler.response_serializer
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                map_errors(handler.unary_stream), deserialize, handler.response_serializer
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                map_errors(handler.stream_unary, drain=True), deserialize, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            map_errors(handler.stream_stream, drain=True), deserialize, handler.response_serializer
        )


def _tls_hint(details: str) -> str:
    """What gRPC's words for a TLS mismatch mean in a swarm (docs/security.md, --data-tls)."""
    if "failed to connect" in details and "Socket closed" in details:
        # what a TLS server does to a plaintext client: accept, read a non-TLS hello, close
        return (" (so ends a plaintext call to a TLS peer: if the swarm runs --data-tls its nodes accept "
                "only TLS; reach it through --coordinator, which tells clients to use TLS and its CA)")
    if "andshake" in details or "ssl" in details.lower() or "Verification" in details:
        return (" (TLS handshake failed: the peer serves plaintext, or no certificate from this swarm's CA "
                "for this address)")
    return ""


def from_rpc_error(error: grpc.RpcError, *, peer: str | None = None) -> PollinateError:
    """The PollinateError a failed call means; `peer` (an address) is added to the message."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or ""
    cls = _ERRORS_BY_CODE.get(code, InternalError)
    if cls is NotFound and details.startswith(InputNotKept.PREFIX):
        cls = InputNotKept
    if cls is PeerUnavailable and details.startswith(SessionHandedOff.PREFIX):
        return SessionHandedOff(details)
    code_name = code.name if code is not None else "no status"
    where = f" from {peer}" if peer else ""
    if cls is PeerUnavailable or cls is RpcTimeout or cls is InternalError:
        # Transport-level messages ("failed to connect to all addresses") make little sense
        # without the code; domain messages are already written for the caller.
        message = f"{code_name}{where}: {details}" if details else f"{code_name}{where}"
        if cls is PeerUnavailable:
            message += _tls_hint(details)
    elif details:
        message = f"{details} ({peer})" if peer else details
    else:
        message = f"{code_name}{where}"
    return cls(message)


@contextlib.contextmanager
def translate_rpc_errors(*, peer: str | None = None) -> Iterator[None]:
    """Re-raise a failed gRPC call (or an asyncio timeout around one) as a PollinateError.

        with translate_rpc_errors(peer=address):
            reply = await stub.Info(node_pb2.InfoRequest(), timeout=config.rpc_timeout_s)
    """
    try:
        yield
    except grpc.RpcError as exc:
        raise from_rpc_error(exc, peer=peer) from exc
    except (TimeoutError, asyncio.TimeoutError) as exc:  # distinct classes before Python 3.11
        where = f" waiting for {peer}" if peer else ""
        raise RpcTimeout(f"timed out{where}") from exc
