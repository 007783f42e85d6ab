"""CoordinatorClient: a node's side of membership. Join, heartbeat, obey moves, re-join.

    client = CoordinatorClient(CoordinatorClientConfig(
        coordinator="10.0.0.1:7070", token=token, address="10.0.0.7:7100",
        capacity_blocks=10, throughput=120.0), on_move=load_blocks)
    assignment = await client.start()        # joins (retrying while the coordinator is down)
    await load_blocks(assignment.span, "initial assignment")
    client.set_serving(assignment.span)      # heartbeats now report the span as served
    ...
    await client.stop()                      # leaves gracefully

Heartbeats travel on one long-lived HeartbeatStream per member (a stream costs the
coordinator a fraction of a unary call per beat); a broken stream is re-opened at the next
beat. The heartbeat loop never gives up: while the coordinator is unreachable it keeps trying
once per period (the node keeps serving; clients route from the DHT), and when the
coordinator answers NOT_FOUND (it evicted us, or lost its state) the client joins again,
offering the span it already serves so nothing is reloaded needlessly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import grpc.aio

from pollinate.protocol.auth import token_metadata
from pollinate.protocol.data_tls import certificate_seconds_left
from pollinate.protocol.identity import NodeIdentity
from pollinate.protocol.channels import COORDINATOR_MAX_MESSAGE_BYTES, ChannelConfig, open_channel
from pollinate.protocol.pieces import get_committed_state
from pollinate.protocol.errors import (
    NotFound,
    PeerUnavailable,
    PollinateError,
    ProtocolMismatch,
    RpcTimeout,
    Unauthenticated,
    one_line,
    translate_rpc_errors,
)
from pollinate.protocol.shared import Span
from pollinate.protocol.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

logger = logging.getLogger(__name__)

# Longest wait between two tries of a re-join the coordinator refused, seconds.
REJOIN_BACKOFF_MAX_S = 60.0

# on_move(span, reason): load `span`; when it returns the client reports the span as served.
MoveCallback = Callable[[Span, str], Awaitable[None]]


@dataclass(frozen=True, kw_only=True)
class CoordinatorClientConfig:
    # The coordinator's gRPC address, host:port.
    coordinator: str
    # Swarm token (sent on every call).
    token: str = field(repr=False)
    # host:port where this node serves the Node service; its identity in the swarm.
    address: str
    # Blocks this node can hold.
    capacity_blocks: int
    # Tokens/s this node adds to each block it serves; only relative values matter.
    throughput: float
    # Model the node serves; empty: whatever the swarm serves.
    model_id: str = ""
    # Operator-chosen blocks (--blocks): assigned as asked and never moved.
    requested_span: Span | None = None
    # Label for the coordinator's logs and status.
    name: str = ""
    # Offer this node's DHT peer as a circuit relay for nodes that cannot be dialled: its
    # multiaddr (pollinate node --relay); empty: no.
    relay_maddr: str = ""
    # The node's key pair (protocol/identity.py): it signs the Join and every call in the
    # member's name, and the node's Health signs the coordinator's challenge with it. The
    # node CLI loads it from --identity-file; the default is a new one for this process.
    identity: NodeIdentity = field(default_factory=NodeIdentity.generate, repr=False)
    # The node's Linear weights, told at Join for status: "none", "int8" or "int4".
    quant: str = "none"
    # Deadline of each RPC, seconds. 5 s: far above a loopback or LAN round trip, short
    # enough that one lost heartbeat does not delay the next.
    rpc_timeout_s: float = 5.0
    # How long start() keeps trying to join a coordinator that is down, seconds.
    join_timeout_s: float = 60.0
    # First and largest pause between join attempts while the coordinator is down, seconds.
    retry_initial_s: float = 0.2
    retry_max_s: float = 2.0
    # TLS towards the coordinator (see protocol/channels.py), trusting tls_root_cert_file
    # (a swarm's self-signed certificate) or, if None, the system's roots.
    tls: bool = False
    tls_root_cert_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("token must not be empty")
        if ":" not in self.coordinator:
            raise ValueError(f"coordinator must be host:port, got {self.coordinator!r}")
        if self.capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {self.capacity_blocks!r}")
        if not (math.isfinite(self.throughput) and self.throughput > 0):
            raise ValueError(f"throughput must be positive, got {self.throughput!r}")
        for name in ("rpc_timeout_s", "join_timeout_s", "retry_initial_s", "retry_max_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be positive, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Assignment:
    """What a Join returned."""

    member_id: str
    epoch: int
    span: Span
    dht_initial_peers: tuple[str, ...]
    heartbeat_period_s: float
    lease_s: float
    model_id: str
    num_blocks: int
    data_tls_ca_pem: str = ""  # the swarm CA with --data-tls (protocol/data_tls.py); "": plaintext


def _span_msg(span: Span | None) -> common_pb2.Span | None:
    return None if span is None else common_pb2.Span(start=span.start, end=span.end)


class CoordinatorClient:
    def __init__(self, config: CoordinatorClientConfig, *, on_move: MoveCallback | None = None):
        self.config = config
        self._on_move = on_move
        self._channel = None
        self._stub: coordinator_pb2_grpc.CoordinatorStub | None = None
        self.assignment: Assignment | None = None
        self.epoch = 0
        self.span: Span | None = None  # assigned
        self.serving_span: Span | None = None  # reported to the coordinator
        self.connected = False  # did the last call reach the coordinator?
        self.rejoins = 0
        self.heartbeats_ok = 0
        self._throughput = 0.0  # 0: unchanged since join
        self._load: Callable[[], common_pb2.ServingLoad] | None = None  # set_load
        self._trained: Callable[[], dict[str, int]] | None = None  # set_trained
        self._beat_now = asyncio.Event()  # beat_soon: the next heartbeat goes out now
        # stop() began: the heartbeat loop ends, and never resets the channel a Leave is on
        # (Python 3.11's wait_for can swallow the task's cancellation)
        self._stopping = False
        # a refused re-join (quarantined, address held, ...) is tried again after this many
        # seconds, doubling to REJOIN_BACKOFF_MAX_S, and logged once per reason
        self._rejoin_pause = 0.0
        self._next_rejoin = 0.0
        self._refused: str | None = None
        self._task: asyncio.Task | None = None
        self._move_task: asyncio.Task | None = None
        self._moving_to: Span | None = None
        self._stream = None  # the open HeartbeatStream call, or None
        self._token_metadata = token_metadata(config.token)
        self._unary = False  # the coordinator lacks HeartbeatStream: unary Heartbeat calls

    def _metadata(self, method: str, request=None) -> tuple[tuple[str, str], ...]:
        """The token, and this member's signature of a call of `method` with `request` (None:
        a stream) (protocol/identity.py)."""
        return self._token_metadata + self.config.identity.call_metadata(f"/pollinate.v1.Coordinator/{method}",
                                                                         request)

    # ---- public API -------------------------------------------------------------------

    @property
    def member_id(self) -> str | None:
        return self.assignment.member_id if self.assignment else None

    def set_serving(self, span: Span | None) -> None:
        """The blocks this node serves now (None while loading); sent with each heartbeat."""
        self.serving_span = span

    def set_load(self, load: Callable[[], common_pb2.ServingLoad] | None) -> None:
        """Where each heartbeat takes the node's batch sizes and queue waits from."""
        self._load = load

    def set_trained(self, trained: Callable[[], dict[str, int]] | None) -> None:
        """Called for every heartbeat: the jobs this node trains and their optimizer steps so far
        (HeartbeatRequest.trained_steps: the coordinator's round voters where nobody has standing)."""
        self._trained = trained

    def beat_soon(self) -> None:
        """Send the next heartbeat now rather than at its period (event loop): what it carries
        changed in a way the coordinator should hear at once (a job's first step: from then on
        this node is a voter on the job's rounds, and a newcomer's round 1 cannot pass it)."""
        self._beat_now.set()

    def set_throughput(self, throughput: float) -> None:
        self._throughput = throughput

    async def start(self) -> Assignment:
        """Join (retrying up to join_timeout_s) and start heartbeating in the background."""
        assignment = await self.join(deadline_s=self.config.join_timeout_s)
        self._stopping = False
        if self._on_move is None:
            self.serving_span = assignment.span  # nothing to load: serve at once
        self._task = asyncio.create_task(self._heartbeat_loop(), name="coordinator-heartbeat")
        return assignment

    async def stop(self, *, leave: bool = True) -> None:
        """Stop heartbeating and (by default) leave; never raises for a coordinator that is gone."""
        self._stopping = True
        for task in (self._task, self._move_task):
            if task is not None:
                task.cancel()
                await asyncio.wait([task], timeout=self.config.rpc_timeout_s)
        self._task = self._move_task = None
        self._close_stream()
        if leave and self.assignment is not None:
            try:
                await self.leave()
            except PollinateError as e:
                logger.info("leave failed (%s); the coordinator will evict us after the lease", e)
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def change_address(self, address: str) -> Assignment:
        """Serve at a new address (a relayed node whose relays changed): leave as the old
        member, join again at `address` keeping the span being served."""
        try:
            await self.leave()
        except PollinateError as e:
            logger.info("leave before changing address failed (%s); the old member will be evicted", e)
        self.config = dataclasses.replace(self.config, address=address)
        return await self.join(deadline_s=self.config.join_timeout_s)

    async def join(self, *, deadline_s: float) -> Assignment:
        """Join, retrying with backoff while the coordinator is unreachable, up to deadline_s."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + deadline_s
        pause = self.config.retry_initial_s
        while True:
            try:
                return await self._join_once()
            except (PeerUnavailable, RpcTimeout) as e:
                if loop.time() + pause > give_up:
                    raise PeerUnavailable(
                        f"coordinator {self.config.coordinator} unreachable for {deadline_s:g} s: {e}"
                    ) from e
                logger.info("coordinator %s unreachable (%s); retrying in %.1f s",
                            self.config.coordinator, e, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.config.retry_max_s)

    async def leave(self) -> int:
        cfg = self.config
        with translate_rpc_errors(peer=cfg.coordinator):
            request = coordinator_pb2.LeaveRequest(member_id=self.member_id)
            reply = await self._get_stub().Leave(request, timeout=cfg.rpc_timeout_s,
                                                 metadata=self._metadata("Leave", request))
        logger.info("left the swarm as %s at epoch %d", self.member_id, reply.epoch)
        self.assignment = None
        return reply.epoch

    async def data_tls_certificate(self) -> tuple[str, float]:
        """(chain, valid_s): the swarm CA's certificate chain (PEM) for this member's address
        and key, to serve the data plane with (--data-tls swarms; protocol/data_tls.py), and
        the seconds it is valid for. NotFound while this node is no member (it left, or lost
        its membership and has not joined again)."""
        cfg = self.config
        if self.assignment is None:
            raise NotFound(f"not a member of {cfg.coordinator} now (joining again): no certificate to ask for")
        with translate_rpc_errors(peer=cfg.coordinator):
            request = coordinator_pb2.DataTlsCertificateRequest(member_id=self.member_id, address=cfg.address)
            reply = await self._get_stub().IssueDataTlsCertificate(
                request, timeout=cfg.rpc_timeout_s, metadata=self._metadata("IssueDataTlsCertificate", request))
        # valid_s 0: a coordinator older than the field, whose certificates lasted a year
        return reply.certificate_chain_pem, reply.valid_s or certificate_seconds_left(reply.certificate_chain_pem)

    async def __aenter__(self) -> "CoordinatorClient":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ---- internals --------------------------------------------------------------------

    def _get_stub(self) -> coordinator_pb2_grpc.CoordinatorStub:
        if self._stub is None:
            # The token goes in each call's metadata, not a channel interceptor: grpc.aio's
            # intercepted stream calls raise InvalidStateError instead of the call's status
            # and leak tasks when they end between two writes.
            self._channel = open_channel(self.config.coordinator, ChannelConfig(
                tls=self.config.tls, own_subchannels=True,
                tls_root_cert_file=self.config.tls_root_cert_file))
            self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        return self._stub

    async def _reset_channel(self) -> None:
        # A fresh channel dials at once; an old one in TRANSIENT_FAILURE waits out gRPC's
        # reconnect backoff (up to 120 s), far longer than a coordinator restart takes.
        self._close_stream()
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def _join_once(self) -> Assignment:
        cfg = self.config
        request = coordinator_pb2.JoinRequest(
            address=cfg.address, model_id=cfg.model_id, capacity_blocks=cfg.capacity_blocks,
            throughput=self._throughput or cfg.throughput, name=cfg.name,
            requested_span=_span_msg(cfg.requested_span),
            current_span=_span_msg(self.serving_span if cfg.requested_span is None else None),
            relay_maddr=cfg.relay_maddr, quant=cfg.quant,
        )
        try:
            with translate_rpc_errors(peer=cfg.coordinator):
                reply = await self._get_stub().Join(request, timeout=cfg.rpc_timeout_s,
                                                    metadata=self._metadata("Join", request))
        except (PeerUnavailable, RpcTimeout):
            self.connected = False
            await self._reset_channel()
            raise
        self.connected = True
        self._close_stream()  # a stream is bound to the member id this join replaces
        self.assignment = Assignment(
            member_id=reply.member_id, epoch=reply.epoch, span=Span(reply.span.start, reply.span.end),
            dht_initial_peers=tuple(reply.dht_initial_peers),
            heartbeat_period_s=reply.heartbeat_period_s, lease_s=reply.lease_s,
            model_id=reply.model_id, num_blocks=reply.num_blocks, data_tls_ca_pem=reply.data_tls_ca_pem,
        )
        self.epoch, self.span = reply.epoch, self.assignment.span
        logger.info("joined %s as %s: blocks %s, epoch %d", cfg.coordinator, reply.member_id,
                    self.span, reply.epoch)
        return self.assignment

    async def _heartbeat_loop(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        next_beat = loop.time()
        while not self._stopping:
            period = self.assignment.heartbeat_period_s if self.assignment else 1.0
            next_beat = max(next_beat + period, loop.time())
            try:  # the period, unless beat_soon() asks for one now
                await asyncio.wait_for(self._beat_now.wait(), next_beat - loop.time())
            except asyncio.TimeoutError:
                pass
            self._beat_now.clear()
            try:
                if self.assignment is None:  # lost membership earlier and could not re-join
                    await self._rejoin()
                    continue
                request = coordinator_pb2.HeartbeatRequest(
                    member_id=self.assignment.member_id,
                    serving_span=_span_msg(self.serving_span), throughput=self._throughput,
                    load=self._load() if self._load is not None else None,
                    trained_steps=self._trained() if self._trained is not None else None,
                )
                reply = await self._beat(request)
            except (NotFound, Unauthenticated) as e:
                # Unauthenticated: the member carries another key (someone else's heartbeat
                # claimed it first after a coordinator restart): a Join, proven by serving at
                # our address, takes it back.
                logger.warning("coordinator does not know member %s (%s); joining again",
                               self.member_id, one_line(str(e), 200))
                self.assignment = None
                await self._rejoin()
                continue
            except (PeerUnavailable, RpcTimeout) as e:
                if self._stopping:
                    return
                if self.connected:
                    logger.warning("coordinator %s unreachable (%s); still serving, retrying "
                                   "every %.1f s", cfg.coordinator, e, period)
                self.connected = False
                await self._reset_channel()
                continue
            except PollinateError as e:
                logger.error("heartbeat refused: %s", e)
                continue
            except Exception:  # a bug must not end the heartbeats: the lease would run out
                if self._stopping:
                    return
                logger.exception("heartbeat failed unexpectedly; retrying on a fresh channel")
                await self._reset_channel()
                continue
            if not self.connected:
                logger.info("coordinator %s reachable again", cfg.coordinator)
            self.connected = True
            self.heartbeats_ok += 1
            self.epoch = reply.epoch
            self.span = Span(reply.span.start, reply.span.end)
            if reply.instruction.kind == coordinator_pb2.Instruction.MOVE:
                sp = reply.instruction.span
                self._start_move(Span(sp.start, sp.end), reply.instruction.reason)

    async def _beat(self, request: coordinator_pb2.HeartbeatRequest) -> coordinator_pb2.HeartbeatReply:
        """One heartbeat on this member's HeartbeatStream, opened on first use and after any
        failure (the coordinator binds a stream to one member, so a re-join opens a new one)."""
        cfg = self.config
        if self._unary:
            with translate_rpc_errors(peer=cfg.coordinator):
                return await self._get_stub().Heartbeat(request, timeout=cfg.rpc_timeout_s,
                                                        metadata=self._metadata("Heartbeat", request))
        try:
            with translate_rpc_errors(peer=cfg.coordinator):
                if self._stream is None:
                    self._stream = self._get_stub().HeartbeatStream(metadata=self._metadata("HeartbeatStream"))
                stream = self._stream  # stop() may close it meanwhile: this beat ends on this stream
                await asyncio.wait_for(stream.write(request), cfg.rpc_timeout_s)
                reply = await asyncio.wait_for(stream.read(), cfg.rpc_timeout_s)
        except asyncio.InvalidStateError:
            # The call ended between two beats (the coordinator died or is stopping); grpc.aio
            # says so on write, without the status.
            self._close_stream()
            raise PeerUnavailable(f"coordinator {cfg.coordinator} ended the heartbeat stream") from None
        except ProtocolMismatch:
            self._close_stream()
            logger.warning("coordinator %s has no HeartbeatStream (an older version); "
                           "heartbeating with unary calls", cfg.coordinator)
            self._unary = True
            return await self._beat(request)
        except BaseException:
            self._close_stream()
            raise
        if reply is grpc.aio.EOF:  # the coordinator is stopping: a new stream next beat
            self._close_stream()
            raise PeerUnavailable(f"coordinator {cfg.coordinator} ended the heartbeat stream")
        return reply

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    async def _rejoin(self) -> None:
        now = asyncio.get_running_loop().time()
        if now < self._next_rejoin:
            return
        try:
            await self._join_once()
        except (PeerUnavailable, RpcTimeout) as e:
            logger.info("re-join failed (%s); will retry", e)
            return
        except PollinateError as e:
            self._rejoin_pause = min(max(2 * self._rejoin_pause, 1.0), REJOIN_BACKOFF_MAX_S)
            self._next_rejoin = now + self._rejoin_pause
            if str(e) != self._refused:  # a quarantined node would otherwise log this every second for a day
                logger.error("re-join refused: %s (trying again at most every %.0f s)", e, REJOIN_BACKOFF_MAX_S)
            self._refused = str(e)
            return
        self._rejoin_pause, self._refused = 0.0, None
        self.rejoins += 1
        if self.span != self.serving_span:
            self._start_move(self.span, "assigned on re-join")

    def _start_move(self, span: Span, reason: str) -> None:
        if self._moving_to == span:
            return  # already loading it; the coordinator repeats MOVE until we report it
        logger.info("coordinator asks to serve blocks %s: %s", span, reason)
        if self._move_task is not None:
            self._move_task.cancel()
        self._moving_to = span
        if self._on_move is None:
            self.serving_span = span
            self._moving_to = None
            return
        self._move_task = asyncio.create_task(self._run_move(span, reason), name="coordinator-move")

    async def _run_move(self, span: Span, reason: str) -> None:
        try:
            await self._on_move(span, reason)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("loading blocks %s failed; the coordinator will ask again", span)
        else:
            self.serving_span = span
        finally:
            if self._moving_to == span:
                self._moving_to = None


@contextlib.asynccontextmanager
async def _coordinator_stub(address: str, token: str, *, tls: bool, tls_root_cert_file: Path | None):
    """A CoordinatorStub on a channel of its own, closed after; gRPC errors in the block arrive
    as PollinateError subclasses."""
    channel = open_channel(address, ChannelConfig(token=token, tls=tls, tls_root_cert_file=tls_root_cert_file,
                                                  max_message_bytes=COORDINATOR_MAX_MESSAGE_BYTES))
    try:
        with translate_rpc_errors(peer=address):
            yield coordinator_pb2_grpc.CoordinatorStub(channel)
    finally:
        await channel.close()


async def call_coordinator(address: str, token: str, method: str, request, *, timeout_s: float = 10.0,
                           tls: bool = False, tls_root_cert_file: Path | None = None):
    """One unary RPC to the coordinator on a channel of its own (CLI commands, the trainer's
    job registration); gRPC errors arrive as PollinateError subclasses."""
    async with _coordinator_stub(address, token, tls=tls, tls_root_cert_file=tls_root_cert_file) as stub:
        return await getattr(stub, method)(request, timeout=timeout_s)


async def fetch_committed_state(address: str, token: str, request: coordinator_pb2.GetCommittedStateRequest, *,
                                timeout_s: float = 10.0, tls: bool = False, tls_root_cert_file: Path | None = None):
    """call_coordinator's GetCommittedState: the state in pieces (GetCommittedStateInPieces,
    protocol/pieces.py), joined into one reply."""
    async with _coordinator_stub(address, token, tls=tls, tls_root_cert_file=tls_root_cert_file) as stub:
        return await get_committed_state(stub, request, timeout_s=timeout_s)
