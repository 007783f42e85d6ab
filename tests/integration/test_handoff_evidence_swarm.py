"""A liar that receives a handed-off session is reported with evidence (issues 16 and 18),
with real processes: a coordinator (default quarantine settings); A [0:1], C [3:4]; three
replicas of [1:3]: B and D honest, L (benchmarks/liar_node.py) honest in everything but the
sessions handed to it, whose every step after the client resumed it it perturbs; and a victim
V [1:3], the fastest, which the client's session goes through. The client checks every hop
step on other replicas, with fp16 on the wire. After token 5 V is stopped with SIGTERM and
hands the session to L (the fastest replica left) by recompute; the client resumes there, its
first check catches L, and its report carries L's signed transcript, which starts from the
span inputs L was prefilled with. The coordinator checks it against L's key, has B and D
re-run the prefix and the steps, and quarantines L on that one report. Then a hostile client
hands D a session itself (as a leaving node would) and reports D's true answer after
resuming it: the signature verifies and B's re-run of prefix and step refutes the report."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from procs import ProcGroup  # tests/integration is on sys.path
from test_coordinated_swarm import TOKEN, start_coordinator, status
from test_serving import PROMPT, finish, wait_paused

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


async def report_resumed_honest_node(coordinator: str, address: str, hidden_size: int) -> tuple[str, str]:
    """Hand the node at `address` a session of blocks 1:3 by recompute (6 tokens of fp16-wire
    inputs, as a leaving node keeps them), resume it with one step, and report the node's
    true signed answer as a lie: the status code and details of the coordinator's answer."""
    import grpc
    import torch

    from pollinate.compression.kv_codec import encode_inputs
    from pollinate.node.handoff import digest_of, kept_input
    from pollinate.protocol.answers import Transcript, prefix_of
    from pollinate.protocol.channels import ChannelConfig, open_channel
    from pollinate.protocol.tensors import HIDDEN_STATES, encode_tensor, stream_tensors
    from pollinate.protocol.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, node_pb2, node_pb2_grpc

    blocks, secret = common_pb2.Span(start=1, end=3), os.urandom(32)
    sent = encode_tensor(torch.randn(1, 6, hidden_size), codec="fp16", name=HIDDEN_STATES).decode()
    frame = encode_inputs(kept_input(sent))
    step = encode_tensor(torch.randn(1, 1, hidden_size), codec="fp16", name=HIDDEN_STATES)
    node = open_channel(address, ChannelConfig(token=TOKEN))
    coord = open_channel(coordinator, ChannelConfig(token=TOKEN))
    try:
        stub = node_pb2_grpc.NodeStub(node)
        header = node_pb2.HandOffHeader(session_id="framed", blocks=blocks, max_length=16, batch_size=1,
                                        position=6, resume_digest=digest_of(secret), payload_bytes=len(frame))
        await stub.HandOff(iter([node_pb2.HandOffRequest(header=header, data=frame)]), timeout=60)
        opened = node_pb2.InferenceOpen(session_id="framed", max_length=16, reply_codec="fp16", blocks=blocks,
                                        resume_secret=secret)
        requests = [node_pb2.InferenceRequest(position=6, tensor=c) for c in step.chunks()]
        requests[0].open.CopyFrom(opened)
        raw: list = []
        await stream_tensors(stub.Inference, requests, 60.0, raw=raw)
        signed = Transcript("inference", job="", start=1, end=3, prefix=prefix_of([sent]))
        signed.record(6, [step, raw[0][0]], raw[0][1])
        evidence = signed.evidence()
        assert evidence is not None, raw[0][1]  # the node signed the prefix this client built
        try:
            await coordinator_pb2_grpc.CoordinatorStub(coord).ReportLiar(coordinator_pb2.ReportLiarRequest(
                address=address, blocks=blocks, distance=0.5, tolerance=0.03, evidence=evidence), timeout=90)
        except grpc.aio.AioRpcError as e:
            return e.code().name, e.details()
        return "OK", ""
    finally:
        await node.close()
        await coord.close()


def test_a_liar_that_resumed_a_handed_off_session_is_quarantined_on_its_evidence(
        tmp_path, tiny_model_dir, tiny_model_files, tiny_cache_dir):
    (tmp_path / "token").write_text(TOKEN + "\n")
    env = {"PYTHONPATH": os.pathsep.join([str(BENCHMARKS), os.environ.get("PYTHONPATH", "")]),
           "LIAR_NOISE": "0", "LIAR_RESUMED_NOISE": "0.1"}
    group = ProcGroup(tmp_path, env=env)
    try:
        coord = start_coordinator(group, tmp_path, "coordinator", tiny_model_dir)
        group.wait_ready([coord], timeout=120)
        common = ["--coordinator", coord.info["grpc"], "--token-file", str(tmp_path / "token"),
                  "--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir), "--torch-threads", "1"]
        a = group.start("A", ["node", "--blocks", "0:1", "--throughput", "100", *common])
        b = group.start("B", ["node", "--blocks", "1:3", "--throughput", "100", *common])
        d = group.start("D", ["node", "--blocks", "1:3", "--throughput", "100", *common])
        c = group.start("C", ["node", "--blocks", "3:4", "--throughput", "100", *common])
        liar = group.start("L", ["node", "--blocks", "1:3", "--throughput", "1000", *common], module="liar_node")
        victim = group.start("V", ["node", "--blocks", "1:3", "--throughput", "1000000", *common])
        group.wait_ready([a, b, d, c, liar, victim], timeout=180)
        swarm = {"group": group}
        cmd = [sys.executable, str(Path(__file__).with_name("serving_client.py")), "--model", str(tiny_model_dir),
               "--cache-dir", str(tiny_cache_dir), "--coordinator", coord.info["grpc"], "--token", TOKEN,
               "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "12", "--pause-after", "5",
               "--codec", "fp16", "--spot-check-rate", "1"]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        route = wait_paused(proc)
        assert route[1][0] == victim.info["address"], route
        assert victim.stop() == 0  # SIGTERM: hands the session off, leaves, exits 0
        proc.stdin.write("go\n")
        proc.stdin.flush()
        result = finish(proc, swarm)

        assert "handed off 1 session(s) of blocks 1:3" in victim.log_path.read_text()
        assert "(recompute codec" in liar.log_path.read_text()
        assert result["handoffs"] == 1, result  # resumed on L ...
        assert result["liars"] == [liar.info["peer_id"]], result  # ... which the client caught
        assert result["route"][1][0] in (b.info["address"], d.info["address"]), result
        # the one report, its evidence the resumed call's transcript: verified by B and D
        assert result["reports"] == [[True, 1, "verified"]], (result, coord.log_path.read_text()[-3000:])
        quarantined = status(coord)["quarantined"]
        assert [(q["address"], q["verified"]) for q in quarantined] == [(liar.info["address"], True)], quarantined

        # an honest node's resumed answer: judged (its signature over the prefix verifies) and refuted
        code, details = asyncio.run(report_resumed_honest_node(coord.info["grpc"], d.info["address"],
                                                               tiny_model_files.hidden_size))
        assert code == "FAILED_PRECONDITION" and "does not show" in details, (code, details)
        assert b.info["address"] in details, details  # the member that re-ran it
        assert d.info["address"] not in [q["address"] for q in status(coord)["quarantined"]]
    except BaseException:
        print(group.dump_logs(), file=sys.stderr)
        raise
    finally:
        group.stop_all()
