"""Training dynamics through a local swarm (issue 15): memorisation seen in the checkpoints.

A coordinator and two nodes (SmolLM2-135M-Instruct, blocks 0:15 and 15:30) on loopback; one
`pollinate train --coordinator` trains a LoRA job on a small set of random facts ("The vault
code of Brakomil is 4821.", one fact per example) for many passes, with a DiLoCo round every
H steps, so each round is a checkpoint at the coordinator, kept under the job's retention
schedule (last 2, log-spaced, every 4th). Held-out examples are facts of the same form
about other names: nothing in training predicts their codes. Then, on the kept checkpoints:

- `pollinate analyze`: mean loss on training vs held-out examples and the verbatim rates
  (greedy decoding reproduces the second half of the fact), per kept round;
- `pollinate export --round N` for the last round and a middle one, compared bit for bit
  with the committed state the coordinator serves for that round (client/checkpoints.py
  flat_from_peft inverts the export);
- `pollinate job record`: each kept state's checksum against the state served;
- the trainer's `--save` at the end (gathered from the nodes) against the last round's export.

Prints one JSON object per analysed round (round, train_loss, heldout_loss, verbatim_train,
verbatim_heldout, gap) and a final object: rounds_kept, bytes_kept, export_bit_exact,
memorisation_gap_grows (the held-out minus training loss at the last kept round exceeds the
gap at the first), record_checksums_match, trainer_save_equals_last_round, and the settings
and times.

    python benchmarks/bench_dynamics.py [--quick] [--workdir DIR] [--plot dyn.png]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pollinate.procs import ProcGroup, pollinate_cmd

JOB = "dynamics"
SPANS = [(0, 15), (15, 30)]
SYLLABLES = ("ba", "ko", "mil", "dra", "zen", "tur", "vo", "qui", "lex", "ran", "sho", "pel", "gri", "nax", "ulo", "fey")


def facts(n: int, seed: int) -> list[dict]:
    """`n` facts with distinct made-up names and random 4-digit codes, as `text` records."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize())
    return [{"text": f"The vault code of {name} is {rng.randrange(1000, 10000)}."} for name in sorted(names)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def committed_flat(coordinator: str, token: str, span: tuple[int, int], round_index: int):
    """(round, θ_global, sha256 of the state) the coordinator serves for `span` at round_index;
    ValueError if the state does not hash to the checksum served with it."""
    import asyncio

    from pollinate.compression.outer import state_checksum, state_from_bytes
    from pollinate.coordinator.client import fetch_committed_state
    from pollinate.protocol.v1 import common_pb2, coordinator_pb2

    reply = asyncio.run(fetch_committed_state(coordinator, token, coordinator_pb2.GetCommittedStateRequest(
        job=JOB, span=common_pb2.Span(start=span[0], end=span[1]), round=round_index), timeout_s=60))
    state = state_from_bytes(reply.state)
    checksum = state_checksum(state["global"], state["momentum"])
    if checksum != reply.checksum:
        raise ValueError(f"span {span} round {reply.round}: the state served does not hash to its checksum")
    return int(reply.round), state["global"], checksum


def main() -> int:
    p = argparse.ArgumentParser(description="memorisation across a swarm job's checkpoints")
    p.add_argument("--quick", action="store_true", help="16 facts, 40 steps (8 rounds)")
    p.add_argument("--train-examples", type=int, default=32)
    p.add_argument("--heldout-examples", type=int, default=16)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--round-steps", type=int, default=5, help="H: inner steps per DiLoCo round (one checkpoint each)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per node")
    p.add_argument("--plot", type=Path, help="also draw the analysis (matplotlib)")
    p.add_argument("--workdir", type=Path, help="keep logs, data and exports here (default: a temp dir)")
    args = p.parse_args()
    n_train, n_held, steps = (16, 8, 40) if args.quick else (args.train_examples, args.heldout_examples, args.steps)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-dynamics-"))
    work.mkdir(parents=True, exist_ok=True)
    records = facts(n_train + n_held, args.seed)
    random.Random(args.seed + 1).shuffle(records)
    train = write_jsonl(work / "train.jsonl", records[:n_train])
    held = write_jsonl(work / "heldout.jsonl", records[n_train:])
    token = "bench-dynamics-token"
    (work / "token").write_text(token + "\n")
    auth = ["--token-file", str(work / "token")]
    t0 = time.perf_counter()
    with ProcGroup(work) as group:
        coord = group.start("coordinator", ["coordinator", "--data-dir", str(work / "coord-data"), "--port", "0",
                                            "--http-port", "-1", *auth, "--round-window", "30"])
        group.wait_ready([coord], timeout=120)
        address = coord.info["grpc"]
        nodes = [group.start(f"node-{i}", ["node", "--coordinator", address, *auth, "--blocks", f"{s}:{e}",
                                           "--throughput", "100", "--torch-threads", str(args.torch_threads)])
                 for i, (s, e) in enumerate(SPANS)]
        group.wait_ready(nodes, timeout=600)
        t_ready = time.perf_counter()
        run(pollinate_cmd("train", "--coordinator", address, *auth, "--job", JOB, "--data", str(train),
                          "--eval-data", str(held), "--eval-every", str(args.round_steps), "--steps", str(steps),
                          "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--rank", str(args.rank),
                          "--alpha", str(2 * args.rank), "--targets", args.targets, "--grad-clip", "0",
                          "--seed", str(args.seed), "--round-steps", str(args.round_steps), "--codec", "none",
                          # one replica per span: a round adopts the replica's adapter as is (no outer
                          # momentum: with it, a solo round extrapolates and lr 3e-3 diverged)
                          "--diloco-codec", "none", "--outer-lr", "1", "--outer-momentum", "0",
                          "--keep-last", "2", "--keep-log-spaced", "--keep-every", "4",
                          "--save", str(work / "saved")), timeout=3600)
        t_trained = time.perf_counter()
        show = json.loads(run(pollinate_cmd("job", "show", JOB, "--coordinator", address, *auth, "--json"), 60).stdout)
        kept = sorted(set.intersection(*(set(s["kept"]) for s in show["checkpoints"]["spans"].values())))
        analysis_file = work / "analysis.jsonl"
        run(pollinate_cmd("analyze", "--job", JOB, "--coordinator", address, *auth, "--data", str(train),
                          "--heldout", str(held), "--out", str(analysis_file),
                          *(["--plot", str(args.plot)] if args.plot else [])), timeout=3600)
        t_analysed = time.perf_counter()
        rows = [json.loads(line) for line in analysis_file.read_text().splitlines()]
        for r in rows:
            print(json.dumps({"bench": "dynamics", "round": r["round"], "train_loss": round(r["train_loss"], 4),
                              "heldout_loss": round(r["heldout_loss"], 4), "gap": round(r["gap"], 4),
                              "verbatim_train": r["verbatim_train"], "verbatim_heldout": r["verbatim_heldout"]}),
                  flush=True)

        # exports at the last round and a middle kept one, bit for bit against the served state
        from pollinate.client.checkpoints import flat_from_peft
        from pollinate.node.model_files import open_model
        from pollinate.protocol.shared import JobSpec
        from safetensors.torch import load_file
        import torch

        files = open_model("smollm2", show_progress=False)
        spec = JobSpec.from_proto(_job_spec(address, token))
        exact, blocks = [], {}
        for r in sorted({kept[-1], kept[len(kept) // 2]}):
            out = work / f"export-r{r}"
            run(pollinate_cmd("export", "--job", JOB, "--round", str(r), str(out), "--coordinator", address, *auth), 600)
            state = load_file(out / "adapter_model.safetensors")
            for span in SPANS:
                served_round, theta, _ = committed_flat(address, token, span, r)
                exact.append(served_round == r
                             and torch.equal(flat_from_peft(spec, files, span, state, blocks=blocks), theta))
        # the trainer's own --save at the end (gathered from the nodes) is the last round's checkpoint:
        # a solo round with outer lr 1 and no momentum commits the replica's adapter as it is
        saved = load_file(work / "saved" / "adapter_model.safetensors")
        last = load_file(work / f"export-r{kept[-1]}" / "adapter_model.safetensors")
        save_equals_last = saved.keys() == last.keys() and all(torch.equal(saved[k], last[k]) for k in saved)
        record = json.loads(run(pollinate_cmd("job", "record", JOB, "--coordinator", address, *auth), 60).stdout)
        # every kept state is served for its round and hashes to the checksum the record lists
        kept_records = [x for x in record["rounds"] if x["kept"]]
        record_ok = bool(kept_records) and all(
            committed_flat(address, token, tuple(x["span"]), x["round"])[::2] == (x["round"], x["checksum"])
            for x in kept_records)
        rounds_committed = max(x["round"] for x in record["rounds"])
    first, last = rows[0], rows[-1]
    print(json.dumps({
        "bench": "dynamics", "model": "smollm2-135m-instruct", "spans": SPANS, "method": "lora", "rank": args.rank,
        "targets": args.targets, "lr": args.lr, "train_examples": n_train, "heldout_examples": n_held,
        "steps": steps, "batch_size": args.batch_size, "round_steps": args.round_steps,
        "rounds_committed": rounds_committed, "rounds_kept": kept, "bytes_kept": show["checkpoints"]["kept_bytes"],
        "export_bit_exact": all(exact), "exports_checked": len(exact),
        "record_checksums_match": record_ok, "trainer_save_equals_last_round": save_equals_last,
        "memorisation_gap_grows": last["gap"] > first["gap"],
        "gap_first": round(first["gap"], 4), "gap_last": round(last["gap"], 4),
        "verbatim_train_last": last["verbatim_train"], "verbatim_heldout_last": last["verbatim_heldout"],
        "losses_reported": len(record["losses"]), "trainer_data_files": len(record["data"][0]["files"]),
        "start_s": round(t_ready - t0, 1), "train_s": round(t_trained - t_ready, 1),
        "analyze_s": round(t_analysed - t_trained, 1), "total_s": round(time.perf_counter() - t0, 1),
        "torch_threads": args.torch_threads,
    }), flush=True)
    return 0


def _job_spec(address: str, token: str):
    import asyncio

    from pollinate.coordinator.client import call_coordinator
    from pollinate.protocol.v1 import coordinator_pb2

    return asyncio.run(call_coordinator(address, token, "GetJob", coordinator_pb2.GetJobRequest(name=JOB))).spec


if __name__ == "__main__":
    sys.exit(main())
