"""Ask a coordinator for the swarm's DHT bootstrap peers, from a short-lived subprocess.

    info = probe_coordinator("10.0.0.1:7070", token, timeout_s=60)   # SwarmInfo
    dht = start_dht(info.dht_initial_peers)                          # then gRPC in this process

Why a subprocess: a hivemind DHT forks a process, so a node or client must start its DHT
before it creates any gRPC object, yet the DHT's bootstrap peers come from the coordinator,
which speaks gRPC. The alternatives were worse: the HTTP status endpoint is optional and on
another port than the HOST:PORT users are given, and a DHT started with no peers and
bootstrapped later leaves a window where lookups see an empty swarm. So the Status RPC
runs in `python -m pollinate.coordinator.probe` (the token goes in on stdin, never argv),
which prints one JSON line and exits; this process stays free of gRPC objects.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Exit code of the probe when the coordinator answered but refused (bad token, ...): no retry.
REFUSED_EXIT = 3
# Seconds a probe subprocess may take beyond its own timeout to start and exit (imports).
STARTUP_ALLOWANCE_S = 60.0


class ProbeError(RuntimeError):
    """The coordinator could not be reached in time, or refused us."""


@dataclass(frozen=True, kw_only=True)
class SwarmInfo:
    model_id: str
    num_blocks: int
    epoch: int
    dht_initial_peers: tuple[str, ...]
    relays: tuple[str, ...] = ()  # circuit relays a node that cannot be dialled may use
    # Asked with check_address: could the coordinator connect to it (None: not asked)?
    reachable: bool | None = None
    unreachable_detail: str = ""
    # The swarm CA's certificate (PEM) when the coordinator runs --data-tls; "": plaintext.
    data_tls_ca_pem: str = ""


def probe_coordinator(address: str, token: str, *, timeout_s: float = 60.0,
                      rpc_timeout_s: float = 5.0, tls: bool = False,
                      tls_root_cert_file: Path | None = None,
                      check_address: str | None = None) -> SwarmInfo:
    """Run the Status RPC in a subprocess, retrying while the coordinator is down, up to timeout_s.
    With tls, over TLS trusting tls_root_cert_file (None: the system's roots). With
    check_address, also ask whether the coordinator can connect to it (CheckReachable)."""
    cmd = [sys.executable, "-m", "pollinate.coordinator.probe", address,
           "--timeout", str(timeout_s), "--rpc-timeout", str(rpc_timeout_s)]
    if check_address:
        cmd += ["--check-address", check_address]
    if tls:
        cmd += ["--coordinator-tls", str(tls_root_cert_file or "")]
    try:
        done = subprocess.run(cmd, input=token + "\n", capture_output=True, text=True,
                              timeout=timeout_s + STARTUP_ALLOWANCE_S)
    except subprocess.TimeoutExpired:
        raise ProbeError(f"coordinator probe of {address} did not finish in "
                         f"{timeout_s + STARTUP_ALLOWANCE_S:g} s") from None
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ProbeError(f"coordinator {address}: {tail}")
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    info = SwarmInfo(model_id=reply["model_id"], num_blocks=reply["num_blocks"],
                     epoch=reply["epoch"], dht_initial_peers=tuple(reply["dht_initial_peers"]),
                     relays=tuple(reply["relays"]), reachable=reply.get("reachable"),
                     unreachable_detail=reply.get("unreachable_detail", ""),
                     data_tls_ca_pem=reply.get("data_tls_ca_pem", ""))
    logger.info("coordinator %s: model %s (%d blocks), epoch %d, DHT peers %s", address,
                info.model_id, info.num_blocks, info.epoch, ", ".join(info.dht_initial_peers))
    return info


async def _status(address: str, token: str, timeout_s: float, rpc_timeout_s: float,
                  tls: dict, check_address: str | None = None) -> dict:
    from pollinate.protocol.channels import ChannelConfig, open_channel
    from pollinate.protocol.errors import PeerUnavailable, RpcTimeout, translate_rpc_errors
    from pollinate.protocol.v1 import coordinator_pb2, coordinator_pb2_grpc

    deadline = time.monotonic() + timeout_s
    pause = 0.2
    while True:
        channel = open_channel(address, ChannelConfig(token=token, **tls))
        try:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            with translate_rpc_errors(peer=address):
                reply = await stub.Status(coordinator_pb2.StatusRequest(), timeout=rpc_timeout_s)
                out = {"model_id": reply.model_id, "num_blocks": reply.num_blocks, "epoch": reply.epoch,
                       "dht_initial_peers": list(reply.dht_initial_peers), "relays": list(reply.relays),
                       "data_tls_ca_pem": reply.data_tls_ca_pem}
                if check_address:
                    check = await stub.CheckReachable(coordinator_pb2.CheckReachableRequest(
                        address=check_address), timeout=rpc_timeout_s + 10.0)
                    out.update(reachable=check.reachable, unreachable_detail=check.detail)
            return out
        except (PeerUnavailable, RpcTimeout) as e:
            if time.monotonic() + pause > deadline:
                raise TimeoutError(f"unreachable for {timeout_s:g} s: {e}") from e
            print(f"coordinator {address} unreachable ({e}); retrying in {pause:.1f} s",
                  file=sys.stderr, flush=True)
        finally:
            await channel.close()  # a fresh channel per try skips gRPC's reconnect backoff
        await asyncio.sleep(pause)
        pause = min(pause * 2, 2.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="print a coordinator's Status (model, DHT peers) as JSON; "
                                            "the swarm token is read from stdin")
    p.add_argument("address", help="the coordinator's gRPC HOST:PORT")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to keep retrying")
    p.add_argument("--rpc-timeout", type=float, default=5.0, help="deadline of each call, seconds")
    p.add_argument("--check-address", default=None,
                   help="also ask whether the coordinator can connect to this HOST:PORT")
    from pollinate.protocol.channels import add_coordinator_tls_argument, coordinator_tls
    from pollinate.protocol.errors import PollinateError

    add_coordinator_tls_argument(p)
    args = p.parse_args(argv)
    token = sys.stdin.readline().strip()

    try:
        tls = coordinator_tls(args.coordinator_tls)
    except ValueError as e:
        print(f"refused: {e}", file=sys.stderr)
        return REFUSED_EXIT
    try:
        reply = asyncio.run(_status(args.address, token, args.timeout, args.rpc_timeout, tls,
                                    args.check_address))
    except TimeoutError as e:
        print(f"unreachable: {e}", file=sys.stderr)
        return 1
    except PollinateError as e:
        print(f"refused: {type(e).__name__}: {e}", file=sys.stderr)
        return REFUSED_EXIT
    print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
