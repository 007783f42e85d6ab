"""The swarm token: a shared secret every RPC but Health carries in its metadata.

Only swarm members talk to the swarm (DESIGN.md invariant 4). The server side is a
grpc.aio interceptor that rejects a call with UNAUTHENTICATED before its handler runs;
the client side attaches the token to every call on a channel (`token_client_interceptors`)
or to one call (`token_metadata`). The token proves membership, not identity, and travels
in clear text unless TLS is on (channels.py).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import grpc
import grpc.aio

from pollinate.protocol.errors import RateLimitedLog, SetupError

logger = logging.getLogger(__name__)
_rejected_log = RateLimitedLog()  # one line per method per 10 s: a flood of bad tokens stays small

# Metadata keys must be lowercase ASCII in gRPC.
TOKEN_METADATA_KEY = "x-pollinate-token"

# Liveness probes answer without a token, so orchestration and `pollinate status` can ask
# whether a peer is up without being a member. Full method names: /package.Service/Method.
HEALTH_METHODS: frozenset[str] = frozenset({"/pollinate.v1.Node/Health", "/pollinate.v1.Coordinator/Health"})


# The environment variable every command reads the token from when no --token-file is given
# (docker-compose passes it this way). Only the command-line layer reads the environment.
TOKEN_ENV = "POLLINATE_TOKEN"


class EmptyTokenFile(SetupError, ValueError):
    """--token-file names an empty file: a set-up problem, one line from `pollinate` (cli/main.py)."""


def read_token(token_file: str | os.PathLike | None, fallback: str | None = None) -> str | None:
    """The swarm token from `token_file`, else `fallback` (the CLI passes $POLLINATE_TOKEN);
    None when neither gives one. An empty token file is an error, not "no token"."""
    if token_file is not None:
        token = Path(token_file).read_text().strip()
        if not token:
            raise EmptyTokenFile(f"token file {token_file} is empty")
        return token
    return (fallback or "").strip() or None


# Identity (a member's key pair, calls signed in its name, the address challenge) lives in
# protocol/identity.py; the Health challenge's length is bounded here with the other limits.
MAX_CHALLENGE_CHARS = 128


def token_key(token: str, label: str) -> bytes:
    """A key for one use of the swarm token, named by `label`: SHA-256 of the label and the
    token. What is MACed under it proves its writer holds the token, while neither the token
    nor a key for another use appears where others can read it (node/announce.py: DHT records)."""
    if not token:
        raise ValueError("swarm token must be a non-empty string")
    return hashlib.sha256(b"pollinate " + label.encode("utf-8") + b"\0" + token.encode("utf-8")).digest()


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries `token`: `stub.Info(request, metadata=token_metadata(t))`."""
    return ((TOKEN_METADATA_KEY, token),)


def _check_token(expected: bytes, metadata: Iterable | None) -> bool:
    presented = None
    for item in metadata or ():
        key, value = item[0], item[1]
        if key == TOKEN_METADATA_KEY:
            if presented is not None:
                return False  # two tokens: ambiguous, refuse rather than pick one
            presented = value
    if presented is None:
        return False
    if isinstance(presented, str):
        presented = presented.encode("utf-8")
    # Constant time, so the response time does not reveal how many leading bytes matched.
    return hmac.compare_digest(presented, expected)


def _rejecting_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    # The replacement must be of the same kind (unary/stream) as the method's own handler,
    # or grpc would read the request stream the wrong way before we get to abort.
    async def reject(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # No deserializer: the request is never parsed (garbage without a token is UNAUTHENTICATED,
    # not a decode error).
    deserialize, serialize = None, handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(reject, deserialize, serialize)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(reject, deserialize, serialize)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(reject, deserialize, serialize)
    return grpc.stream_stream_rpc_method_handler(reject, deserialize, serialize)


class TokenServerInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every call whose metadata lacks the swarm token, except the exempt methods."""

    def __init__(self, token: str, *, exempt: frozenset[str] = HEALTH_METHODS) -> None:
        if not token:
            raise ValueError("swarm token must be a non-empty string")
        self._token = token.encode("utf-8")
        self._exempt = exempt

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in self._exempt:
            return handler
        if _check_token(self._token, handler_call_details.invocation_metadata):
            return handler
        _rejected_log(logger.warning, method, "rejected %s: missing or wrong swarm token", method)
        return _rejecting_handler(handler, f"{method} refused: missing or wrong swarm token (metadata {TOKEN_METADATA_KEY!r})")


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(TOKEN_METADATA_KEY, token)
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout,
        metadata=metadata,
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


class _TokenUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self._token), request)


class _TokenUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self._token), request)


class _TokenStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_token(client_call_details, self._token), request_iterator)


class _TokenStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_token(client_call_details, self._token), request_iterator)


def token_client_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that attach `token` to every call on a grpc.aio channel, all four kinds
    (grpc.aio picks interceptors per call kind, so one class per kind):

        grpc.aio.insecure_channel(address, interceptors=token_client_interceptors(token))
    """
    if not token:
        raise ValueError("swarm token must be a non-empty string")
    return [_TokenUnaryUnary(token), _TokenUnaryStream(token), _TokenStreamUnary(token), _TokenStreamStream(token)]
