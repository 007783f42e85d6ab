"""`pollinate demo`'s pieces that decide what it shows: the node layout (two replicas of one
span), the round lines it follows in the node logs, the replica trainer's swarm view, the
task it teaches (held-out questions no trainer sees, how an answer is judged) and the JSON
line it ends with.
The demo itself starts a whole SmolLM2 swarm (minutes); the suite does not run it."""

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest


def test_layout_hosts_the_second_half_twice():
    from pollinate.demo import node_layout

    assert node_layout(30) == [(0, 15), (15, 30), (15, 30)]
    assert node_layout(5) == [(0, 2), (2, 5), (2, 5)]
    with pytest.raises(ValueError, match="cannot cut 1 blocks into 2 spans"):
        node_layout(1)


def _proc(tmp_path: Path, name: str):
    from pollinate.procs import Proc

    popen = subprocess.Popen([sys.executable, "-c", "pass"])
    popen.wait()
    return Proc(name=name, popen=popen, log_path=tmp_path / f"{name}.log", ready_path=None)


def test_log_follower_prints_each_round_line_once_and_waits_for_whole_lines(tmp_path):
    from pollinate.demo import ROUND_LINE, LogFollower

    a, b = _proc(tmp_path, "node-2"), _proc(tmp_path, "node-3")
    follower = LogFollower([a, b], ROUND_LINE)
    assert follower.new() == []  # no log yet
    committed = ("round 1 of job demo-sums span 15:30 committed here (attempt 1, group of 2), "
                 "12.3 kB sent+received, 0.41 s")
    a.log_path.write_text("16:50:01 INFO pollinate.node.sessions: session x opened\n"
                     f"16:50:02 INFO pollinate.node.rounds: {committed}\n"
                     "16:50:03 WARN pollinate.node.rounds: round 2 attempt 1 of job demo-sums span 15:30 fa")
    assert follower.new() == [("node-2", committed)]
    with a.log_path.open("a") as f:  # the half-written line is finished
        f.write("iled, rolled back to round 1: peer gone\n")
    b.log_path.write_text("16:50:04 INFO pollinate.node.rounds: round 2 of job demo-sums span 0:15 given up; "
                     "adapter reset to round 1\n")
    assert follower.new() == [
        ("node-2", "round 2 attempt 1 of job demo-sums span 15:30 failed, rolled back to round 1: peer gone"),
        ("node-3", "round 2 of job demo-sums span 0:15 given up; adapter reset to round 1"),
    ]
    assert follower.new() == []


def test_replica_trainer_does_not_see_the_avoided_replica():
    from pollinate.client.config import ClientConfig
    from pollinate.client.routing import PeerSpan, find_route
    from pollinate.demo_trainer import AvoidingSwarm

    peers = [PeerSpan(peer_id="a", address="127.0.0.1:1", start=0, end=2, throughput=10.0),
             PeerSpan(peer_id="b", address="127.0.0.1:2", start=2, end=4, throughput=20.0),  # the faster replica
             PeerSpan(peer_id="c", address="127.0.0.1:3", start=2, end=4, throughput=10.0)]
    swarm = AvoidingSwarm(avoid=frozenset({"127.0.0.1:2"}), dht=None, model_id="m", num_blocks=4,
                          config=ClientConfig())
    swarm._peers, swarm._fetched_at = peers, float("inf")  # as if just read from the DHT
    assert [p.peer_id for p in asyncio.run(swarm.peers())] == ["a", "c"]
    # `pollinate train` would take the faster replica b; this trainer goes through c.
    assert [h.peer.peer_id for h in find_route(peers, 0, 4, config=ClientConfig().routing)] == ["a", "b"]
    assert [h.peer.peer_id for h in asyncio.run(swarm.route(0, 4))] == ["a", "c"]


def test_replica_round_reads_the_status_json():
    from pollinate.demo import replica_round

    status = {"rounds": [  # as `pollinate status --json` prints it: zeros and false left out
        {"job": "demo-sums", "span": {"end": 15}, "round": "4", "members": [{"member_id": "a", "committed": True}]},
        {"job": "demo-sums", "span": {"start": 15, "end": 30}, "round": "2", "members": [
            {"member_id": "b", "committed": True}, {"member_id": "c", "shard_index": 1}]},
    ]}
    assert replica_round(status, "demo-sums", (0, 15)) == (4, ["a"])
    assert replica_round(status, "demo-sums", (15, 30)) == (2, ["b"])  # c gave the round up
    assert replica_round(status, "other", (15, 30)) == (0, [])
    assert replica_round({}, "demo-sums", (15, 30)) == (0, [])


def test_the_task_data_never_holds_a_held_out_question(tmp_path):
    import json

    from pollinate.demo import HELD_OUT, question, write_task_data

    path = tmp_path / "data.jsonl"
    write_task_data(path, 500, seed=3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 500
    held = {question(n) for n in HELD_OUT}
    assert not held & {r["prompt"] for r in records}
    assert all(r["completion"] == str(int(r["prompt"].split()[2]) * 10) for r in records)


def test_an_answer_is_right_when_it_names_the_expected_number():
    from pollinate.demo import correct

    assert correct("650", "650")
    assert correct("65 times 10 is 650.", "650")  # a sentence with the number counts
    assert not correct("77 times 10 is 77.", "770")
    assert not correct("6500", "650") and not correct("To solve this problem, we need to", "650")


def test_the_summary_line_counts_right_answers():
    import json

    from pollinate.demo import Summary

    summary = Summary(ok=True, seconds=12.34, base_answers=["To solve", "470.", "6", "x"],
                      job_answers=["230", "470", "650", "88"], export_match=True)
    line = json.loads(summary.line())
    assert line["expected_answers"] == ["230", "470", "650", "880"]
    assert (line["base_correct"], line["job_correct"]) == (1, 3)
    assert line["ok"] is True and line["export_match"] is True and line["seconds"] == 12.3
    assert {"ok", "seconds", "base_answers", "job_answers", "expected_answers", "job_correct",
            "base_correct", "export_match"} <= set(line)
