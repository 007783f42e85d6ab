"""The coordinator's MOVE end to end, with real processes: a coordinator and three real nodes
of the tiny model placed by it (0:2 twice, 2:4 once). The only holder of 2:4 is SIGKILLed;
after its lease one of the two 0:2 replicas is told to move, loads 2:4, serves it, and the
coordinator counts its throughput on the new blocks; generation through the swarm works.

Named fault: kill(the only replica of blocks 2:4).
"""

from __future__ import annotations

import time

from procs import ProcGroup
from test_coordinated_swarm import NEW_TOKENS, PROMPT, TOKEN, generate, start_coordinator, status

# Equal, so no move improves the weakest block while every block is served: the only move
# this test sees is the one a hole triggers.
THROUGHPUT = 10.0


def wait_status(coord, predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        current = status(coord)
        if predicate(current):
            return current
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}: {current}"
        time.sleep(0.1)


def test_only_replica_killed_an_over_replicated_node_moves_and_serves_its_span(
        tmp_path, tiny_model_dir, tiny_model_files, tiny_cache_dir, tiny_reference_model):
    import torch

    expected = tiny_reference_model.generate(
        torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=False)[0, len(PROMPT):].tolist()
    (tmp_path / "token").write_text(TOKEN + "\n")
    with ProcGroup(tmp_path) as group:
        coord = start_coordinator(group, tmp_path, "coordinator", tiny_model_dir)
        group.wait_ready([coord], timeout=120)
        address = coord.info["grpc"]
        nodes = [group.start(f"node-{i}", [
            "node", "--coordinator", address, "--token-file", str(tmp_path / "token"),
            "--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir), "--num-blocks", "2",
            "--throughput", str(THROUGHPUT), "--torch-threads", "1",
        ]) for i in range(3)]
        group.wait_ready(nodes, timeout=300)  # three nodes starting at once on 2 shared cores
        # Joins are serialised: whichever comes first gets 0:2, the second 2:4, the third 0:2.
        assert sorted(n.info["blocks"] for n in nodes) == [[0, 2], [0, 2], [2, 4]]
        before = wait_status(coord, lambda s: all(m["state"] == "online" for m in s["members"]),
                             60, "every node online")
        assert [b["replicas"] for b in before["blocks"]] == [2, 2, 1, 1]
        assert before["epoch"] == 3  # three joins, no move

        victim = next(n for n in nodes if n.info["blocks"] == [2, 4])
        doubles = [n for n in nodes if n is not victim]
        victim.kill()  # SIGKILL: it never leaves; only its lease running out tells the coordinator
        killed_at = time.monotonic()
        after = wait_status(
            coord, lambda s: len(s["members"]) == 2 and s["holes"] == []
            and all(m["state"] == "online" for m in s["members"]),
            120, "the lost span to be served again")
        moved_s = time.monotonic() - killed_at
        spans = {m["member_id"]: m["span"] for m in after["members"]}
        movers = [n for n in doubles if spans[n.info["member_id"]] == [2, 4]]
        assert len(movers) == 1, spans
        mover = movers[0]
        stayer = doubles[1] if mover is doubles[0] else doubles[0]
        assert spans[stayer.info["member_id"]] == [0, 2]
        assert after["epoch"] == before["epoch"] + 2  # the eviction, then the move
        # The mover reported the new blocks as served, and the coordinator counts its
        # throughput there (not on its old blocks).
        mover_info = next(m for m in after["members"] if m["member_id"] == mover.info["member_id"])
        assert mover_info["serving_span"] == [2, 4]
        assert mover_info["throughput"] == mover.info["throughput"] == THROUGHPUT
        assert [b["throughput"] for b in after["blocks"]] == [THROUGHPUT] * 4
        assert moved_s < 120, moved_s  # lease 2 s + scan + loading; generous for a loaded machine

        # Clients route from the DHT, where the mover announced 2:4 (and withdrew 0:2).
        assert generate(tiny_model_dir, tiny_cache_dir, "--coordinator", address) == expected
        assert mover.alive() and stayer.alive()

