"""Fault scenarios against a local swarm; each prints one JSON object per run.

    python benchmarks/chaos.py --scenario kill-node-during-generation [--model tiny|smollm2]
    python benchmarks/chaos.py --scenario handoff --model smollm2 --tokens 64 [--handoff-codec lossless|lossy]

Scenarios are functions registered in SCENARIOS under their name; a scenario gets the
parsed args and a work directory and returns its JSON-able result (at least `scenario`
and `completed`). Coordinator and training scenarios plug in the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from local_swarm import local_swarm  # benchmarks/ is on sys.path when run as a script

SCENARIOS: dict[str, Callable[[argparse.Namespace, Path], dict]] = {}


def scenario(name: str):
    def register(fn):
        SCENARIOS[name] = fn
        return fn
    return register


def _model(args, workdir: Path) -> tuple[str, list[tuple[int, int]]]:
    """(model argument for nodes and client, spans A, B1, B2, C)."""
    if args.model == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import make_tiny_llama

        path = make_tiny_llama(workdir / "tiny-llama", num_blocks=4)
        return str(path), [(0, 1), (1, 3), (1, 3), (3, 4)]
    return args.model, [(0, 10), (10, 20), (10, 20), (20, 30)]


@scenario("kill-node-during-generation")
def kill_node_during_generation(args: argparse.Namespace, workdir: Path) -> dict:
    """SIGKILL the middle-span replica in use after token --kill-after; compare with a no-fault run."""
    model, spans = _model(args, workdir)
    cache = str(workdir / "cache") if args.model == "tiny" else None
    if cache:  # convert once here, not in every node at the same time
        from pollinate.node.model_files import open_model

        open_model(model, cache_dir=cache, show_progress=False)
    extra = ["--torch-threads", "1", "--throughput", "100"]
    with local_swarm(workdir, model=model, spans=spans, cache_dir=cache, extra=extra) as swarm:
        from pollinate.client.remote_model import RemoteModelForCausalLM

        remote = RemoteModelForCausalLM.from_pretrained(
            model, initial_peers=[swarm.maddr], cache_dir=cache, wire_codec="none", ban_base_s=60.0
        )
        import torch
        from transformers.generation.streamers import BaseStreamer

        ids = torch.tensor([[1, 5, 9, 33, 70, 12, 8]])
        gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        baseline = remote.generate(ids, **gen)[0, ids.shape[1]:].tolist()

        by_address = {p.info["address"]: p for p in swarm.nodes}
        stamps: list[float] = []
        killed: list[str] = []

        class KillAfter(BaseStreamer):
            def put(self, value):
                stamps.append(time.perf_counter())
                if len(stamps) == args.kill_after + 1:  # the prompt comes first
                    victim = remote.active_session.route[1].peer.address
                    by_address[victim].kill()
                    killed.append(victim)

            def end(self):
                pass

        with remote.inference_session(max_length=ids.shape[1] + args.tokens) as session:
            faulted = remote.generate(ids, streamer=KillAfter(), **gen)[0, ids.shape[1]:].tolist()
            failovers, recovery_s = session.failovers, session.recovery_seconds
            route = [str(h) for h in session.route]
        remote.shutdown()
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    k = args.kill_after
    return {
        "scenario": "kill-node-during-generation",
        "model": args.model,
        "completed": len(faulted) == args.tokens,
        "tokens_match": faulted == baseline,
        "recovery_s": round(recovery_s, 3),
        "failover_token_s": round(gaps[k - 1], 3) if len(gaps) >= k else None,
        "median_token_s": round(sorted(gaps)[len(gaps) // 2], 4) if gaps else None,
        "failovers": failovers,
        "killed": killed,
        "route_after": route,
        "tokens": args.tokens,
    }


def _handoff_prompt(args, files) -> "torch.Tensor":
    """--context tokens of real text (the repository's docs) for SmolLM2; seeded random ids for tiny."""
    import torch

    if args.model == "tiny":
        return torch.randint(1, files.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    text = "\n\n".join(p.read_text() for p in sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md")))
    return files.tokenizer()(text, return_tensors="pt").input_ids[:, : args.context]


def _handoff_run(remote, ids, gen: dict, victims: dict, args) -> dict:
    """Generate; after token --kill-after, SIGTERM the middle hop's node (in a thread: the node
    takes seconds to leave) and go on. Returns the tokens and the stall the fault caused."""
    import threading

    from transformers.generation.streamers import BaseStreamer

    stamps: list[float] = []
    fault: dict = {}

    class TermAfter(BaseStreamer):
        def put(self, value):
            stamps.append(time.perf_counter())
            if len(stamps) == args.kill_after + 1:  # the prompt comes first
                victim = victims[remote.active_session.route[1].peer.address]
                fault.update(victim=victim, at=time.perf_counter(), index=len(stamps))
                threading.Thread(target=victim.stop, args=(60.0,), daemon=True).start()

        def end(self):
            pass

    with remote.inference_session(max_length=ids.shape[1] + args.tokens) as session:
        out = remote.generate(ids, streamer=TermAfter(), **gen)[0, ids.shape[1]:].tolist()
        counts = {"handoffs": session.handoffs, "failovers": session.failovers,
                  "route_after": [str(h) for h in session.route]}
    # the stall: the longest wait for a token once SIGTERM was sent
    after = [b - a for a, b in zip(stamps[fault["index"] - 1:], stamps[fault["index"]:])]
    return {"tokens": out, "stall_s": max(after) if after else None,
            "median_token_s": sorted(after)[len(after) // 2] if after else None, "victim": fault["victim"], **counts}


@scenario("handoff")
def handoff(args: argparse.Namespace, workdir: Path) -> dict:
    """A session of --context tokens through A, B, C where three nodes serve B's blocks; SIGTERM
    the B in use after token --kill-after: it hands the session's KV cache to another B and the
    client resumes there. Then the same with a client that allows no handoff (forced replay)."""
    model, spans = _model(args, workdir)
    spans = [spans[0], spans[1], spans[1], spans[1], spans[3]]  # three replicas of the middle span
    cache = str(workdir / "cache") if args.model == "tiny" else None
    from pollinate.node.model_files import open_model

    files = open_model(model, cache_dir=cache, show_progress=False)  # convert once, up front
    if args.context + args.tokens > files.config.max_position_embeddings:
        raise SystemExit(f"--context {args.context} + --tokens {args.tokens} exceed the model's "
                         f"{files.config.max_position_embeddings} positions")
    extra = ["--torch-threads", "1", "--throughput", "100", "--handoff", args.handoff_codec,
             "--handoff-bits", str(args.handoff_bits)]
    ids = _handoff_prompt(args, files)
    gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
    import torch

    with torch.inference_mode():
        reference = files.load_reference_model().generate(ids, **gen)[0, ids.shape[1]:].tolist()
    with local_swarm(workdir, model=model, spans=spans, cache_dir=cache, extra=extra) as swarm:
        from pollinate.client.remote_model import RemoteModelForCausalLM

        victims = {p.info["address"]: p for p in swarm.nodes}
        runs = {}
        for name, allow in (("handoff", True), ("replay", False)):
            remote = RemoteModelForCausalLM.from_pretrained(
                model, initial_peers=[swarm.maddr], cache_dir=cache, wire_codec=args.wire, ban_base_s=60.0,
                handoff=allow)
            try:
                runs[name] = _handoff_run(remote, ids, gen, victims, args)
            finally:
                remote.shutdown()
            runs[name]["victim"].popen.wait(60)
        log = runs["handoff"]["victim"].log_path.read_text(errors="replace")
    sent = re.search(r"handed off \d+ session\(s\) of blocks \S+ in ([\d.]+) s, (\d+) bytes \(([\d.]+) of fp16\)", log)
    frozen = re.search(r"frozen ([\d.]+) s at most", log)
    h, r = runs["handoff"], runs["replay"]
    return {
        "scenario": "handoff",
        "model": args.model,
        "completed": len(h["tokens"]) == args.tokens and len(r["tokens"]) == args.tokens,
        "tokens_match": h["tokens"] == reference,
        "replay_tokens_match": r["tokens"] == reference,
        "handoff_equals_replay": h["tokens"] == r["tokens"],
        "handoff": h["handoffs"] == 1 and h["failovers"] == 0,
        "kv_ratio_vs_fp16": float(sent.group(3)) if sent else None,
        "kv_bytes": int(sent.group(2)) if sent else None,
        "handoff_send_s": float(sent.group(1)) if sent else None,
        "frozen_s": float(frozen.group(1)) if frozen else None,
        "resume_s": round(h["stall_s"], 3),
        "replay_resume_s": round(r["stall_s"], 3),
        "replayed": r["failovers"] == 1 and r["handoffs"] == 0,
        "median_token_s": round(h["median_token_s"], 4),
        "codec": args.handoff_codec if args.handoff_codec != "lossy" else f"lossy{args.handoff_bits}",
        "context": ids.shape[1],
        "wire": args.wire,
        "tokens": args.tokens,
        "kill_after": args.kill_after,
        "route_after": h["route_after"],
    }


def _http_status(coord) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://{coord.info['http']}/api/v1/status", timeout=5) as r:
        return json.loads(r.read())


LIAR_TOKEN = "liar-token"


def _liar_node_args(model: str, cache: str | None, coordinator: str, token_file: Path) -> list[str]:
    return ["--model", model, *(["--cache-dir", cache] if cache else []), "--torch-threads", "1",
            "--coordinator", coordinator, "--token-file", str(token_file)]


def _liar_swarm(group, args, model: str, cache: str | None, *, liar: bool, workdir: Path) -> list:
    """A coordinator with its default quarantine settings (a report whose signed evidence other
    members confirm quarantines on its own; unverified ones need two reporters), blocks 0:1,
    three replicas of 1:3 (the fastest one lies when `liar`), 3:4; returns the coordinator and
    the nodes in that order."""
    token_file = workdir / "token"
    token_file.write_text(LIAR_TOKEN + "\n")
    coord = group.start("liar-coordinator", [
        "coordinator", "--data-dir", str(workdir / "coord-data"), "--port", "0", "--http-port", "0",
        "--token-file", str(token_file), "--model", model, "--num-blocks", "4"])
    group.wait_ready([coord], timeout=90)
    common = _liar_node_args(model, cache, coord.info["grpc"], token_file)
    first = group.start("liar-a", ["node", "--blocks", "0:1", "--throughput", "100", *common])
    # the liar runs `python -m liar_node` (benchmarks/ is on the group's PYTHONPATH): the same
    # arguments, its log and ready file where the others' are
    b1 = group.start("liar-b1", ["node", "--blocks", "1:3", "--throughput", "1000", *common],
                     module="liar_node" if liar else "pollinate")
    middle = [b1] + [group.start(f"liar-b{i}", ["node", "--blocks", "1:3", "--throughput", "100", *common])
                     for i in (2, 3)]
    last = group.start("liar-c", ["node", "--blocks", "3:4", "--throughput", "100", *common])
    group.wait_ready([first, *middle, last], timeout=180)
    return [coord, first, *middle, last]


async def _frame(coordinator: str, honest: str, hidden_size: int) -> dict:
    """What a hostile client gets for reporting an honest node: it asks the node for a signed
    Forward of blocks 1:3 and reports it with one byte of the answer changed (not the node's
    signature: INVALID_ARGUMENT), then the true answer as a lie (the coordinator's re-run on
    other members refutes it: FAILED_PRECONDITION), then that again at once (a refuted
    reporter must wait --quarantine-refuted-backoff: RESOURCE_EXHAUSTED, nobody re-runs it).
    The status code of each, and the seconds the last one took."""
    import grpc
    import torch

    from pollinate.protocol.answers import Transcript
    from pollinate.protocol.channels import ChannelConfig, open_channel
    from pollinate.protocol.tensors import HIDDEN_STATES, encode_tensor, stream_tensors
    from pollinate.protocol.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, node_pb2, node_pb2_grpc

    blocks = common_pb2.Span(start=1, end=3)
    enc = encode_tensor(torch.randn(1, 6, hidden_size), codec="fp16", name=HIDDEN_STATES)
    node = open_channel(honest, ChannelConfig(token=LIAR_TOKEN))
    coord = open_channel(coordinator, ChannelConfig(token=LIAR_TOKEN, max_message_bytes=64 << 20))
    try:
        raw: list = []
        await stream_tensors(node_pb2_grpc.NodeStub(node).Forward, [
            node_pb2.ForwardRequest(header=node_pb2.ForwardHeader(blocks=blocks, reply_codec="fp16")),
            *(node_pb2.ForwardRequest(tensor=c) for c in enc.chunks())], 60.0, raw=raw)
        signed = Transcript("forward", job="", start=1, end=3)
        signed.record(0, [enc, raw[0][0]], raw[0][1])
        evidence = signed.evidence()
        doctored = node_pb2.AnswerEvidence()
        doctored.CopyFrom(evidence)
        answer = bytearray(doctored.steps[0].tensors[1].data)
        answer[0] ^= 0x40
        doctored.steps[0].tensors[1].data = bytes(answer)
        codes = {}
        for key, ev in (("framing_doctored_answer", doctored), ("framing_true_answer", evidence),
                        ("framing_again", evidence)):
            t0 = time.perf_counter()
            try:
                reply = await coordinator_pb2_grpc.CoordinatorStub(coord).ReportLiar(coordinator_pb2.ReportLiarRequest(
                    address=honest, blocks=blocks, distance=0.5, tolerance=0.03, evidence=ev), timeout=90)
                codes[key] = f"OK {reply.verdict}"
            except grpc.aio.AioRpcError as e:
                codes[key] = e.code().name
        codes["framing_again_s"] = round(time.perf_counter() - t0, 3)
        return codes
    finally:
        await node.close()
        await coord.close()


@scenario("liar")
def liar(args: argparse.Namespace, workdir: Path) -> dict:
    """A node that perturbs its outputs (benchmarks/liar_node.py) on the preferred replica of
    blocks 1:3; the client spot-checks --spot-check-rate of its hop steps and reports the liar
    to the coordinator, which quarantines it; a fresh client that checks nothing then routes
    around it. Then the liar leaves, an honest node takes its place, and a new client runs
    --honest-steps steps: no ban may happen."""
    import torch

    from pollinate.procs import ProcGroup

    model, _ = _model(args, workdir)
    cache = str(workdir / "cache") if args.model == "tiny" else None
    if cache:
        from pollinate.node.model_files import open_model

        open_model(model, cache_dir=cache, show_progress=False)
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(model).eval()
    ids = torch.tensor([[1, 5, 9, 33, 70, 12, 8]])
    tokens = args.tokens

    def client(coordinator: str, rate: float):
        from pollinate.client.remote_model import RemoteModelForCausalLM

        return RemoteModelForCausalLM.from_pretrained(model, coordinator=coordinator, token=LIAR_TOKEN,
                                                      cache_dir=cache, wire_codec="fp16", spot_check_rate=rate)

    def run(coordinator: str, sessions: int) -> dict:
        """A fresh client (no liar known yet) generating `sessions` times under spot checks."""
        from transformers.generation.streamers import BaseStreamer

        remote = client(coordinator, args.spot_check_rate)
        steps, detected, outputs = [0], [], []

        class Count(BaseStreamer):
            def put(self, value):
                steps[0] += 1
                if remote.swarm.liars and not detected:
                    detected.append(steps[0])

            def end(self):
                pass

        gen = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        for _ in range(sessions):
            steps[0] -= 1  # the prompt is the streamer's first put
            outputs.append(remote.generate(ids, streamer=Count(), **gen)[0, ids.shape[1]:].tolist())
        liars = dict(remote.swarm.liars)
        stats = remote.swarm.spot_checks.stats
        remote.shutdown()  # waits for its liar report to be answered
        return {"detected_after_steps": detected[0] if detected else None, "liars": liars, "outputs": outputs,
                "steps": steps[0], "checks": stats.checks, "unresolved": stats.unresolved,
                "reports": [(r.quarantined, r.reporters, r.verdict) for r in remote.swarm.reports]}

    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    with ProcGroup(workdir / "liar", env=env) as group:
        coord, *nodes = _liar_swarm(group, args, model, cache, liar=True, workdir=workdir)
        lied = run(coord.info["grpc"], 1)
        liar_address = nodes[1].info["address"]
        quarantined = [q["address"] for q in _http_status(coord)["quarantined"] if q["verified"]]
        # a fresh client that checks nothing: its routes come from the DHT, where the liar still
        # announces itself, minus the coordinator's quarantine list
        fresh = client(coord.info["grpc"], 0.0)
        try:
            route = fresh.worker.run(fresh.swarm.route(0, 4), 60.0)
            fresh_avoids = liar_address not in {h.peer.address for h in route}
        finally:
            fresh.shutdown()
        # the honest swarm: the liar leaves, an honest node takes its place (and its preference)
        nodes[1].stop()
        honest_node = group.start("honest-b1", ["node", "--blocks", "1:3", "--throughput", "1000",
                                                *_liar_node_args(model, cache, coord.info["grpc"],
                                                                 workdir / "token")])
        group.wait_ready([honest_node], timeout=180)
        honest = run(coord.info["grpc"], max(1, -(-args.honest_steps // tokens)))
        framed = asyncio.run(_frame(coord.info["grpc"], nodes[2].info["address"], local.config.hidden_size))
        framed["framed_node_quarantined"] = nodes[2].info["address"] in [
            q["address"] for q in _http_status(coord)["quarantined"]]
    out = lied["outputs"][0]
    k = lied["detected_after_steps"]
    after = None
    if k is not None:  # the steps after the ban: the local model's greedy continuation of what was said
        prefix = torch.tensor([ids[0].tolist() + out[:k]])
        expected = local.generate(prefix, max_new_tokens=tokens - k, min_new_tokens=tokens - k,
                                  do_sample=False)[0, prefix.shape[1]:].tolist()
        after = expected == out[k:]
    return {
        "scenario": "liar",
        "model": args.model,
        "completed": len(out) == tokens,
        "spot_check_rate": args.spot_check_rate,
        "detected_after_steps": k,
        "liar_banned": bool(lied["liars"]),
        "tokens_match_after_ban": after,
        # the coordinator quarantined the liar on verified evidence (the client's one report:
        # other members re-ran its signed answer, coordinator/evidence.py)
        "coordinator_quarantined_liar": liar_address in quarantined,
        "liar_reports": lied["reports"],
        # a hostile client's report of an honest node's true (signed) answer, and of a doctored one
        **framed,
        "fresh_client_avoids_liar": fresh_avoids,
        "false_bans": len(honest["liars"]),
        "honest_steps": honest["steps"],
        "honest_checks": honest["checks"],
        "checks": lied["checks"],
        "unresolved": lied["unresolved"] + honest["unresolved"],
    }


@scenario("liar-backward")
def liar_backward(args: argparse.Namespace, workdir: Path) -> dict:
    """Training through a node whose Backward answers perturbed input gradients
    (benchmarks/liar_node.py, LIAR_GRAD_NOISE 0.1, honest Forward) on the preferred replica of
    blocks 1:3; the trainer spot-checks --spot-check-rate of its Backward hops with check_only
    Backwards on the other replicas, bans and reports the liar and redoes its hop elsewhere.
    Then the liar leaves, an honest node takes its place, and --honest-trainers new trainers
    run --honest-train-steps steps each, at once on the same job (each Backward steps the
    replica's adapter under the others' checks): no ban may happen. Reports the largest
    distance between agreeing answers (what honest replicas differ by) in each phase."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from pollinate.client.trainer import TrainConfig, Trainer
    from pollinate.protocol.shared import JobSpec
    from pollinate.procs import ProcGroup

    model, _ = _model(args, workdir)
    cache = str(workdir / "cache")
    from pollinate.node.model_files import open_model

    open_model(model, cache_dir=cache, show_progress=False)

    def train(coordinator: str, steps: int, *, stop_at_ban: bool = False, seed: int = args.seed) -> dict:
        from pollinate.client.remote_model import RemoteModelForCausalLM

        remote = RemoteModelForCausalLM.from_pretrained(model, coordinator=coordinator, token=LIAR_TOKEN,
                                                        cache_dir=cache, spot_check_rate=args.spot_check_rate)
        # rounds every 1000 steps: none in this run, replicas keep their own adapters
        config = TrainConfig(job="liar-train", spec=JobSpec(rank=4, alpha=8.0, lr=args.lr, seed=3, round_steps=1000),
                             steps=steps, batch_size=2, wire_codec="fp16")
        trainer = Trainer(swarm=remote.swarm, worker=remote.worker, client_part=remote.client_part, pad_id=0,
                          config=config, timeout_s=args.step_timeout)
        detected, losses, gen = None, [], torch.Generator().manual_seed(seed)
        try:
            for step in range(1, steps + 1):
                ids = torch.randint(3, 256, (2, 16), generator=gen)
                losses.append(trainer.micro_batch(ids, ids.clone()))
                if remote.swarm.liars and detected is None:
                    detected = step
                    if stop_at_ban:
                        break
        finally:
            stats = remote.swarm.spot_checks.stats
            remote.shutdown()  # waits for its liar report to be answered
        return {"detected_after_steps": detected, "liars": dict(remote.swarm.liars), "steps": len(losses),
                "losses_finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
                "checks": stats.backward_checks, "unresolved": stats.unresolved,
                "max_agreeing_distance": stats.max_agreeing_distance, "failovers": trainer.chain.failovers,
                "reports": [(r.quarantined, r.reporters, r.verdict) for r in remote.swarm.reports]}

    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "LIAR_NOISE": "0", "LIAR_GRAD_NOISE": str(args.grad_noise)}
    with ProcGroup(workdir / "liar", env=env) as group:
        coord, *nodes = _liar_swarm(group, args, model, cache, liar=True, workdir=workdir)
        lied = train(coord.info["grpc"], args.train_steps, stop_at_ban=True)
        liar_address = nodes[1].info["address"]
        quarantined = [q["address"] for q in _http_status(coord)["quarantined"] if q["verified"]]
        nodes[1].stop()
        honest_node = group.start("honest-b1", ["node", "--blocks", "1:3", "--throughput", "1000",
                                                *_liar_node_args(model, cache, coord.info["grpc"],
                                                                 workdir / "token")])
        group.wait_ready([honest_node], timeout=180)
        with ThreadPoolExecutor(args.honest_trainers) as pool:
            runs = list(pool.map(lambda i: train(coord.info["grpc"], args.honest_train_steps, seed=args.seed + 1 + i),
                                 range(args.honest_trainers)))
        honest = {"liars": {k: v for r in runs for k, v in r["liars"].items()},
                  "steps": min(r["steps"] for r in runs), "checks": sum(r["checks"] for r in runs),
                  "unresolved": sum(r["unresolved"] for r in runs),
                  "losses_finite": all(r["losses_finite"] for r in runs),
                  "max_agreeing_distance": max(r["max_agreeing_distance"] for r in runs)}
    return {
        "scenario": "liar-backward",
        "model": args.model,
        "completed": lied["detected_after_steps"] is not None and honest["steps"] == args.honest_train_steps,
        "spot_check_rate": args.spot_check_rate,
        "grad_noise": args.grad_noise,
        "detected_after_steps": lied["detected_after_steps"],
        "liar_banned": bool(lied["liars"]),
        "liar_hop_redone": lied["failovers"],
        "coordinator_quarantined_liar": liar_address in quarantined,
        "liar_reports": lied["reports"],
        "checks": lied["checks"],
        "max_agreeing_distance_liar_phase": lied["max_agreeing_distance"],
        "false_bans": len(honest["liars"]),
        "honest_trainers": args.honest_trainers,
        "honest_steps": honest["steps"],
        "honest_checks": honest["checks"],
        "max_agreeing_distance_honest": honest["max_agreeing_distance"],
        "losses_finite": lied["losses_finite"] and honest["losses_finite"],
        "unresolved": lied["unresolved"] + honest["unresolved"],
    }


@scenario("coordinator-restart")
def coordinator_restart(args: argparse.Namespace, workdir: Path) -> dict:
    """Nodes started with --coordinator only; SIGKILL the coordinator, generate through the
    swarm while it is down (fresh DHT lookup), restart it on the same data dir, and check
    that the same members continue at the same epoch."""
    from pollinate.procs import ProcGroup

    model, _ = _model(args, workdir)
    cache = str(workdir / "cache") if args.model == "tiny" else None
    from pollinate.node.model_files import open_model

    files = open_model(model, cache_dir=cache, show_progress=False)  # convert once, up front
    per_node = -(-files.num_blocks // 3)
    token = workdir / "token"
    token.write_text("chaos-token\n")

    def coordinator(name: str, port: int = 0):
        return group.start(name, [
            "coordinator", "--data-dir", str(workdir / "coord-data"), "--port", str(port),
            "--http-port", "0", "--token-file", str(token), "--model", model,
            "--num-blocks", str(files.num_blocks), "--heartbeat-period", "0.25", "--lease", "2",
            "--restart-grace", "3",
        ])

    with ProcGroup(workdir) as group:
        coord = coordinator("coordinator-1")
        group.wait_ready([coord], timeout=90)
        address = coord.info["grpc"]
        nodes = [group.start(f"node-{i}", [
            "node", "--coordinator", address, "--token-file", str(token), "--model", model,
            *(["--cache-dir", cache] if cache else []), "--num-blocks", str(per_node),
            "--torch-threads", "1", "--throughput", "100",
        ]) for i in range(3)]
        group.wait_ready(nodes, timeout=300)
        before = _http_status(coord)

        from pollinate.client.remote_model import RemoteModelForCausalLM

        remote = RemoteModelForCausalLM.from_pretrained(
            model, coordinator=address, token="chaos-token", cache_dir=cache, wire_codec="none")
        import torch

        ids = torch.tensor([[1, 5, 9, 33, 70, 12, 8]])
        gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        try:
            baseline = remote.generate(ids, **gen)[0, ids.shape[1]:].tolist()
            coord.kill()
            killed_at = time.perf_counter()
            # Forget the cached routes: the peers must come from the DHT with the coordinator gone.
            peers = remote.worker.run(remote.swarm.peers(refresh=True), 60.0)
            during = remote.generate(ids, **gen)[0, ids.shape[1]:].tolist()
            outage_generation_s = time.perf_counter() - killed_at
        finally:
            remote.shutdown()
        restarted = coordinator("coordinator-2", port=int(address.rsplit(":", 1)[1]))
        group.wait_ready([restarted], timeout=90)
        restart_wall = time.time()
        deadline = time.monotonic() + 15.0
        after = _http_status(restarted)
        while (not all(m["last_heartbeat_at"] > restart_wall for m in after["members"])
               and time.monotonic() < deadline):
            time.sleep(0.1)
            after = _http_status(restarted)
    ids_before = sorted(m["member_id"] for m in before["members"])
    ids_after = sorted(m["member_id"] for m in after["members"])
    return {
        "scenario": "coordinator-restart",
        "model": args.model,
        "completed": ids_before == ids_after and during == baseline,
        "members_before": len(ids_before),
        "members_after": len(ids_after),
        "same_members": ids_before == ids_after,
        "epoch_before": before["epoch"],
        "epoch_after": after["epoch"],
        "epoch_continued": after["epoch"] >= before["epoch"] > 0,
        "generation_during_outage": during == baseline and len(during) == args.tokens,
        "dht_peers_during_outage": len(peers),
        "outage_generation_s": round(outage_generation_s, 3),
        "heartbeats_resumed": all(m["last_heartbeat_at"] > restart_wall for m in after["members"]),
    }


def _text_windows(files: list[Path], length: int) -> torch.Tensor:
    """Byte-level windows (the tiny model's vocabulary is 256) of the files' text."""
    import torch

    data = torch.tensor(list(b"".join(f.read_bytes() for f in files)), dtype=torch.long)
    n = data.numel() // length
    return data[: n * length].view(n, length)


async def _train_job(args, model: str, coord_address: str, nodes: list, token: str,
                     after_step=None) -> dict:
    """Each replica trains the job on its own shard of the data through Forward/Backward
    (embeddings and head here, the blocks on the node: client/trainer.py's SwarmChain), a
    DiLoCo round inside every H-th Backward. Returns the steps each replica finished, the
    coordinator's last committed round and the held-out loss through the first replica.
    `after_step(i, steps_done)`, if given, may return a node process that replica i's
    trainer continues on from then on (a replacement)."""
    import os

    import torch
    from transformers import LlamaForCausalLM

    from pollinate.client.routing import Hop, PeerSpan
    from pollinate.client.trainer import SwarmChain, TrainConfig
    from pollinate.client.training_data import causal_lm_loss
    from pollinate.protocol.shared import JobSpec
    from pollinate.protocol.channels import ChannelConfig, open_channel
    from pollinate.protocol.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, node_pb2_grpc

    torch.manual_seed(args.seed)
    local = LlamaForCausalLM.from_pretrained(model).eval()
    for p in local.parameters():
        p.requires_grad_(False)
    num_blocks = local.config.num_hidden_layers
    src = sorted(Path(os.__file__).parent.glob("*.py"))  # the standard library's own source
    train_data = _text_windows(src[:40], args.seq_len)
    val_data = _text_windows(src[40:44], args.seq_len)[: args.val_batches * args.batch_size]
    channels: dict[str, object] = {}

    class Stubs:  # what SwarmChain needs of a swarm: a Node stub per address
        def stub(self, address: str):
            if address not in channels:
                channels[address] = open_channel(address, ChannelConfig(token=token))
            return node_pb2_grpc.NodeStub(channels[address])

    spec = JobSpec(rank=4, alpha=8.0, lr=args.lr, round_steps=args.round_steps, seed=args.seed,
                   outer_lr=args.outer_lr, outer_momentum=args.outer_momentum, codec_p=args.diloco_p)
    chain = SwarmChain(Stubs(), TrainConfig(job=JOB, spec=spec), timeout_s=args.step_timeout)
    hops = [Hop(peer=PeerSpan(peer_id=p.name, address=p.info["address"], start=0, end=num_blocks,
                              throughput=1.0), start=0, end=num_blocks) for p in nodes]
    done = [0] * len(hops)

    def loss_of(ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(local.lm_head(local.model.norm(hidden)), ids)

    async def replica(i: int) -> None:
        gen = torch.Generator().manual_seed(args.seed * 1000 + i)
        mine = train_data[i :: len(hops)]  # each replica its own shard of the data
        try:
            for step in range(args.train_steps):
                ids = mine[torch.randint(len(mine), (args.batch_size,), generator=gen)]
                h0 = local.model.embed_tokens(ids)
                out = (await chain.forward_hop(hops[i], h0)).requires_grad_()
                loss_of(ids, out).backward()
                await chain.backward_hop(hops[i], h0, out.grad)
                done[i] = step + 1
                moved = await after_step(i, done[i]) if after_step is not None else None
                if moved is not None:
                    hops[i] = Hop(peer=PeerSpan(peer_id=moved.name, address=moved.info["address"], start=0,
                                                end=num_blocks, throughput=1.0), start=0, end=num_blocks)
        except Exception as exc:
            print(f"replica {i} stopped after {done[i]} steps: {type(exc).__name__}: {exc}", file=sys.stderr)

    await asyncio.gather(*(replica(i) for i in range(len(hops))))
    survivor = next(i for i, d in enumerate(done) if d == args.train_steps)
    with torch.no_grad():
        losses = [float(loss_of(ids, await chain.forward_hop(hops[survivor], local.model.embed_tokens(ids), job=JOB)))
                  for ids in val_data.split(args.batch_size)]
    channel = open_channel(coord_address, ChannelConfig(token=token))
    committed = await coordinator_pb2_grpc.CoordinatorStub(channel).GetCommittedState(
        coordinator_pb2.GetCommittedStateRequest(job=JOB, span=common_pb2.Span(start=0, end=num_blocks)),
        timeout=30)
    for c in [channel, *channels.values()]:
        await c.close()
    with torch.no_grad():  # the base model (a LoRA adapter starts as the identity)
        base = [float(causal_lm_loss(local(input_ids=ids).logits, ids)) for ids in val_data.split(args.batch_size)]
    return {"steps_done": done, "committed_round": int(committed.round),
            "val_loss": sum(losses) / len(losses), "val_loss_base": sum(base) / len(base)}


JOB = "chaos"


def _round_swarm(group, args, workdir: Path):
    """(model, files, coordinator, node(name)) for the training scenarios: the tiny model
    converted once up front, a coordinator ready, and a starter of nodes hosting the whole
    model (the caller waits for them)."""
    model, _ = _model(args, workdir)
    cache = str(workdir / "cache")
    from pollinate.node.model_files import open_model

    files = open_model(model, cache_dir=cache, show_progress=False)  # convert once, up front
    token = workdir / "token"
    token.write_text("chaos-token\n")
    coord = group.start("coordinator", [
        "coordinator", "--data-dir", str(workdir / "coord-data"), "--port", "0", "--http-port", "-1",
        "--token-file", str(token), "--model", model, "--num-blocks", str(files.num_blocks),
        "--heartbeat-period", "0.5", "--lease", str(args.lease), "--round-window", "60",
    ])
    group.wait_ready([coord], timeout=90)

    def node(name: str):
        return group.start(name, [
            "node", "--coordinator", coord.info["grpc"], "--token-file", str(token), "--model", model,
            "--cache-dir", cache, "--blocks", f"0:{files.num_blocks}", "--torch-threads", "1",
            "--throughput", "10",
        ])

    return model, files, coord, node


def _replica_run(args, workdir: Path, *, kill: bool) -> dict:
    """Coordinator + --replicas nodes of the whole tiny model; with `kill`, SIGKILL the last
    replica right after round --kill-round is formed with all of them."""
    import threading

    from pollinate.procs import ProcGroup

    with ProcGroup(workdir) as group:
        model, files, coord, node = _round_swarm(group, args, workdir)
        nodes = [node(f"node-{i}") for i in range(args.replicas)]
        group.wait_ready(nodes, timeout=300)
        killed: list[float] = []
        stop = threading.Event()
        formed = f"round {args.kill_round} of job {JOB} span 0:{files.num_blocks} formed (attempt 1) with {args.replicas} member"

        def killer() -> None:  # the fault's moment: the coordinator's log line, polled
            while not stop.is_set():
                if formed in coord.log_path.read_text(errors="replace"):
                    nodes[-1].kill()
                    killed.append(time.perf_counter())
                    return
                time.sleep(0.02)

        watcher = threading.Thread(target=killer, daemon=True)
        if kill:
            watcher.start()
        t0 = time.perf_counter()
        try:
            out = asyncio.run(_train_job(args, model, coord.info["grpc"], nodes, "chaos-token"))
        finally:
            stop.set()
        out["wall_s"] = time.perf_counter() - t0
        log = coord.log_path.read_text(errors="replace")
    out["killed"] = bool(killed)
    out["aborted_attempts"] = log.count(" aborted: ")
    out["retried_attempts"] = len(re.findall(r"formed \(attempt [2-9]", log))
    out["committed_without_some"] = len(re.findall(r"committed by (\d+)/(?!\1\b)\d+ members", log))
    return out


@scenario("kill-replica-during-training")
def kill_replica_during_training(args: argparse.Namespace, workdir: Path) -> dict:
    """DiLoCo training of one job by --replicas replicas of the whole tiny model; SIGKILL one
    replica inside round --kill-round; compare with the same run (same seed) without the kill."""
    if args.model != "tiny":
        raise SystemExit("kill-replica-during-training runs on the tiny model only")
    fault = _replica_run(args, workdir / "fault", kill=True)
    clean = _replica_run(args, workdir / "no-fault", kill=False)
    expected = args.train_steps // args.round_steps
    survivors = fault["steps_done"][:-1]
    return {
        "scenario": "kill-replica-during-training",
        "completed": fault["killed"] and all(d == args.train_steps for d in survivors),
        "val_loss": round(fault["val_loss"], 4),
        "val_loss_no_fault": round(clean["val_loss"], 4),
        "val_loss_base_model": round(fault["val_loss_base"], 4),
        "rounds_lost": expected - fault["committed_round"],
        "rounds_expected": expected,
        "committed_round": fault["committed_round"],
        "killed_replica_steps": fault["steps_done"][-1],
        "aborted_attempts": fault["aborted_attempts"],
        "retried_attempts": fault["retried_attempts"],
        "rounds_committed_by_a_subset": fault["committed_without_some"],
        "replicas": args.replicas,
        "train_steps": args.train_steps,
        "round_steps": args.round_steps, "outer_lr": args.outer_lr, "outer_momentum": args.outer_momentum,
        "diloco_p": args.diloco_p,
        "kill_round": args.kill_round,
        "wall_s": round(fault["wall_s"], 1),
        "wall_s_no_fault": round(clean["wall_s"], 1),
        "seed": args.seed,
    }


def _last_replica_run(args, workdir: Path, *, kill: bool) -> dict:
    """Coordinator + one node of the whole tiny model (the only replica); with `kill`, SIGKILL
    it after --kill-round's first half of inner steps and continue the trainer's remaining
    steps on a replacement node, which restores the last committed state before its first
    step (node/rounds.py). Without `kill`, the same run on one node throughout."""
    from pollinate.procs import ProcGroup

    kill_at = (args.kill_round - 1) * args.round_steps + args.round_steps // 2
    with ProcGroup(workdir) as group:
        model, _, coord, node = _round_swarm(group, args, workdir)
        nodes = [node("node-0")]
        group.wait_ready(nodes, timeout=300)
        events: dict[str, float] = {}

        async def after_step(i: int, steps: int):
            if not kill or steps != kill_at:
                return None
            nodes[0].kill()  # the fault: SIGKILL of the span's only replica, mid-round
            events["killed"] = time.perf_counter()
            replacement = node("node-1")
            await asyncio.to_thread(group.wait_ready, [replacement], 300)
            events["replacement_ready"] = time.perf_counter()
            return replacement

        t0 = time.perf_counter()
        out = asyncio.run(_train_job(args, model, coord.info["grpc"], nodes, "chaos-token", after_step))
        out["wall_s"] = time.perf_counter() - t0
        logs = "".join(p.log_path.read_text(errors="replace") for p in group.procs)
    restored = re.search(r"round (\d+) of job \S+ span \S+ \(restored at job start\)", logs)
    out["killed"] = "killed" in events
    out["killed_after_step"] = kill_at if kill else None
    out["restored_round"] = int(restored.group(1)) if restored else None
    out["replacement_start_s"] = (events["replacement_ready"] - events["killed"]) if kill else None
    return out


@scenario("kill-last-replica")
def kill_last_replica(args: argparse.Namespace, workdir: Path) -> dict:
    """DiLoCo training of one job on the only replica of the whole tiny model; SIGKILL it in
    the middle of round --kill-round, start a replacement that restores the last committed
    state, finish the trainer's steps there; compare with the same seed without the kill."""
    if args.model != "tiny":
        raise SystemExit("kill-last-replica runs on the tiny model only")
    fault = _last_replica_run(args, workdir / "fault", kill=True)
    clean = _last_replica_run(args, workdir / "no-fault", kill=False)
    expected = args.train_steps // args.round_steps
    return {
        "scenario": "kill-last-replica",
        "completed": (fault["killed"] and fault["steps_done"] == [args.train_steps]
                      and fault["restored_round"] == args.kill_round - 1),
        "val_loss": round(fault["val_loss"], 4),
        "val_loss_no_fault": round(clean["val_loss"], 4),
        "val_loss_base_model": round(fault["val_loss_base"], 4),
        "rounds_lost": expected - fault["committed_round"],
        "rounds_expected": expected,
        "committed_round": fault["committed_round"],
        "committed_round_no_fault": clean["committed_round"],
        "restored_round": fault["restored_round"],
        "killed_after_step": fault["killed_after_step"],
        "replacement_start_s": round(fault["replacement_start_s"], 1),
        "train_steps": args.train_steps,
        "round_steps": args.round_steps, "outer_lr": args.outer_lr, "outer_momentum": args.outer_momentum,
        "diloco_p": args.diloco_p,
        "kill_round": args.kill_round,
        "wall_s": round(fault["wall_s"], 1),
        "wall_s_no_fault": round(clean["wall_s"], 1),
        "seed": args.seed,
    }


def main() -> int:
    p = argparse.ArgumentParser(description="fault scenarios against a local swarm")
    p.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    p.add_argument("--model", default="tiny", help="'tiny' (random 4-block Llama, fast) or 'smollm2'")
    p.add_argument("--tokens", type=int, default=16, help="tokens to generate")
    p.add_argument("--kill-after", type=int, default=5, help="kill after this many generated tokens")
    p.add_argument("--workdir", type=Path)
    handoff_args = p.add_argument_group("handoff scenario")
    handoff_args.add_argument("--context", type=int, default=512, help="prompt tokens before generation")
    handoff_args.add_argument("--handoff-codec", choices=("recompute", "lossless", "lossy"), default="recompute",
                              help="the nodes' --handoff")
    handoff_args.add_argument("--handoff-bits", type=int, default=8, help="the nodes' --handoff-bits (lossy)")
    handoff_args.add_argument("--wire", choices=("none", "fp16"), default="none",
                              help="the clients' wire codec: none (fp32, default: tokens must equal the local "
                                   "model's) or fp16 (the client default; rounding on the wire may change tokens "
                                   "against the local model, handoff_equals_replay still compares the two runs)")
    liar_args = p.add_argument_group("liar")
    liar_args.add_argument("--spot-check-rate", type=float, default=0.1, help="share of hop steps the client checks")
    liar_args.add_argument("--honest-steps", type=int, default=500, help="steps of the honest swarm (no ban allowed)")
    liar_args.add_argument("--honest-train-steps", type=int, default=200,
                           help="liar-backward: training steps of the honest swarm (no ban allowed)")
    liar_args.add_argument("--honest-trainers", type=int, default=1,
                           help="liar-backward: trainers of the honest phase, at once on one job (each runs "
                                "--honest-train-steps)")
    liar_args.add_argument("--grad-noise", type=float, default=0.1,
                           help="liar-backward: the liar's gradient noise, x the gradient's std")
    training = p.add_argument_group("training scenarios (kill-replica-during-training, kill-last-replica)")
    training.add_argument("--replicas", type=int, default=3, help="replicas of the whole tiny model")
    training.add_argument("--train-steps", type=int, default=100, help="inner steps per replica")
    training.add_argument("--round-steps", type=int, default=10, help="H: inner steps per DiLoCo round")
    training.add_argument("--kill-round", type=int, default=4, help="SIGKILL the last replica inside this round "
                          "(kill-last-replica: after half of its inner steps)")
    training.add_argument("--batch-size", type=int, default=8)
    training.add_argument("--seq-len", type=int, default=64)
    training.add_argument("--lr", type=float, default=1e-2, help="inner AdamW lr")
    training.add_argument("--outer-lr", type=float, default=0.0, help="DiLoCo outer lr (0: the job default)")
    training.add_argument("--outer-momentum", type=float, default=None,
                          help="DiLoCo outer momentum (unset: the job default)")
    training.add_argument("--diloco-p", type=float, default=0.0, help="cocktail mask share (0: the job default)")
    training.add_argument("--val-batches", type=int, default=8)
    training.add_argument("--lease", type=float, default=4.0, help="coordinator lease, seconds")
    training.add_argument("--step-timeout", type=float, default=240.0, help="seconds per Forward/Backward")
    training.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
    result = SCENARIOS[args.scenario](args, workdir)
    print(json.dumps(result), flush=True)
    return 0 if result.get("completed") and result.get("tokens_match", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
