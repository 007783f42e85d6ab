"""grpc.aio servers and channels with Pollinate's options: message size limits that fit the
1 MiB tensor chunks, keepalive, the swarm token, and TLS one setting away.

    server = RpcServer(ServerConfig(token=token))          # port 0 by default
    server.add(node_pb2_grpc.add_NodeServicer_to_server, servicer)
    async with server:                                     # start() ... stop(grace)
        channel = open_channel(server.address, ChannelConfig(token=token))

RpcServer installs, in this order, the token interceptor (so an outsider's call never
reaches a handler) and the error-mapping interceptor (so every servicer method turns domain
errors into their status code and unexpected exceptions into INTERNAL). A TLS server's
certificate can be replaced while it serves (`replace_certificate`: a node's short-lived
data-TLS certificate, renewed by node/certificate_renewal.py).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from pollinate.protocol.auth import TokenServerInterceptor, token_client_interceptors
from pollinate.protocol.data_tls import swarm_ca_pem, tls_name
from pollinate.protocol.errors import ErrorMappingInterceptor
from pollinate.protocol.framing import DEFAULT_FRAMING
from pollinate.protocol.relay import dialer as relay_dialer
from pollinate.protocol.relay import is_relayed

logger = logging.getLogger(__name__)

# One 1 MiB chunk plus its message's other fields (headers, names, shapes) stays far under
# 64 KiB; anything larger than chunk + 64 KiB is not a Pollinate message.
DEFAULT_MAX_MESSAGE_BYTES = DEFAULT_FRAMING.max_message_bytes + 64 * 1024
# The largest round state the coordinator keeps (LoRA rank 8 on 15 SmolLM2 blocks is 1.8 MB;
# rank 64 on all 30 is ~30 MB). It travels in pieces (protocol/pieces.py): the coordinator
# takes DEFAULT_MAX_MESSAGE_BYTES per message, and sends up to this (a unary reply to an
# older client).
COORDINATOR_STATE_BYTES = 64 << 20
COORDINATOR_MAX_MESSAGE_BYTES = COORDINATOR_STATE_BYTES + 64 * 1024


RECEIVE_WINDOW_BYTES = 4 * 1024 * 1024


def _keepalive_options(time_s: float, timeout_s: float) -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", int(time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
        # Ping idle connections too: a long Inference session sits idle between user turns,
        # and a dead peer must be noticed before the next step, not after a TCP timeout.
        ("grpc.keepalive_permit_without_calls", 1),
    ]


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """How an RpcServer listens."""

    # Interface to bind. Loopback by default so nothing is exposed by accident; a volunteer
    # node serving others binds "0.0.0.0" (or "[::]").
    host: str = "127.0.0.1"
    # TCP port; 0 lets the OS pick a free one (tests, several nodes on one machine) and
    # RpcServer.address reports what was bound.
    port: int = 0
    # Swarm token that every RPC but Health must carry. None disables the check: only for
    # in-process tests and single-user demos; the CLI always sets one.
    token: str | None = field(default=None, repr=False)
    # PEM certificate chain and private key. Both set = TLS; both None = plaintext.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # The same in memory: a node's certificate from the swarm CA and its identity key
    # (protocol/data_tls.py); instead of the files, never with them.
    tls_cert_pem: bytes | None = field(default=None, repr=False)
    tls_key_pem: bytes | None = field(default=None, repr=False)
    # Largest message accepted or sent, bytes; a bit above one tensor chunk (see above).
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Largest message sent, where it differs (None: max_message_bytes).
    max_send_message_bytes: int | None = None
    # Keepalive ping interval and how long to wait for the ack, seconds. 30 s / 10 s notice a
    # vanished peer within ~40 s at negligible traffic.
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    # Shortest interval between client pings the server tolerates, seconds; below the
    # clients' keepalive_time_s, or the server would answer their pings with GOAWAY.
    min_client_ping_interval_s: float = 10.0
    # How long stop() lets in-flight calls finish before cancelling them, seconds. 5 s lets an
    # Inference step or a shard upload complete without holding up shutdown for long.
    grace_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"ServerConfig.port must be in 0..65535, got {self.port}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                f"ServerConfig TLS needs both tls_cert_file and tls_key_file, got "
                f"{self.tls_cert_file!r} and {self.tls_key_file!r}"
            )
        if (self.tls_cert_pem is None) != (self.tls_key_pem is None):
            raise ValueError("ServerConfig TLS needs both tls_cert_pem and tls_key_pem, or neither")
        if self.tls_cert_pem is not None and self.tls_cert_file is not None:
            raise ValueError(f"ServerConfig: tls_cert_pem and tls_cert_file={self.tls_cert_file!r} both set")
        if self.token is not None and not self.token:
            raise ValueError("ServerConfig.token must be None or a non-empty string, got ''")
        if self.max_message_bytes <= DEFAULT_FRAMING.max_message_bytes:
            raise ValueError(
                f"ServerConfig.max_message_bytes ({self.max_message_bytes}) must exceed one tensor chunk "
                f"({DEFAULT_FRAMING.max_message_bytes} bytes) plus its message overhead"
            )
        for name in ("keepalive_time_s", "keepalive_timeout_s", "min_client_ping_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ServerConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.grace_s < 0:
            raise ValueError(f"ServerConfig.grace_s must be >= 0, got {self.grace_s!r}")

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None or self.tls_cert_pem is not None

    def tls_key_and_chain(self) -> tuple[bytes, bytes]:
        if self.tls_cert_pem is not None:
            return self.tls_key_pem, self.tls_cert_pem
        return self.tls_key_file.read_bytes(), self.tls_cert_file.read_bytes()


@dataclass(frozen=True, kw_only=True)
class ChannelConfig:
    """How a client connects to a Pollinate server."""

    # Swarm token attached to every call; None sends none (Health needs none).
    token: str | None = field(default=None, repr=False)
    # Use TLS. With tls_root_cert_file None the system's trusted roots verify the server.
    tls: bool = False
    # PEM root certificate to trust (a swarm's self-signed certificate); needs tls=True.
    tls_root_cert_file: Path | None = None
    # The same in memory (the swarm CA's certificate: protocol/data_tls.py); not with the file.
    tls_root_pem: bytes | None = field(default=None, repr=False)
    # The server is a swarm node: its certificate names the address dialled as
    # data_tls.tls_name(address), not as its host (needs tls=True).
    swarm_peer: bool = False
    # Largest message accepted or sent, bytes; must match the servers' (see above).
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Keepalive ping interval and ack timeout, seconds; the interval must stay at or above
    # the servers' min_client_ping_interval_s (10 s by default).
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    # Subchannels (connections) of this channel's own instead of gRPC's process-wide pool:
    # a fresh channel then dials at once rather than inherit the reconnect backoff (up to
    # 120 s) of an earlier channel to the same address. For clients that reopen a channel to
    # get a peer back quickly (the coordinator client after an outage).
    own_subchannels: bool = False

    def __post_init__(self) -> None:
        if self.tls_root_cert_file is not None and not self.tls:
            raise ValueError(f"ChannelConfig.tls_root_cert_file={self.tls_root_cert_file!r} needs tls=True")
        if (self.tls_root_pem is not None or self.swarm_peer) and not self.tls:
            raise ValueError("ChannelConfig.tls_root_pem and swarm_peer need tls=True")
        if self.tls_root_pem is not None and self.tls_root_cert_file is not None:
            raise ValueError(f"ChannelConfig: tls_root_pem and tls_root_cert_file={self.tls_root_cert_file!r} both set")
        if self.token is not None and not self.token:
            raise ValueError("ChannelConfig.token must be None or a non-empty string, got ''")
        if self.max_message_bytes <= DEFAULT_FRAMING.max_message_bytes:
            raise ValueError(
                f"ChannelConfig.max_message_bytes ({self.max_message_bytes}) must exceed one tensor chunk "
                f"({DEFAULT_FRAMING.max_message_bytes} bytes) plus its message overhead"
            )
        for name in ("keepalive_time_s", "keepalive_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ChannelConfig.{name} must be positive, got {getattr(self, name)!r}")


def add_coordinator_tls_argument(parser) -> None:
    """`--coordinator-tls [PEM]` for every command that dials a coordinator started with
    --tls-cert: alone it trusts the system's roots, with a file it trusts that certificate
    (a swarm's self-signed one, or its CA)."""
    parser.add_argument("--coordinator-tls", nargs="?", const="", default=None, metavar="PEM",
                        help="reach the coordinator over TLS, trusting the certificate in PEM "
                             "(the coordinator's own or its CA) or, without PEM, the system's roots")


def coordinator_tls(value: str | None) -> dict[str, Any]:
    """`tls` and `tls_root_cert_file` keyword arguments from a --coordinator-tls value
    (None: plaintext, "": system roots, a path: that certificate). ValueError names a
    certificate file that cannot be read."""
    if value is None:
        return {"tls": False, "tls_root_cert_file": None}
    if not value:
        return {"tls": True, "tls_root_cert_file": None}
    path = Path(value).expanduser()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--coordinator-tls {value}: cannot read the certificate ({e})") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ValueError(f"--coordinator-tls {value}: not a PEM certificate")
    return {"tls": True, "tls_root_cert_file": path}


def peer_channel_config(token: str | None, **kwargs: Any) -> ChannelConfig:
    """The ChannelConfig for dialling a node: TLS verified against the swarm CA when this
    process was told one (data_tls.use_swarm_ca, from the coordinator), else plaintext."""
    ca = swarm_ca_pem()
    if ca is None:
        return ChannelConfig(token=token, **kwargs)
    return ChannelConfig(token=token, tls=True, tls_root_pem=ca, swarm_peer=True, **kwargs)


def open_channel(address: str, config: ChannelConfig = ChannelConfig()) -> grpc.aio.Channel:
    """A grpc.aio channel to `address` ("host:port", or a node's relayed address: see
    protocol/relay.py); close it with `await channel.close()`.

    Must be called with an event loop running (grpc.aio binds the channel to it)."""
    dialled = address
    if is_relayed(address):
        address = relay_dialer().local_address(address)
    options = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # Unlimited pings without data: keepalive must keep working on idle sessions.
        ("grpc.http2.max_pings_without_data", 0),
        *_keepalive_options(config.keepalive_time_s, config.keepalive_timeout_s),
    ]
    if config.own_subchannels:
        options.append(("grpc.use_local_subchannel_pool", 1))
    interceptors = token_client_interceptors(config.token) if config.token else None
    if config.tls:
        root = config.tls_root_cert_file.read_bytes() if config.tls_root_cert_file else config.tls_root_pem
        if config.swarm_peer:  # what the swarm CA certified: the address announced (and dialled)
            options.append(("grpc.ssl_target_name_override", tls_name(dialled)))
        credentials = grpc.ssl_channel_credentials(root_certificates=root)
        return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def _format_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"  # IPv6 literal
    return f"{host}:{port}"


class _ReplaceableCertificate:
    """A TLS server's key and chain that can change while it serves: gRPC's dynamic server
    credentials call `_fetch` at every new handshake (from a gRPC core thread, not the event
    loop); it hands over a replacement once, after which gRPC keeps presenting it. Open
    connections, and the calls on them, keep the session they have."""

    def __init__(self, key: bytes, chain: bytes) -> None:
        self.key = key
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            grpc.ssl_server_certificate_configuration([(key, chain)]), self._fetch)

    def replace(self, chain: bytes) -> None:
        config = grpc.ssl_server_certificate_configuration([(self.key, chain)])
        with self._lock:
            self._pending = config

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:  # None: unchanged since the last handshake
            config, self._pending = self._pending, None
        return config


class RpcServer:
    """A grpc.aio server with Pollinate's interceptors and options.

    Register servicers with `add()` before `start()`; `address` is the bound "host:port"
    (the real port when config.port is 0). An async context manager: start on enter,
    stop(grace) on exit."""

    def __init__(
        self,
        config: ServerConfig = ServerConfig(),
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.config = config
        self._extra_interceptors = tuple(interceptors)
        self._registrations: list[tuple[Callable[[Any, grpc.aio.Server], None], Any]] = []
        self._server: grpc.aio.Server | None = None
        self._port: int | None = None
        self._certificate: _ReplaceableCertificate | None = None  # with TLS, once started

    def add(self, register: Callable[[Any, grpc.aio.Server], None], servicer: Any) -> None:
        """Register a servicer with its generated function, e.g. add_NodeServicer_to_server."""
        if self._server is not None:
            raise RuntimeError("RpcServer.add() must come before start()")
        self._registrations.append((register, servicer))

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("RpcServer has not started")
        return self._port

    @property
    def address(self) -> str:
        """The address clients dial: "host:port" with the port actually bound."""
        return _format_address(self.config.host, self.port)

    async def start(self) -> str:
        """Bind and start serving; returns the bound address."""
        if self._server is not None:
            raise RuntimeError("RpcServer already started")
        cfg = self.config
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if cfg.token is not None:
            interceptors.append(TokenServerInterceptor(cfg.token))
        interceptors.extend(self._extra_interceptors)
        interceptors.append(ErrorMappingInterceptor())  # innermost: wraps the handlers themselves
        options = [
            ("grpc.max_send_message_length", cfg.max_send_message_bytes or cfg.max_message_bytes),
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            # (C-core's GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; the string has no
            # "recv" in it, and an unknown option is silently ignored, leaving the 5 min default
            # that answered every client's 30 s keepalive with GOAWAY too_many_pings)
            ("grpc.http2.min_ping_interval_without_data_ms", int(cfg.min_client_ping_interval_s * 1000)),
            # grpc sets SO_REUSEPORT by default, which lets a second server bind the same port
            # and silently steal half the connections; a taken port must be an error.
            ("grpc.so_reuseport", 0),
            # What a caller may push into one stream before the handler reads it: a fixed 4 MiB
            # window. gRPC's default grows it with its bandwidth-delay probe, and callers then
            # pushed tens of MB per stream into a server's buffers after the handler had refused
            # the stream's first message (issue 18; docs/security.md). 4 MiB still carries
            # ~330 Mbit/s per stream at 100 ms round trip.
            ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", RECEIVE_WINDOW_BYTES),
            *_keepalive_options(cfg.keepalive_time_s, cfg.keepalive_timeout_s),
        ]
        server = grpc.aio.server(interceptors=interceptors, options=options)
        for register, servicer in self._registrations:
            register(servicer, server)
        bind = _format_address(cfg.host, cfg.port)
        try:
            if cfg.tls:
                self._certificate = _ReplaceableCertificate(*cfg.tls_key_and_chain())
                port = server.add_secure_port(bind, self._certificate.credentials)
            else:
                port = server.add_insecure_port(bind)
        except RuntimeError as exc:  # grpc raises RuntimeError when it cannot bind
            raise OSError(f"cannot listen on {bind}: {exc}") from exc
        if port == 0:  # older grpc versions report a failed bind as port 0
            raise OSError(f"cannot listen on {bind}")
        await server.start()
        self._server = server
        self._port = port
        logger.info(
            "listening on %s (%s, token %s)",
            self.address,
            "TLS" if cfg.tls else "plaintext",
            "required" if cfg.token is not None else "not required",
        )
        return self.address

    def replace_certificate(self, chain_pem: bytes) -> None:
        """Present `chain_pem` (for the same key, given in memory: ServerConfig.tls_cert_pem)
        from the next TLS handshake on; connections open now, and their calls, go on
        undisturbed. Before start(), the chain to start with."""
        if self.config.tls_cert_pem is None:
            raise RuntimeError("RpcServer.replace_certificate: no in-memory TLS certificate to replace")
        if self._certificate is None:
            self.config = dataclasses.replace(self.config, tls_cert_pem=chain_pem)
        else:
            self._certificate.replace(chain_pem)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish for `grace` seconds (default:
        config.grace_s), then cancel the rest. Safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        await server.stop(self.config.grace_s if grace is None else grace)
        logger.info("stopped serving on %s", _format_address(self.config.host, self._port or 0))

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Wait until the server stops; returns False on timeout."""
        if self._server is None:
            return True
        return await self._server.wait_for_termination(timeout)

    async def __aenter__(self) -> RpcServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
