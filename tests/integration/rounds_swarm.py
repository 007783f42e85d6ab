"""A coordinator and N node processes that each host the whole tiny model (N replicas of
span 0:4), for the DiLoCo round tests (test_rounds*.py)."""

from __future__ import annotations

from pathlib import Path


def start_swarm(group, tmp_path: Path, model_dir, cache_dir, *, replicas: int, token: str,
                lease: float = 10.0, window: float = 20.0):
    """(coordinator, nodes), all ready; the token is written to tmp_path/token."""
    (tmp_path / "token").write_text(token + "\n")
    coord = group.start("coordinator", [
        "coordinator", "--data-dir", str(tmp_path / "coord-data"), "--port", "0", "--http-port", "-1",
        "--token-file", str(tmp_path / "token"), "--model", str(model_dir), "--num-blocks", "4",
        "--heartbeat-period", "0.5", "--lease", str(lease), "--round-window", str(window),
    ])
    group.wait_ready([coord], timeout=60)
    nodes = [group.start(f"node-{i}", [
        "node", "--coordinator", coord.info["grpc"], "--token-file", str(tmp_path / "token"),
        "--model", str(model_dir), "--cache-dir", str(cache_dir), "--blocks", "0:4",
        "--throughput", "10", "--torch-threads", "1",
    ]) for i in range(replicas)]
    group.wait_ready(nodes, timeout=120)
    return coord, nodes
