"""The coordinator process: store + membership + gRPC + HTTP status + timers, and the
swarm's bootstrap DHT peer.

    dht = start_bootstrap_dht(config.dht)        # first: it forks (before any gRPC object)
    async with CoordinatorServer(config, dht=dht) as server:
        print(server.grpc_address, server.http_address)
        await server.wait_closed()

start() restores members from the data directory, binds gRPC (and HTTP), starts the
eviction and rebalance timers, then writes the ready file. stop(grace) undoes it in reverse.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pollinate import __version__
from pollinate.coordinator.config import CoordinatorConfig, DhtConfig
from pollinate.coordinator.http_status import HttpStatusServer, ask_node_info
from pollinate.coordinator.jobs import Jobs
from pollinate.coordinator.membership import Membership
from pollinate.coordinator.status import snapshot
from pollinate.coordinator.store import Store

logger = logging.getLogger(__name__)

# Committed rounds (all jobs, newest) the status snapshot carries for rates and the last
# round's metrics, and a job's page plots. Bounded so a status call stays a few ms on a
# long-running swarm; the store keeps them all.
STATUS_ROUNDS = 200
JOB_ROUNDS = 2000


def start_bootstrap_dht(config: DhtConfig) -> Any | None:
    """Start the hivemind DHT peer that nodes and clients bootstrap from (None if disabled).

    A hivemind DHT runs in a forked process; call this before the process creates any gRPC
    channel or server, since forking after gRPC's threads exist is unsafe."""
    if not config.enabled:
        return None
    import hivemind  # heavy (torch, libp2p daemon): only when a DHT is wanted

    from pollinate.protocol.errors import SetupError

    # A relay must know itself reachable, or libp2p keeps its relay service off until AutoNAT
    # confirms it (which a lab or a small swarm may never do).
    dht = hivemind.DHT(start=False, host_maddrs=list(config.host_maddrs),
                       announce_maddrs=list(config.announce_maddrs) or None,
                       force_reachability="public" if config.relay else None)
    try:
        dht.run_in_background(await_ready=True, timeout=config.start_timeout_s)
    except Exception as e:  # the daemon's own message: a taken port, an address not ours
        detail = " ".join(str(e).split()) or type(e).__name__
        raise SetupError(f"the bootstrap DHT peer could not listen on {', '.join(config.host_maddrs)} "
                         f"({detail}); check --host, --dht-port and --dht-host-maddr") from None
    if not dht.is_alive():
        raise SetupError(f"bootstrap DHT did not start within {config.start_timeout_s} s")
    logger.info("bootstrap DHT peer at %s", ", ".join(str(a) for a in dht.get_visible_maddrs()))
    return dht


def write_ready_file(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename) so a reader never sees half a file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


class CoordinatorServer:
    def __init__(self, config: CoordinatorConfig, *, dht: Any | None = None) -> None:
        self.config = config
        self.dht = dht
        self.store = Store(config.store)
        self.membership = Membership(config.membership, self.store)
        self.jobs = Jobs(self.store, base_model=config.membership.model_id)
        self.started_at = time.time()
        self._dht_peers: list[str] = []
        self._announce_host = config.host
        self._rpc = None
        self._servicer = None
        self.quarantine = None  # coordinator/quarantine.py, made in start()
        self._http: HttpStatusServer | None = None
        self._timers: list[asyncio.Task] = []
        self._closed = asyncio.Event()

    # ---- public -----------------------------------------------------------------------

    @property
    def grpc_address(self) -> str:
        """host:port others dial: the announced host (protocol/addresses.py) and the bound port."""
        from pollinate.protocol.addresses import join_host_port

        return join_host_port(self._announce_host, self._rpc.port)

    @property
    def http_address(self) -> str | None:
        return self._http.address if self._http is not None else None

    @property
    def dht_initial_peers(self) -> list[str]:
        return list(self._dht_peers)

    @property
    def relays(self) -> list[str]:
        """Circuit relays for nodes that cannot be dialled: this coordinator's DHT peer (unless
        --no-relay), then every member that offered its own (--relay)."""
        own = self._dht_peers if self.config.dht.relay else []
        offered = [m.relay_maddr for m in self.membership.members.values() if m.relay_maddr]
        return list(dict.fromkeys([*own, *offered]))

    def status(self) -> dict[str, Any]:
        return snapshot(self.membership, dht_initial_peers=self._dht_peers,
                        started_at=self.started_at, version=__version__, jobs=self.jobs.list(),
                        rounds=self.store.last_committed_rounds(),
                        history=self.store.round_history(limit=STATUS_ROUNDS),
                        latest=self.store.round_history(latest_only=True, limit=STATUS_ROUNDS),
                        totals=self.store.round_totals(),
                        coordinator_address=self.grpc_address if self._rpc is not None else "",
                        relays=self.relays,
                        quarantined=list(self.quarantine.nodes().values()) if self.quarantine else [])

    async def start(self) -> None:
        from pollinate.coordinator.service import CoordinatorServicer
        from pollinate.protocol.channels import COORDINATOR_MAX_MESSAGE_BYTES, RpcServer, ServerConfig
        from pollinate.protocol.v1 import coordinator_pb2_grpc

        cfg = self.config
        self.store.open()
        self.membership.restore()
        from pollinate.coordinator.checkpoints import Checkpoints

        # retention as the settings now say (a cap changed across the restart applies at once;
        # files of rounds pruned just before a kill are deleted)
        self.checkpoints = Checkpoints(self.store, max_bytes=cfg.rounds.checkpoint_max_bytes)
        self.checkpoints.apply()
        if self.dht is not None:
            from pollinate.protocol.addresses import dialable_maddrs

            self._dht_peers = dialable_maddrs(self.dht.get_visible_maddrs())
        from pollinate.coordinator.rounds import Rounds

        from pollinate.coordinator.address_check import AddressCheck
        from pollinate.protocol.addresses import choose_announce_host, interface_hosts, is_loopback

        from pollinate.protocol.errors import SetupError

        try:
            announce = choose_announce_host(cfg.host, cfg.announce_host)
        except ValueError as e:
            raise SetupError(str(e)) from None
        self._announce_host = announce.host
        if announce.host != cfg.host:
            logger.info("bound to %s; announcing %s (%s)", cfg.host, announce.host, announce.reason)
        from pollinate.coordinator.evidence import EvidenceJudge
        from pollinate.coordinator.quarantine import Quarantine

        address_check = AddressCheck(cfg.addresses, local_hosts=interface_hosts() | {announce.host, cfg.host},
                                     serves_others=not is_loopback(announce.host))
        self.quarantine = Quarantine(cfg.quarantine, self.store, self.membership,
                                     judge=EvidenceJudge(cfg.quarantine, self.membership, token=cfg.token,
                                                         is_local=address_check.is_local))
        swarm_ca = None
        if cfg.data_tls:
            from pollinate.protocol.data_tls import SwarmCA, use_swarm_ca

            swarm_ca = SwarmCA.load_or_create(cfg.store.data_dir)
            use_swarm_ca(swarm_ca.cert_pem)  # its own dials to nodes (the address challenge) verify too
        self._servicer = CoordinatorServicer(
            self.membership, dht_initial_peers=lambda: self._dht_peers, status=self.status,
            swarm_ca=swarm_ca, data_tls_cert_validity_s=cfg.data_tls_cert_validity_s,
            rounds=Rounds(cfg.rounds, self.store, self.membership, checkpoints=self.checkpoints), jobs=self.jobs,
            quarantine=self.quarantine, address_check=address_check,
        )
        self._rpc = RpcServer(ServerConfig(host=cfg.host, port=cfg.port, token=cfg.token,
                                           max_send_message_bytes=COORDINATOR_MAX_MESSAGE_BYTES,
                                           grace_s=cfg.stop_grace_s, tls_cert_file=cfg.tls_cert_file,
                                           tls_key_file=cfg.tls_key_file))
        self._rpc.add(coordinator_pb2_grpc.add_CoordinatorServicer_to_server, self._servicer)
        await self._rpc.start()
        if cfg.http_port >= 0:
            self._http = HttpStatusServer(cfg.host, cfg.http_port, self.status,
                                          history=lambda job: self.store.round_history(job, limit=JOB_ROUNDS),
                                          node_info=lambda address: ask_node_info(address, token=cfg.token),
                                          analysis=self.store.analyses)
            await self._http.start()
        self._timers = [
            asyncio.create_task(self._every(cfg.membership.eviction_interval_s,
                                            self.membership.evict_expired), name="evict"),
            asyncio.create_task(self._every(cfg.membership.rebalance_interval_s,
                                            self.membership.rebalance), name="rebalance"),
        ]
        logger.info("coordinator for %s (%d blocks) serving gRPC on %s, epoch %d, %d members",
                    cfg.membership.model_id, cfg.membership.num_blocks, self.grpc_address,
                    self.membership.epoch, len(self.membership.members))
        if cfg.ready_file is not None:
            write_ready_file(cfg.ready_file, {
                "grpc": self.grpc_address, "grpc_bound": self._rpc.address, "tls": cfg.tls_cert_file is not None,
                "data_tls": cfg.data_tls, "http": self.http_address,
                "dht_initial_peers": self._dht_peers, "pid": os.getpid(),
            })

    async def stop(self, grace: float | None = None) -> None:
        if self._servicer is not None:
            self._servicer.serving = False
        for task in self._timers:
            task.cancel()
        if self._timers:
            await asyncio.wait(self._timers, timeout=2.0)
        self._timers = []
        if self._http is not None:
            await self._http.stop()
            self._http = None
        if self._rpc is not None:
            await self._rpc.stop(self.config.stop_grace_s if grace is None else grace)
        self.store.close()
        self._closed.set()

    async def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until stop() has run; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._closed.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def __aenter__(self) -> "CoordinatorServer":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ---- internals --------------------------------------------------------------------

    async def _every(self, period_s: float, action) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                action()
            except Exception:  # a bug in one tick must not stop leases from expiring
                logger.exception("periodic %s failed", getattr(action, "__name__", action))
