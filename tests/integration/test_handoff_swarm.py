"""Session handoff with real processes (issue 16): a node sent SIGTERM mid-generation hands its
sessions' KV caches to a replica of its blocks, and the client continues there without replay.

Swarm (module-scoped): A [0:1] (DHT bootstrap), B [1:3] (the replica that receives), C [3:4].
The last test has a coordinator swarm of its own, where the coordinator moves the node.
Each test starts its own victim [1:3] announcing a far higher throughput, so the client's
route goes through it; the client pauses after token 5, the victim is stopped with SIGTERM
(it hands off and exits), and the client goes on. fp32 on the wire: tokens must equal the
local model's exactly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    result, victim = sigterm_in_use(swarm, "V1", node_args=["--handoff", "lossless"])
    assert result["tokens"] == local_generate(tiny_reference_model, PROMPT)
    assert (result["handoffs"], result["failovers"]) == (1, 0)  # resumed there, nothing replayed
    assert result["route"][1] == [swarm["B"].info["address"], 1, 3]
    # the position handed off: the prompt and the 5 tokens generated before the pause
    # (the 5th token's own step comes after the pause)
    assert f"handed to this node at position {len(PROMPT) + 4} (lossless codec" in swarm["B"].log_path.read_text()
    assert "handed off 1 session(s) of blocks 1:3" in victim.log_path.read_text()


def test_recompute_handoff_continues_the_session_with_the_local_models_tokens(swarm, tiny_reference_model):
    """The default: the victim sends the session's span inputs (fp32 on this wire) while the
    client is paused; the replica prefills them and the client continues there."""
    result, victim = sigterm_in_use(swarm, "V5")
    assert result["tokens"] == local_generate(tiny_reference_model, PROMPT)
    assert (result["handoffs"], result["failovers"]) == (1, 0)
    assert result["route"][1] == [swarm["B"].info["address"], 1, 3]
    assert f"handed to this node at position {len(PROMPT) + 4} (recompute codec" in swarm["B"].log_path.read_text()
    log = victim.log_path.read_text()
    assert "codec recompute, frozen" in log
    # the client was paused: nothing ran between the history and the freeze
    assert f"pre-copied to {swarm['B'].info['address']} at position {len(PROMPT) + 4}, then 0 more" in log


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


def test_a_node_moved_by_the_coordinator_hands_its_session_to_the_replica_it_leaves(
        tmp_path, tiny_model_dir, tiny_model_files, tiny_cache_dir, tiny_reference_model):
    """Coordinator swarm: A pinned to 0:2, K pinned to 2:4 (strong), then M unpinned, which
    joins the weaker 0:2 and, faster than A, carries the client's session there. K is
    SIGKILLed while the client is paused: the coordinator moves M (the only unpinned member)
    to 2:4. M hands the session's 0:2 cache to A before it frees its old span; the client
    resumes its first hop on A and replays its second (K's) on M's new span."""
    from test_coordinated_swarm import TOKEN, start_coordinator, status
    from test_coordinator_move import wait_status

    (tmp_path / "token").write_text(TOKEN + "\n")
    group = ProcGroup(tmp_path)
    try:
        coord = start_coordinator(group, tmp_path, "coordinator", tiny_model_dir)
        group.wait_ready([coord], timeout=120)
        common = ["--coordinator", coord.info["grpc"], "--token-file", str(tmp_path / "token"),
                  "--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir), "--torch-threads", "1"]
        a = group.start("A", ["node", "--blocks", "0:2", "--throughput", "10", *common])
        k = group.start("K", ["node", "--blocks", "2:4", "--throughput", "40", *common])
        group.wait_ready([a, k], timeout=180)
        m = group.start("M", ["node", "--num-blocks", "2", "--throughput", "20", *common])
        group.wait_ready([m], timeout=180)
        assert m.info["blocks"] == [0, 2]
        swarm = {"model": str(tiny_model_dir), "cache": str(tiny_cache_dir), "maddr": None, "group": group}
        cmd = [sys.executable, str(Path(__file__).with_name("serving_client.py")), "--model", str(tiny_model_dir),
               "--cache-dir", str(tiny_cache_dir), "--coordinator", coord.info["grpc"], "--token", TOKEN,
               "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "12", "--pause-after", "5"]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        route = wait_paused(proc)
        assert [h[0] for h in route] == [m.info["address"], k.info["address"]], route
        k.kill()
        wait_status(coord, lambda s: any(x["member_id"] == m.info["member_id"] and x["serving_span"] == [2, 4]
                                         for x in s["members"]), 120, "M to serve 2:4")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        result = finish(proc, swarm)
        assert result["tokens"] == local_generate(tiny_reference_model, PROMPT)
        assert (result["handoffs"], result["failovers"]) == (1, 1)  # hop 1 resumed on A, hop 2 replayed on M
        assert [h[0] for h in result["route"]] == [a.info["address"], m.info["address"]]
        assert "handed off 1 session(s) of blocks 0:2" in m.log_path.read_text()
        assert "resumed at position" in a.log_path.read_text()
    except BaseException:
        print(group.dump_logs(), file=sys.stderr)
        raise
    finally:
        group.stop_all()
