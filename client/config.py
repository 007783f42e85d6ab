"""ClientConfig: how a client talks to the swarm (timeouts, codec, failover, routing)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pollinate.client.routing import RoutingConfig


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    token: str | None = field(default=None, repr=False)  # swarm token sent with every call
    # Codec of hidden states on the wire: "fp16" halves the bytes (DESIGN.md's default);
    # "none" keeps fp32 for exact comparisons against the local model.
    wire_codec: str = "fp16"
    # Longest wait for one hop's answer to one step (or one Forward), seconds. A killed
    # peer is usually noticed at once (connection reset); this bounds a hung one.
    step_timeout_s: float = 30.0
    # Longest wait for the DHT to answer a lookup of one block's records, seconds.
    dht_timeout_s: float = 10.0
    # DHT records are re-read at most this often, seconds (and always after a failure).
    peers_ttl_s: float = 30.0
    # Failures tolerated in one step (each bans a peer and reroutes) before giving up.
    max_failovers: int = 8
    # First ban of a failing peer, seconds; doubles per repeated failure up to ban_max_s.
    ban_base_s: float = 15.0
    ban_max_s: float = 600.0  # longest ban, seconds
    # Let a node that leaves or moves hand this client's sessions to a replica, where they
    # resume without a replay (node/handoff.py). False: the client sends no resume digest,
    # nodes hand nothing off, and a leaving node's sessions are replayed elsewhere.
    handoff: bool = True
    # Share of hop steps checked on other replicas (client/spot_check.py); 0: none. Each check
    # costs a Forward of the hop's whole input so far on another route.
    spot_check_rate: float = 0.0
    # Relative distance ||a - b|| / ||b|| under which two answers agree (honest nodes: <= ~1e-2).
    spot_check_tolerance: float = 0.03
    # The same for a Backward's input gradient (training), where replicas' adapters differ by
    # the inner steps since their last round. docs/security.md has the distances measured.
    spot_check_grad_tolerance: float = 0.03
    # The coordinator (HOST:PORT) a liar a spot check caught is reported to, and whose
    # quarantined nodes routes leave out (re-read with the DHT records); "": neither.
    coordinator: str = ""
    # TLS towards it, as --coordinator-tls: None plaintext, "" system roots, a PEM path.
    coordinator_tls: str | None = None
    routing: RoutingConfig = field(default_factory=RoutingConfig)

    def __post_init__(self) -> None:
        for name in ("step_timeout_s", "dht_timeout_s", "peers_ttl_s", "ban_base_s", "ban_max_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.spot_check_rate <= 1.0:
            raise ValueError(f"spot_check_rate must be in [0, 1], got {self.spot_check_rate}")
        for name in ("spot_check_tolerance", "spot_check_grad_tolerance"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_failovers < 0:
            raise ValueError(f"max_failovers must be >= 0, got {self.max_failovers}")
        if self.token is not None and not self.token:
            raise ValueError("token must be None or non-empty")
