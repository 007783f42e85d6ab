"""Whether this node can be dialled, and serving through a relay when it cannot.

    mode = decide(config, probe)                  # before the DHT starts (it forks)
    relay = await serve_relayed(mode, port, ...)  # after gRPC's port is listening, before Join

`--reachability auto` (the default with a coordinator) asks the coordinator, from the probe
subprocess, to connect to the announced host:port while a plain socket listens on it; if it
cannot, the node serves through a libp2p circuit relay (protocol/relay.py) at the relays the
coordinator names. `direct` never relays (a node whose port is forwarded), `relay` always
does (a node that knows it is behind NAT, and the tests).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pollinate.protocol.relay import RelayedServer

logger = logging.getLogger(__name__)

REACHABILITY_MODES = ("auto", "direct", "relay")
# Seconds a relay's TCP port may take to accept before it is left out of a reservation: a
# live relay on a home link answers in well under a second; a dead host may never answer.
RELAY_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True, kw_only=True)
class Reachability:
    """What the node decided before starting."""

    relayed: bool
    relays: tuple[str, ...] = ()  # multiaddrs of the relays to reserve at
    why: str = ""  # for the log: the coordinator's dial-back result, or the flag


def decide(mode: str, *, checked_address: str | None, reachable: bool | None, detail: str,
           relays: tuple[str, ...]) -> Reachability:
    """The node's mode from --reachability and the coordinator's dial-back (None: not asked)."""
    if mode == "direct":
        return Reachability(relayed=False, why="--reachability direct")
    if mode == "relay":
        why = "--reachability relay"
    elif reachable is False:
        why = f"the coordinator cannot connect to {checked_address} ({detail or 'no answer'})"
    else:
        return Reachability(relayed=False, why=f"the coordinator connected to {checked_address}")
    if not relays:
        raise SystemExit(f"pollinate node: {why}, and the coordinator offers no relay (it runs with "
                         "--no-relay and no member offers --relay); forward this node's port on the "
                         "router and start it with --announce-host PUBLIC_IP --reachability direct")
    return Reachability(relayed=True, relays=relays, why=why)


async def _ask_coordinator(coordinator: str, token: str | None, tls: dict, method: str, request):
    """One unary call to the coordinator on a channel of its own (the node's member client
    may not exist yet)."""
    from pollinate.protocol.channels import ChannelConfig, open_channel
    from pollinate.protocol.errors import translate_rpc_errors
    from pollinate.protocol.v1 import coordinator_pb2_grpc

    channel = open_channel(coordinator, ChannelConfig(token=token, **tls))
    try:
        with translate_rpc_errors(peer=coordinator):
            return await getattr(coordinator_pb2_grpc.CoordinatorStub(channel), method)(request, timeout=30.0)
    finally:
        await channel.close()


def coordinator_check(coordinator: str, token: str | None, tls: dict):
    """check(address) -> (reachable, detail) through the coordinator's CheckReachable."""
    from pollinate.protocol.v1 import coordinator_pb2

    async def check(address: str) -> tuple[bool, str]:
        reply = await _ask_coordinator(coordinator, token, tls, "CheckReachable",
                                       coordinator_pb2.CheckReachableRequest(address=address))
        return reply.reachable, reply.detail

    return check


def coordinator_relays(coordinator: str, token: str | None, tls: dict):
    """relays() -> the relays the coordinator offers now (its Status)."""
    from pollinate.protocol.v1 import coordinator_pb2

    async def relays() -> tuple[str, ...]:
        reply = await _ask_coordinator(coordinator, token, tls, "Status", coordinator_pb2.StatusRequest())
        return tuple(reply.relays)

    return relays


async def watch_relays(address: str, *, check, relays, period_s: float, failures_allowed: int = 2):
    """Returns the relays to reserve at anew once `address` has failed `failures_allowed`
    checks in a row (every period_s: a watchdog's period, not a wait for readiness) and the
    coordinator offers at least one relay; runs until then."""
    failures = 0
    while True:
        await asyncio.sleep(period_s)
        try:
            reachable, detail = await check(address)
        except Exception as exc:  # the coordinator unreachable: not the relays' fault
            logger.info("relay check skipped: %s", exc)
            continue
        failures = 0 if reachable else failures + 1
        if failures:
            logger.info("relay check %d of %d failed: %s", failures, failures_allowed, detail)
        if failures < failures_allowed:
            continue
        try:
            offered = await relays()
        except Exception as exc:  # as above: ask again at the next check
            logger.info("relay check: the coordinator's relays unknown: %s", exc)
            continue
        if offered:
            logger.warning("no relay reaches this node any more (%s); reserving at the %d relay(s) on offer",
                           detail, len(offered))
            return offered
        logger.warning("no relay reaches this node (%s) and the coordinator offers none", detail)


async def answering_relays(relays: Sequence[str], timeout_s: float = RELAY_PROBE_TIMEOUT_S) -> list[str]:
    """Those of `relays` whose host:port accepts a TCP connection now (a multiaddr without one
    is kept); all of them if none does, so that the reservation fails with the daemon's own
    error. p2pd's autorelay given a dead relay among its trusted ones did not reserve at the
    live one for the whole 60 s wait (test_relay under load: a SIGKILLed relay still within
    its lease was on offer beside a fresh one); given the live one alone it reserved at once."""
    from pollinate.protocol.addresses import maddr_tcp_address, probe_tcp

    async def answers(relay: str) -> bool:
        address = maddr_tcp_address(relay)
        return address is None or await asyncio.to_thread(probe_tcp, address, timeout_s) is None

    alive = [r for r, ok in zip(relays, await asyncio.gather(*map(answers, relays))) if ok]
    if alive and len(alive) < len(relays):
        logger.info("left out %d relay(s) that do not answer: %s", len(relays) - len(alive),
                    ", ".join(sorted(set(relays) - set(alive))))
    return alive or list(relays)


async def serve_relayed(reach: Reachability, port: int, *, host: str, check,
                        timeout_s: float) -> tuple[RelayedServer, str]:
    """Start the relayed side of this node (streams into its gRPC port `port`, bound on `host`)
    at those of the relays that answer, and wait until the coordinator reaches it through a
    relay. `check(address)` is the coordinator's CheckReachable: (reachable, detail). Returns
    the server and the address."""
    server = RelayedServer()
    target = "127.0.0.1" if host.strip("[]") in ("0.0.0.0", "::") else host.strip("[]")
    deadline = time.monotonic() + timeout_s
    pause = 0.2
    try:
        address = await server.start(await answering_relays(reach.relays), port, host=target)
        while True:
            reachable, detail = await check(address)
            if reachable:
                break
            if time.monotonic() + pause > deadline:
                raise SystemExit(f"pollinate node: no relay reservation within {timeout_s:g} s ({detail}); "
                                 f"relays tried: {', '.join(reach.relays)}")
            await asyncio.sleep(pause)  # the reservation is being made: poll its readiness
            pause = min(pause * 2, 2.0)
    except BaseException:  # the daemon's start, the check or the timeout failed: no daemon left behind
        await server.stop()
        raise
    logger.info("relayed: %s; reachable through %d relay(s) as peer %s", reach.why, len(reach.relays),
                server.p2p.peer_id.to_base58())
    return server, address
