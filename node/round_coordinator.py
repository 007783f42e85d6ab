"""A node's round calls to the coordinator: BeginRound, CommitRound, GetCommittedState.

One channel, opened on first use, errors translated to the protocol's (protocol/errors.py). What the calls
mean for a round is node/rounds.py's; the coordinator's side is coordinator/rounds.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable

import torch

from pollinate.compression.outer import OuterStep, state_checksum, state_from_bytes
from pollinate.protocol.identity import NodeIdentity
from pollinate.protocol.channels import COORDINATOR_MAX_MESSAGE_BYTES, ChannelConfig, open_channel
from pollinate.protocol.errors import FailedPrecondition, NotFound, translate_rpc_errors
from pollinate.protocol.pieces import get_committed_state, to_pieces
from pollinate.protocol.v1 import coordinator_pb2, coordinator_pb2_grpc

if TYPE_CHECKING:
    from pollinate.node.rounds import RoundConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CommittedState:
    """The coordinator's last committed state of a (job, span), its checksum verified."""

    round: int
    checksum: str
    shared: dict[str, torch.Tensor]  # {"global", "momentum"}: DiLoCoMember.load_shared_state's input


class RoundCoordinator:
    """``member_id``: a callable, since the id changes when the node re-joins."""

    def __init__(self, config: RoundConfig, *, address: str, token: str, member_id: Callable[[], str],
                 identity: NodeIdentity, tls: bool = False,
                 tls_root_cert_file: Path | None = None) -> None:
        self.config = config
        self._identity = identity  # rounds are calls in the member's name: signed by its key
        self.address = address
        self.token = token
        self.member_id = member_id
        self._tls = {"tls": tls, "tls_root_cert_file": tls_root_cert_file}
        self._channel = None

    def _metadata(self, method: str, request) -> tuple[tuple[str, str], ...]:
        return self._identity.call_metadata(f"/pollinate.v1.Coordinator/{method}", request)

    def _stub(self) -> coordinator_pb2_grpc.CoordinatorStub:
        if self._channel is None:
            self._channel = open_channel(self.address, ChannelConfig(
                token=self.token, max_message_bytes=COORDINATOR_MAX_MESSAGE_BYTES, **self._tls))
        return coordinator_pb2_grpc.CoordinatorStub(self._channel)

    async def begin(self, job: str, span, r: int, tokens: int):
        """BeginRound: (reply, request bytes, reply bytes). The reply names the group (shard
        order), our shard, the attempt and whether the commit must carry the whole state."""
        request = coordinator_pb2.BeginRoundRequest(job=job, span=span, round=r, member_id=self.member_id(),
                                                    tokens=tokens)
        with translate_rpc_errors(peer=self.address):
            reply = await self._stub().BeginRound(request, timeout=self.config.begin_timeout_s,
                                                  metadata=self._metadata("BeginRound", request))
        return reply, request.ByteSize(), reply.ByteSize()

    async def commit(self, job: str, span, r: int, attempt: int, me: str, checksum: str, *, own: tuple[int, bytes],
                     step: OuterStep, traffic: tuple[int, int, int, int], send_state: bool,
                     state: Callable[[], Awaitable[bytes]],
                     base_state: Callable[[], Awaitable[bytes]]) -> tuple[int, int]:
        """CommitRound: our checksum, our shard's result frame and the outer step; the state the
        round started from (``await base_state()``) where BeginRound said send_state (the
        coordinator holds no previous state); the whole new state (``await state()``) only
        where the reply asks for it. ``traffic``: the attempt's bytes so far (ShardExchange.traffic), reported
        with it. Raises unless committed; returns the bytes of the CommitRound messages."""
        sent = received = 0
        request = coordinator_pb2.CommitRoundRequest(
            job=job, span=span, round=r, member_id=me, checksum=checksum, attempt=attempt,
            bytes_sent=traffic[0], bytes_received=traffic[1], coordinator_bytes_sent=traffic[2],
            coordinator_bytes_received=traffic[3], base_state=await base_state() if send_state else b"",
            results=[coordinator_pb2.ShardResultFrame(shard_index=own[0], payload=own[1])],
            outer=coordinator_pb2.OuterStepSettings(
                codec=step.codec, codec_params_json=step.params_json(), lr=step.lr,
                momentum=step.momentum, nesterov=step.nesterov))
        for _ in range(2):  # the second call only if asked for the state
            with translate_rpc_errors(peer=self.address):
                done = await self._stub().CommitRoundInPieces(to_pieces(request), timeout=self.config.commit_timeout_s,
                                                              metadata=self._metadata("CommitRound", request))
            sent, received = sent + request.ByteSize(), received + done.ByteSize()
            if not done.send_state:
                break
            request = coordinator_pb2.CommitRoundRequest(
                job=job, span=span, round=r, member_id=me, checksum=checksum, attempt=attempt,
                state=await state())
        if not done.committed:
            raise FailedPrecondition(f"round {r} not committed: {done.reason}")
        return sent, received

    async def committed_state(self, job: str, span) -> CommittedState | None:
        """The last committed state of (job, span), None if nothing is committed; raises
        FailedPrecondition if it does not match its checksum."""
        try:
            with translate_rpc_errors(peer=self.address):
                got = await get_committed_state(self._stub(), coordinator_pb2.GetCommittedStateRequest(
                    job=job, span=span), timeout_s=self.config.begin_timeout_s)
        except NotFound:
            return None
        shared = state_from_bytes(got.state)
        if state_checksum(shared["global"], shared["momentum"]) != got.checksum:
            raise FailedPrecondition(f"committed state of round {got.round} does not match its checksum")
        return CommittedState(round=int(got.round), checksum=got.checksum, shared=shared)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


__all__ = ["CommittedState", "RoundCoordinator"]
