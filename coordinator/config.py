"""Typed configuration of the coordinator's components. The CLI builds these; nothing else
reads argv or the environment."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

# The embedded default model (DESIGN.md, "The model"): SmolLM2-135M-Instruct has 30 decoder
# blocks. The coordinator never loads weights; it only needs the block count.
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_NUM_BLOCKS = 30
# "smollm2" is the name `pollinate node` and the client give the embedded SmolLM2.
KNOWN_MODELS: dict[str, int] = {DEFAULT_MODEL_ID: DEFAULT_NUM_BLOCKS, "smollm2-135m": 30, "smollm2": 30}


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class MembershipConfig:
    # Which model the swarm serves; a join naming another model is refused.
    model_id: str = DEFAULT_MODEL_ID
    # Decoder blocks of that model; spans are windows of [0, num_blocks).
    num_blocks: int = DEFAULT_NUM_BLOCKS
    # Seconds between a member's heartbeats (told to it on join). 1 s: the default,
    # cheap at 2000 members (2000 tiny RPCs/s).
    heartbeat_period_s: float = 1.0
    # Seconds without a heartbeat after which a member is evicted. 5 s: five missed beats,
    # so one slow beat or a GC pause does not evict a healthy node.
    lease_s: float = 5.0
    # Seconds between scans for expired leases; bounds the detection delay beyond lease_s.
    eviction_interval_s: float = 0.25
    # Extra seconds of lease every member gets when a coordinator restarts from its data
    # directory: nodes may have been backing off while it was down. 5 s: one full lease.
    restart_grace_s: float = 5.0
    # Live members allowed per source IP (as seen by gRPC); 0 disables the cap. 64: enough
    # for a whole test swarm on loopback, small enough to blunt a join flood.
    max_members_per_address: int = 64
    # A move is made only if the weakest block's throughput rises by this fraction (or a hole
    # closes). 0.1: Petals' balance_quality 0.75 is looser; 10% keeps churn low.
    rebalance_margin: float = 0.1
    # Seconds between periodic rebalance checks (holes are also checked after every
    # eviction or leave, at once).
    rebalance_interval_s: float = 5.0
    # Moves planned per rebalance check; each is evaluated after the previous.
    max_moves_per_check: int = 8

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("model_id must not be empty")
        if not isinstance(self.num_blocks, int) or self.num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {self.num_blocks!r}")
        for name in ("heartbeat_period_s", "lease_s", "eviction_interval_s",
                     "rebalance_interval_s"):
            _positive(name, getattr(self, name))
        if self.lease_s < self.heartbeat_period_s:
            raise ValueError(
                f"lease_s ({self.lease_s}) must be at least heartbeat_period_s "
                f"({self.heartbeat_period_s}), or every member would be evicted"
            )
        if not (math.isfinite(self.restart_grace_s) and self.restart_grace_s >= 0):
            raise ValueError(f"restart_grace_s must be >= 0, got {self.restart_grace_s!r}")
        if self.max_members_per_address < 0:
            raise ValueError(
                f"max_members_per_address must be >= 0, got {self.max_members_per_address!r}"
            )
        if not (math.isfinite(self.rebalance_margin) and self.rebalance_margin >= 0):
            raise ValueError(f"rebalance_margin must be >= 0, got {self.rebalance_margin!r}")
        if self.max_moves_per_check < 0:
            raise ValueError(f"max_moves_per_check must be >= 0, got {self.max_moves_per_check!r}")


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    # Directory holding coordinator.sqlite3 (and, later, committed adapter states).
    data_dir: Path
    # SQLite `synchronous` in WAL mode. NORMAL: a commit survives the process being killed
    # (the SIGKILL test) without an fsync per heartbeat-free write; FULL also
    # survives power loss at ~1 fsync per membership change.
    synchronous: str = "NORMAL"
    # Seconds SQLite waits on a locked database (another process holding it) before failing.
    busy_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF/NORMAL/FULL/EXTRA, got {self.synchronous!r}")
        _positive("busy_timeout_s", self.busy_timeout_s)


@dataclass(frozen=True, kw_only=True)
class DhtConfig:
    # Run the swarm's bootstrap hivemind DHT peer in this process. Off only in in-process
    # tests: a DHT forks, and forking after gRPC has started is unsafe.
    enabled: bool = True
    # libp2p listen addresses; loopback on an OS-chosen port by default so tests need no
    # free-port guessing. Use /ip4/0.0.0.0/tcp/PORT for a real swarm.
    host_maddrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    # Addresses to advertise instead of the ones the DHT sees (behind NAT).
    announce_maddrs: tuple[str, ...] = ()
    # Let nodes that cannot be dialled (behind NAT) reserve a libp2p circuit relay at this DHT
    # peer (protocol/relay.py). It forwards their encrypted traffic: bandwidth, not trust.
    relay: bool = True
    # Seconds to wait for the DHT process to come up before giving up.
    start_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.enabled and not self.host_maddrs:
            raise ValueError("host_maddrs must name at least one address when the DHT is enabled")
        _positive("start_timeout_s", self.start_timeout_s)


@dataclass(frozen=True, kw_only=True)
class RoundsConfig:
    # How long a round waits for the span's live replicas after the first one asked, seconds.
    window_s: float = 5.0
    # How long CommitRound waits for the other members' checksums, seconds.
    commit_timeout_s: float = 60.0
    # Most bytes of committed states (all jobs) kept in the data directory; beyond it the
    # oldest kept checkpoints are pruned, never a span's last round (coordinator/retention.py).
    # 0 = no coordinator-wide cap: each job's retention schedule (and its own cap) decides.
    checkpoint_max_bytes: int = 0
    # How long a member with standing for a (job, span) (its checksum is in a committed round
    # of it) counts towards the commit majority after it last asked for a round of it, seconds
    # (issue 18, item 4). A replica that stops training the job holds the others' commits back
    # for at most this long; 30 min is several rounds of a CPU job (H=25..100 steps).
    standing_s: float = 1800.0
    # Where no member has standing (round 1, or all of them gone or idle): how long after a
    # member's heartbeat last reported a new optimizer step of the job it counts towards the
    # commit majority, seconds (issue 18, item 4). A replica that stops training holds a
    # newcomer's lone commits back for at most this long; 5 min is tens of CPU steps.
    trained_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("window_s", "commit_timeout_s", "standing_s", "trained_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.checkpoint_max_bytes < 0:
            raise ValueError(f"checkpoint_max_bytes must be >= 0, got {self.checkpoint_max_bytes!r}")


@dataclass(frozen=True, kw_only=True)
class QuarantineConfig:
    """When client reports of a node answering wrong quarantine it (coordinator/quarantine.py)."""

    # Distinct reporters (caller IPs) whose unverified reports quarantine a node (a verified
    # one, coordinator/evidence.py, is enough alone). 2: one hostile client cannot evict an
    # honest node on its own; 1 suits a lab where every client is one machine.
    reporters: int = 2
    # How long a report counts, seconds; a quarantine ends once fewer than `reporters` reports
    # are this recent. 24 h: a day out of the swarm for a node caught lying.
    period_s: float = 86400.0
    # Count reports that carry no signed answer (coordinator/evidence.py) as a reporter's word.
    # Off: such a report is refused, since anyone with the token can make one; a lab with
    # clients older than signed answers may turn it on.
    unverified: bool = False
    # ||signed - re-run|| / ||re-run|| above which the coordinator finds an answer wrong: the
    # clients' default (client/config.py spot_check_tolerance).
    tolerance: float = 0.03
    # Seconds for one member's re-run of a report's evidence.
    verify_timeout_s: float = 20.0
    # Seconds a reporter address whose report other members refuted may not report again:
    # each judged report costs two members a re-run of its input, and a hostile client can
    # make a refuted one from any honest answer. 600: at most one such re-run pair per
    # address per 10 minutes.
    refuted_backoff_s: float = 600.0

    def __post_init__(self) -> None:
        if self.reporters < 1:
            raise ValueError(f"reporters must be >= 1, got {self.reporters!r}")
        if not self.period_s > 0:
            raise ValueError(f"period_s must be > 0, got {self.period_s!r}")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance!r}")
        if not self.verify_timeout_s > 0:
            raise ValueError(f"verify_timeout_s must be > 0, got {self.verify_timeout_s!r}")
        if not self.refuted_backoff_s >= 0:
            raise ValueError(f"refuted_backoff_s must be >= 0, got {self.refuted_backoff_s!r}")


ADDRESS_CHECK_MODES = ("refuse", "warn", "off")


@dataclass(frozen=True, kw_only=True)
class AddressCheckConfig:
    """What Join does about the address a member announces (protocol/addresses.py)."""

    # An address no other machine can dial: 0.0.0.0, or loopback from a joiner on another
    # machine. "refuse" (FAILED_PRECONDITION naming the flag to change), "warn" (log, admit)
    # or "off". Refuse: such a member would only make clients fail later, far from the cause.
    undialable: str = "refuse"
    # Dial the announced host:port back (one TCP connect) when the joiner is on another
    # machine: "refuse", "warn" or "off". A node listens on its port before it joins
    # (node/cli.py), so a failed connect means a firewall, a router or a wrong address.
    dial_back: str = "refuse"
    # Seconds the dial-back connect may take. 3 s: a LAN or WAN handshake takes well under
    # 1 s; a dropped SYN (firewall) is then reported within a join's 5 s RPC deadline.
    dial_timeout_s: float = 3.0

    def __post_init__(self) -> None:
        for name in ("undialable", "dial_back"):
            if getattr(self, name) not in ADDRESS_CHECK_MODES:
                raise ValueError(f"{name} must be one of {ADDRESS_CHECK_MODES}, got {getattr(self, name)!r}")
        _positive("dial_timeout_s", self.dial_timeout_s)


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig:
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    store: StoreConfig
    dht: DhtConfig = field(default_factory=DhtConfig)
    # DiLoCo rounds (coordinator/rounds.py)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    # Interface for gRPC and HTTP. 127.0.0.1: nothing is exposed unless asked for.
    host: str = "127.0.0.1"
    # The host others dial (ready file, logs); None: `host`, or when that is 0.0.0.0 the
    # address of the default route's interface (protocol/addresses.py).
    announce_host: str | None = None
    # Checks of the addresses members announce at Join.
    addresses: AddressCheckConfig = field(default_factory=AddressCheckConfig)
    # Client reports of nodes answering wrong (ReportLiar).
    quarantine: QuarantineConfig = field(default_factory=QuarantineConfig)
    # gRPC port; 0 lets the OS choose (read the bound one from the ready file).
    port: int = 7070
    # HTTP status port (JSON, HTML, /metrics); 0 lets the OS choose, -1 disables it.
    http_port: int = 7071
    # The swarm token every RPC but health must carry. Empty is refused: no open swarms.
    token: str
    # Seconds in-flight RPCs get to finish on stop().
    stop_grace_s: float = 2.0
    # Written (atomically) with the bound addresses as JSON once serving; None: not written.
    ready_file: Path | None = None
    # PEM certificate chain and private key for gRPC: both set = TLS (a plaintext call is
    # refused), both None = plaintext. The HTTP status page stays plain HTTP.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # TLS on the data plane (--data-tls): this coordinator is the swarm's CA (key and
    # certificate in the data directory), certifies each node's address and key after its
    # Join, and tells everyone its certificate in Status; nodes serve TLS and every dialler
    # verifies (protocol/data_tls.py). False: node-to-node and client-to-node gRPC is plaintext.
    data_tls: bool = False
    # Lifetime of a node's data-TLS certificate, seconds (--data-tls-cert-validity). Nothing
    # revokes a certificate: a member that left or was quarantined keeps serving with its last
    # one until it expires, so this bounds how long. A running node renews at about half of
    # it (node/certificate_renewal.py). 3600: an hour, a renewal every half hour per node.
    data_tls_cert_validity_s: float = 3600.0

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("token must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port!r}")
        if not -1 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in [-1, 65535], got {self.http_port!r}")
        if not (math.isfinite(self.stop_grace_s) and self.stop_grace_s >= 0):
            raise ValueError(f"stop_grace_s must be >= 0, got {self.stop_grace_s!r}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
        if not (math.isfinite(self.data_tls_cert_validity_s) and self.data_tls_cert_validity_s >= 2):
            raise ValueError(f"data_tls_cert_validity_s must be at least 2 s, got {self.data_tls_cert_validity_s!r}")
        for path in (self.tls_cert_file, self.tls_key_file):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS file {path} does not exist")
