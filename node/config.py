"""NodeConfig: everything `pollinate node` needs, built by node/cli.py and nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pollinate.node.announce import AnnounceConfig
from pollinate.node.certificate_renewal import CertificateRenewalConfig
from pollinate.node.handoff import HandoffConfig
from pollinate.node.batching import BatchingConfig
from pollinate.node.kept_inputs import KeptInputsConfig
from pollinate.node.rounds import RoundConfig
from pollinate.node.sessions import SessionConfig


@dataclass(frozen=True, kw_only=True)
class ServingConfig:
    """How the span server treats requests."""

    # Longest wait for the next message of an open Inference stream, seconds. A client that
    # goes quiet longer loses the stream (its session is then closed, cache freed).
    step_timeout_s: float = 120.0
    # Most tokens (batch x sequence) one Forward call or one Inference step may carry;
    # bounds a single request's compute and activation memory. 8192 x 576 fp32 = 18 MiB.
    max_step_tokens: int = 8192
    # Codec for replies when the request names none: the codec of the request's tensor.
    default_reply_codec: str = ""
    # How often idle sessions are swept, seconds.
    sweep_interval_s: float = 10.0
    # Forward inputs kept for their Backward (ForwardHeader.keep_id): byte budget and ttl.
    kept_inputs: KeptInputsConfig = field(default_factory=KeptInputsConfig)
    # Jobs this node trains at once, and the memory their adapters may take: parameter bytes
    # x 4 (weights, gradients and AdamW's two moments), counted when a job is created. A job
    # spec comes from any token holder: without a cap, new job names would fill the node.
    max_jobs: int = 16
    jobs_memory_bytes: int = 2 << 30
    # Concurrent sessions' steps gathered into one pass of the span (node/batching.py).
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    # Bytes the tensors one peer (the caller's IP) is still sending may hold, encoded and
    # decoded, reserved at each tensor's first chunk (node/training_service.py
    # holds_what_it_receives): a request at max_step_tokens of SmolLM2 in fp32 is 38 MB, so
    # six at once; 200 half-sent streams raised a node's RSS by 427 MB before.
    receive_peer_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.receive_peer_bytes <= 0:
            raise ValueError(f"receive_peer_bytes must be > 0, got {self.receive_peer_bytes}")
        if self.max_jobs < 0 or self.jobs_memory_bytes < 0:
            raise ValueError(f"max_jobs and jobs_memory_bytes must be >= 0, got {self.max_jobs}, "
                             f"{self.jobs_memory_bytes}")
        if not self.step_timeout_s > 0:
            raise ValueError(f"step_timeout_s must be > 0, got {self.step_timeout_s}")
        if self.max_step_tokens <= 0:
            raise ValueError(f"max_step_tokens must be > 0, got {self.max_step_tokens}")
        if not self.sweep_interval_s > 0:
            raise ValueError(f"sweep_interval_s must be > 0, got {self.sweep_interval_s}")


def default_identity_file(cache_dir: Path | None, port: int) -> Path | None:
    """Where a node without --identity-file keeps its key pair: <cache_dir>/identity/
    node-<port>.pem when its port is fixed (a restart on that port keeps its identity, and
    nodes of one machine on other ports have their own); None with port 0 (a new key per
    process: nothing about such a node is long-lived)."""
    if port == 0:
        return None
    from pollinate.node.model_files import DEFAULT_CACHE_DIR

    return Path(cache_dir or DEFAULT_CACHE_DIR) / "identity" / f"node-{port}.pem"


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    model: str  # "smollm2" (embedded default), a local directory or .gguf, or a hub id
    start: int | None = None  # first hosted block; None = the coordinator assigns the span
    end: int | None = None  # one past the last hosted block; None with start
    cache_dir: Path | None = None  # converted-model cache; None = ~/.cache/pollinate
    host: str = "127.0.0.1"  # interface the gRPC server and the DHT peer bind
    # Host others dial (Join, DHT records, DHT multiaddr); None = `host`. Differs from it when
    # binding 0.0.0.0 or behind a router (protocol/addresses.py).
    announce_host: str | None = None
    port: int = 0  # 0 = any free port (the bound one goes to the ready file and the DHT)
    dht_port: int = 0  # TCP port of the DHT peer; 0 = any free port
    # "auto": the coordinator dials the announced port back and the node serves through a
    # relay if it cannot (node/reachability.py); "direct": never relay; "relay": always.
    reachability: str = "auto"
    # Offer this node's DHT peer as a circuit relay for nodes that cannot be dialled.
    offer_relay: bool = False
    # A relayed node asks the coordinator to reach it this often, seconds; after two misses in
    # a row (its relays died) it reserves at the relays on offer then and re-joins.
    relay_check_period_s: float = 5.0
    token: str | None = field(default=None, repr=False)  # swarm token; None = no check (tests)
    initial_peers: tuple[str, ...] = ()  # DHT multiaddrs to join; empty = start a new DHT
    ready_file: Path | None = None  # JSON {address, dht_maddrs, peer_id} written once serving
    device: str = "cpu"  # torch device the span runs on
    dtype: str = "float32"  # torch dtype the span computes in
    # The span's Linear weights: "none", "int8", "int4" (node/quant.py), or "auto": int4 on
    # CUDA when the wanted blocks do not fit at full precision, else none (node/sizing.py).
    quant: str = "none"
    # Announced tokens/s for one-token steps through the whole span (node/throughput.py):
    # "auto" = the cached figure for this model, device, dtype and span length, measured on a
    # miss; "eval" = measure again; a number = announce that, measure nothing.
    throughput: float | str = "auto"
    torch_threads: int = 0  # torch intra-op threads; 0 = torch's default
    serving: ServingConfig = field(default_factory=ServingConfig)
    sessions: SessionConfig = field(default_factory=SessionConfig)
    announce: AnnounceConfig = field(default_factory=AnnounceConfig)
    # Session handoff on SIGTERM and on a move (node/handoff.py): codec, hold time, timeouts.
    handoff: HandoffConfig = field(default_factory=HandoffConfig)
    # DiLoCo rounds' waits (BeginRound, ExchangeShard, CommitRound); used with a coordinator
    rounds: RoundConfig = field(default_factory=RoundConfig)
    # The coordinator's gRPC host:port; None = no membership (--blocks and --initial-peers only).
    coordinator: str | None = None
    # Blocks this node offers the coordinator; None = as many as fit in free memory.
    capacity_blocks: int | None = None
    # Longest wait for the coordinator at start-up (probe and join), seconds. 60 s covers a
    # coordinator that is restarting; a node that cannot join exits with a clear error.
    coordinator_timeout_s: float = 60.0
    # TLS towards the coordinator (--coordinator-tls), trusting coordinator_tls_root_cert_file
    # (a swarm's self-signed certificate) or, if None, the system's roots.
    coordinator_tls: bool = False
    coordinator_tls_root_cert_file: Path | None = None
    # The node's key pair (protocol/identity.py), a PEM file made on first use: its identity
    # as a member (it signs Join and the calls in its member's name) and, with --data-tls, its
    # TLS key. None: a new key per process. The CLI's default is default_identity_file().
    identity_file: Path | None = None
    # With a --data-tls coordinator: when to renew the node's short-lived certificate, and how
    # often to retry a failed renewal (node/certificate_renewal.py).
    certificate_renewal: CertificateRenewalConfig = field(default_factory=CertificateRenewalConfig)

    def __post_init__(self) -> None:
        if self.announce_host is None:
            object.__setattr__(self, "announce_host", self.host.strip("[]"))
        if not 0 <= self.dht_port <= 65535:
            raise ValueError(f"dht_port must be in 0..65535, got {self.dht_port}")
        if self.quant not in ("none", "int8", "int4", "auto"):
            raise ValueError(f"quant must be none, int8, int4 or auto, got {self.quant!r}")
        if self.reachability not in ("auto", "direct", "relay"):
            raise ValueError(f"reachability must be auto, direct or relay, got {self.reachability!r}")
        if self.reachability == "relay" and self.coordinator is None:
            raise ValueError("--reachability relay needs --coordinator (it names the relays)")
        if not self.relay_check_period_s > 0:
            raise ValueError(f"relay_check_period_s must be > 0, got {self.relay_check_period_s}")
        if self.offer_relay and self.reachability == "relay":
            raise ValueError("a node served through a relay cannot be one (--relay with --reachability relay)")
        if (self.start is None) != (self.end is None):
            raise ValueError(f"give both start and end or neither, got {self.start}:{self.end}")
        if self.start is None and self.coordinator is None:
            raise ValueError("blocks are required without a coordinator (--blocks or --coordinator)")
        if self.start is not None and not 0 <= self.start < self.end:
            raise ValueError(f"blocks must satisfy 0 <= start < end, got {self.start}:{self.end}")
        if self.coordinator is not None and not self.token:
            raise ValueError("a coordinator needs the swarm token (--token-file)")
        if self.capacity_blocks is not None and self.capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {self.capacity_blocks}")
        if not self.coordinator_timeout_s > 0:
            raise ValueError(f"coordinator_timeout_s must be > 0, got {self.coordinator_timeout_s}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not isinstance(self.throughput, str) and not self.throughput > 0:
            raise ValueError(f"throughput must be > 0, auto or eval, got {self.throughput}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0, got {self.torch_threads}")
