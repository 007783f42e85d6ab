"""Join's check of the address a member announces: can anyone else dial it?

    check = AddressCheck(config.addresses, local_hosts=interface_hosts())
    await check.joining("10.0.0.7:7100", peer_host="10.0.0.7")   # FailedPrecondition, or None

Two tests, in this order. The pure one (protocol/addresses.py): 0.0.0.0 is never dialable
and loopback only from this machine; `peer_host` is the joiner's IP as gRPC saw the call.
Then, for a joiner on another machine, a dial-back: one TCP connect to the announced
host:port with a short timeout (a node listens on its port before it joins). Each test
refuses, warns (logs and admits) or is off, per AddressCheckConfig. A refusal travels as
FAILED_PRECONDITION with a message that names the flag to change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from pollinate.coordinator.config import AddressCheckConfig
from pollinate.protocol.addresses import announced_address_problem, is_loopback, probe_tcp, split_host_port
from pollinate.protocol.identity import proves_address
from pollinate.protocol.errors import FailedPrecondition
from pollinate.protocol.relay import dialer as relay_dialer
from pollinate.protocol.relay import is_relayed

logger = logging.getLogger(__name__)


class AddressCheck:
    def __init__(self, config: AddressCheckConfig, *, local_hosts: Iterable[str] = (),
                 serves_others: bool = False) -> None:
        self.config = config
        self.local_hosts = frozenset(local_hosts)
        # The coordinator itself announces a non-loopback address: other machines are
        # expected, so a local member announcing loopback is worth a warning.
        self.serves_others = serves_others
        self.counters = {"refused": 0, "warned": 0, "dialed_back": 0}

    def is_local(self, peer_host: str) -> bool:
        return not peer_host or is_loopback(peer_host) or peer_host in self.local_hosts

    async def joining(self, address: str, *, peer_host: str) -> None:
        """Raise FailedPrecondition if `address` must be refused; log a warning if it is
        doubtful and the config says warn."""
        cfg = self.config
        if is_relayed(address):
            await self._relayed(address)
            return
        try:
            split_host_port(address)
        except ValueError:
            return  # malformed: Membership.join refuses it with INVALID_ARGUMENT
        if cfg.undialable != "off" and peer_host:
            problem = announced_address_problem(address, peer_host=peer_host, local_hosts=self.local_hosts)
            if problem is not None:
                self._verdict(cfg.undialable, problem)
                return  # warned: dialing it back would only fail again
        if self.serves_others and cfg.undialable != "off" and is_loopback(split_host_port(address)[0]):
            self.counters["warned"] += 1
            logger.warning("member at %s announces a loopback address: only clients on this machine can "
                           "reach it (start it with --host 0.0.0.0 to serve the others)", address)
        if cfg.dial_back == "off" or self.is_local(peer_host):
            return
        self.counters["dialed_back"] += 1
        error = await asyncio.to_thread(probe_tcp, address, cfg.dial_timeout_s)
        if error is not None:
            self._verdict(cfg.dial_back, (
                f"the coordinator cannot connect to the announced address {address} ({error} within "
                f"{cfg.dial_timeout_s:g} s); open that TCP port in the node's firewall (or forward it on "
                f"its router) and announce the address others reach it at with --announce-host"))

    async def _relayed(self, address: str) -> None:
        """A relayed address is dialled back through its relays (the stream only: the node's
        gRPC answers on the other end of it)."""
        if self.config.dial_back == "off":
            return
        self.counters["dialed_back"] += 1
        error = await relay_dialer().check(address)
        if error is not None:
            self._verdict(self.config.dial_back, (
                f"the coordinator cannot reach the node through its relays ({error}); the node has "
                f"no reservation at any relay it names"))

    def _verdict(self, mode: str, problem: str) -> None:
        if mode == "refuse":
            self.counters["refused"] += 1
            logger.warning("join refused: %s", problem)
            raise FailedPrecondition(problem)
        self.counters["warned"] += 1
        logger.warning("join admitted with a doubtful address: %s", problem)


async def holder_answers(address: str, holder_key: str, timeout_s: float) -> bool:
    """Does the member holding `address` still serve there? Its node's Health, given a fresh
    challenge, answers with a signature by the holder's key (protocol/identity.py). A Join
    with another key takes such an address only when this is False: the holder is gone (a
    crashed node whose lease has not run out yet), or what answers there is another process
    (the restarted node, still loading). Anything but a valid signature counts as gone."""
    import secrets

    from pollinate.protocol.channels import open_channel, peer_channel_config
    from pollinate.protocol.v1 import common_pb2, node_pb2_grpc

    challenge = secrets.token_hex(16)
    channel = open_channel(address, peer_channel_config(None))  # Health needs no token
    try:
        reply = await node_pb2_grpc.NodeStub(channel).Health(common_pb2.HealthRequest(challenge=challenge),
                                                              timeout=timeout_s)
    except Exception:  # grpc.aio.AioRpcError: nothing answers, or not a node
        return False
    finally:
        await channel.close()
    return proves_address(holder_key, challenge, reply.proof)
