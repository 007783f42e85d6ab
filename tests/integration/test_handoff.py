"""Session handoff with real processes (issue 16): a node sent SIGTERM mid-generation hands its
sessions' KV caches to a replica of its blocks, and the client continues there without replay.

Swarm (module-scoped): A [0:1] (DHT bootstrap), B [1:3] (the replica that receives), C [3:4].
Each test starts its own victim [1:3] announcing a far higher throughput, so the client's
route goes through it; the client pauses after token 5, the victim is stopped with SIGTERM
(it hands off and exits), and the client goes on. fp32 on the wire: tokens must equal the
local model's exactly.
"""

from __future__ import annotations

import sys

import pytest

from procs import ProcGroup  # tests/integration is on sys.path
from test_serving import PROMPT, finish, local_generate, start_client, wait_paused


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, tiny_model_dir, tiny_model_files, tiny_cache_dir):
    work = tmp_path_factory.mktemp("handoff")
    group = ProcGroup(work)
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir), "--torch-threads", "1"]
    try:
        a = group.start("A", ["node", "--blocks", "0:1", "--throughput", "100", *common])
        group.wait_ready([a], timeout=90)
        peers = ["--initial-peers", a.info["dht_maddrs"][0]]
        b = group.start("B", ["node", "--blocks", "1:3", "--throughput", "100", *common, *peers])
        c = group.start("C", ["node", "--blocks", "3:4", "--throughput", "100", *common, *peers])
        group.wait_ready([b, c], timeout=120)
        yield {"group": group, "A": a, "B": b, "C": c, "maddr": a.info["dht_maddrs"][0], "peers": peers,
               "common": common, "model": str(tiny_model_dir), "cache": str(tiny_cache_dir)}
    except BaseException:
        print(group.dump_logs(), file=sys.stderr)
        raise
    finally:
        group.stop_all()


def sigterm_in_use(swarm, name: str, *client_args, node_args=()) -> tuple[dict, object]:
    """Start victim `name` on [1:3], generate through it, SIGTERM it after token 5; (result, victim)."""
    group = swarm["group"]
    victim = group.start(name, ["node", "--blocks", "1:3", "--throughput", "1000000", *node_args,
                                *swarm["common"], *swarm["peers"]])
    group.wait_ready([victim], timeout=120)
    proc = start_client(swarm, PROMPT, "--pause-after", "5", *client_args)
    route = wait_paused(proc)
    assert route[1][0] == victim.info["address"], (route, group.dump_logs())
    assert victim.stop() == 0  # SIGTERM: hands off, announces offline, exits 0
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return finish(proc, swarm), victim


def test_sigterm_hands_the_session_off_and_it_continues_with_the_same_tokens(swarm, tiny_reference_model):
    result, victim = sigterm_in_use(swarm, "V1")
    assert result["tokens"] == local_generate(tiny_reference_model, PROMPT)
    assert (result["handoffs"], result["failovers"]) == (1, 0)  # resumed there, nothing replayed
    assert result["route"][1] == [swarm["B"].info["address"], 1, 3]
    # the position handed off: the prompt and the 5 tokens generated before the pause
    # (the 5th token's own step comes after the pause)
    assert f"handed to this node at position {len(PROMPT) + 4} (lossless codec" in swarm["B"].log_path.read_text()
    assert "handed off 1 session(s) of blocks 1:3" in victim.log_path.read_text()


def test_lossy_handoff_continues_the_session(swarm, tiny_reference_model):
    result, victim = sigterm_in_use(swarm, "V2", node_args=["--handoff", "lossy"])
    assert (result["handoffs"], result["failovers"]) == (1, 0)
    assert len(result["tokens"]) == len(local_generate(tiny_reference_model, PROMPT))
    assert "(lossy codec" in swarm["B"].log_path.read_text()


def test_client_without_handoff_replays(swarm, tiny_reference_model):
    result, victim = sigterm_in_use(swarm, "V3", "--no-handoff")
    assert result["tokens"] == local_generate(tiny_reference_model, PROMPT)
    assert (result["handoffs"], result["failovers"]) == (0, 1)
    assert "handed off" not in victim.log_path.read_text()


def test_failed_handoff_falls_back_to_replay(swarm, tiny_reference_model):
    """The replica that takes the session holds it for 50 ms only: the client's resume is
    refused (NOT_FOUND) and it replays its history, on that replica, with the same tokens."""
    group = swarm["group"]
    # above B's throughput: tried first for the handoff and chosen by the replay's route
    forgetful = group.start("F", ["node", "--blocks", "1:3", "--throughput", "1000", "--handoff-hold", "0.05",
                                  *swarm["common"], *swarm["peers"]])
    group.wait_ready([forgetful], timeout=120)
    try:
        result, victim = sigterm_in_use(swarm, "V4")
        assert result["tokens"] == local_generate(tiny_reference_model, PROMPT)
        assert (result["handoffs"], result["failovers"]) == (0, 1)
        log = forgetful.log_path.read_text()
        assert "was not resumed within 0 s: closed" in log
        assert "no handed-off session" in log  # the refused resume
        assert result["route"][1] == [forgetful.info["address"], 1, 3]
    finally:
        assert forgetful.stop() == 0
