"""A coordinator and N node processes that each host the whole tiny model (N replicas of
span 0:4), for the DiLoCo round tests (test_rounds*.py)."""

from __future__ import annotations

from pathlib import Path

from pollinate.coordinator.config import StoreConfig
from pollinate.coordinator.store import Store


def committed_rounds(data_dir: Path) -> dict[int, dict]:
    """The coordinator's record of job "rounds" on span 0:4 (read once it has stopped): per
    committed round, Store.round_groups' entry (members and whether each one's checksum is
    in; each member's bytes to the coordinator)."""
    store = Store(StoreConfig(data_dir=data_dir)).open()
    try:
        rounds = store.round_groups(("rounds", 0, 4))
    finally:
        store.close()
    return {r: v for r, v in rounds.items() if v["state"] == "committed"}


def committed_groups(data_dir: Path) -> dict[int, dict[str, bool]]:
    """Per committed round: {member id: whether its checksum is in the commit}."""
    return {r: v["members"] for r, v in committed_rounds(data_dir).items()}


def start_swarm(group, tmp_path: Path, model_dir, cache_dir, *, replicas: int, token: str,
                lease: float = 10.0, window: float = 20.0, coordinator_args: tuple[str, ...] = (),
                node_args: dict[int, tuple[str, ...]] | None = None):
    """(coordinator, nodes), all ready; the token is written to tmp_path/token.
    coordinator_args: more flags for the coordinator (--data-tls); node_args: for node i."""
    (tmp_path / "token").write_text(token + "\n")
    coord = group.start("coordinator", [
        "coordinator", "--data-dir", str(tmp_path / "coord-data"), "--port", "0", "--http-port", "-1",
        "--token-file", str(tmp_path / "token"), "--model", str(model_dir), "--num-blocks", "4",
        "--heartbeat-period", "0.5", "--lease", str(lease), "--round-window", str(window), *coordinator_args,
    ])
    group.wait_ready([coord], timeout=60)
    nodes = [group.start(f"node-{i}", [
        "node", "--coordinator", coord.info["grpc"], "--token-file", str(tmp_path / "token"),
        "--model", str(model_dir), "--cache-dir", str(cache_dir), "--blocks", "0:4",
        "--throughput", "10", "--torch-threads", "1", *(node_args or {}).get(i, ()),
    ]) for i in range(replicas)]
    group.wait_ready(nodes, timeout=120)
    return coord, nodes
