"""`pollinate demo`: a whole swarm on this machine, on the embedded SmolLM2.

What a real deployment does across machines, here as local processes on loopback:

1. convert the model once (per-block shards in the cache; every node then reads only its own);
2. start a coordinator (temporary data dir, any free port, a fresh swarm token);
3. start 3 nodes with only `--coordinator HOST:PORT`: each asks it for the DHT peers, joins,
   and loads the span it is assigned (10 blocks each for SmolLM2's 30);
4. show the swarm as `pollinate status` does;
5. answer a chat prompt through the swarm, streaming tokens, the way `pollinate generate
   --coordinator HOST:PORT` does, then run the whole model locally and compare the tokens;
6. fine-tune a little: `pollinate train --coordinator HOST:PORT` trains a LoRA job on the
   nodes (a few steps of two-digit sums), then the same question is asked with and without
   the job's adapter;
7. tear everything down: SIGTERM, then SIGKILL whatever lingers.

Each process logs to a file in the temporary directory; on a failure the tails are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PROMPT = "What is the capital of France?"
# Seconds to wait for the coordinator and for the nodes to be ready. Each node imports torch
# and loads its span; on a busy 2-core machine three of them take about a minute together.
COORDINATOR_READY_S = 90.0
NODES_READY_S = 300.0
# Seconds a process gets between SIGTERM and SIGKILL.
STOP_GRACE_S = 15.0
# The demo's fine-tune: a handful of LoRA steps on two-digit sums, enough to move the
# adapter and show the path end to end on a CPU in about a minute, not to teach arithmetic
# (benchmarks/bench_finetune.py measures that).
FINETUNE_JOB = "demo-sums"
FINETUNE_STEPS = 8
FINETUNE_LR = "1e-3"
FINETUNE_S = 600.0
SUM_QUESTION = "What is 23 + 45? Answer with just the number."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pollinate.node.cli_convert import add_cache_dir_argument

    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message (default: %(default)r)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--nodes", type=int, default=3, help="node processes to start (default: %(default)s)")
    parser.add_argument("--model", default=None, help="a model other than the embedded SmolLM2")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary directory with the logs")
    add_cache_dir_argument(parser)


def split_blocks(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) ranges of near-equal size covering all blocks: 30 in 3 -> 0:10, 10:20, 20:30."""
    if not 0 < parts <= num_blocks:
        raise ValueError(f"cannot cut {num_blocks} blocks into {parts} spans")
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    ready: Path

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def _start(workdir: Path, name: str, args: list[str]) -> _Proc:
    log, ready = workdir / f"{name}.log", workdir / f"{name}.ready.json"
    with open(log, "wb") as out:
        popen = subprocess.Popen([sys.executable, "-m", "pollinate", *args, "--ready-file", str(ready)],
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return _Proc(name, popen, log, ready)


def _wait_ready(procs: list[_Proc], timeout_s: float, on_ready) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(procs)
    while pending:
        for p in list(pending):
            if p.ready.exists():
                pending.remove(p)
                on_ready(p, json.loads(p.ready.read_text()))
            elif p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited with code {p.popen.returncode}:\n{p.tail()}")
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"{[p.name for p in pending]} not ready after {timeout_s:.0f} s:\n"
                               + "\n".join(p.tail() for p in pending))
        time.sleep(0.2)


def _stop(procs: list[_Proc]) -> None:
    """SIGTERM everyone (nodes leave the swarm and announce offline), then SIGKILL stragglers."""
    for p in procs:
        if p.popen.poll() is None:
            p.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"  {p.name} did not exit after SIGTERM; SIGKILL")
            p.popen.kill()
            p.popen.wait(10)


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/7] {text}", flush=True)


def _write_sums(path: Path, count: int, seed: int = 0) -> None:
    """`count` prompt/completion lines of two-digit sums answered with just the number."""
    import random

    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(count):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            f.write(json.dumps({"prompt": f"What is {a} + {b}? Answer with just the number.",
                                "completion": str(a + b)}) + "\n")


def _ask(remote, tokenizer, question: str, max_new_tokens: int, job: str | None = None) -> str:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with remote.inference_session(max_length=ids.shape[1] + max_new_tokens, job=job):
        out = remote.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def run(args: argparse.Namespace) -> int:
    from pollinate.node.cli_convert import cache_dir_from_cli
    from pollinate.node.model_files import ModelError, open_model

    model_name = args.model or "smollm2"
    cache_dir = cache_dir_from_cli(args.cache_dir)
    _step(1, f"the model: {model_name} (converted once into per-block shards, then shared by every node)")
    try:
        files = open_model(model_name, cache_dir=cache_dir, show_progress=True)
        spans = split_blocks(files.num_blocks, args.nodes)
    except (ModelError, ValueError) as e:
        print(f"pollinate demo: {e}", file=sys.stderr)
        return 2
    per_node = max(e - s for s, e in spans)
    print(f"  {files.num_blocks} blocks, hidden size {files.hidden_size}, cache {files.path}")

    workdir = Path(tempfile.mkdtemp(prefix="pollinate-demo-"))
    token_file = workdir / "swarm.token"
    token_file.write_text(secrets.token_hex(16) + "\n")
    token_file.chmod(0o600)
    procs: list[_Proc] = []
    remote = None
    ok = False
    try:
        _step(2, "starting the coordinator (membership, span assignment, the bootstrap DHT peer)")
        coord = _start(workdir, "coordinator", [
            "coordinator", "--data-dir", str(workdir / "coordinator-data"), "--port", "0",
            "--http-port", "0", "--token-file", str(token_file),
            "--model", model_name, "--num-blocks", str(files.num_blocks),
        ])
        procs.append(coord)
        info: dict = {}
        _wait_ready([coord], COORDINATOR_READY_S, lambda p, i: info.update(i))
        address = info["grpc"]
        print(f"  coordinator at {address}; status page http://{info['http']}/")

        _step(3, f"starting {args.nodes} nodes with only --coordinator {address} "
                 f"({per_node} blocks each, 1 torch thread each)")
        nodes = [_start(workdir, f"node-{i + 1}", [
            "node", "--coordinator", address, "--token-file", str(token_file),
            "--model", model_name, "--cache-dir", str(cache_dir), "--num-blocks", str(per_node),
            "--torch-threads", "1",
        ]) for i in range(args.nodes)]
        procs[:0] = nodes  # stopped before the coordinator, so they can leave gracefully
        t0 = time.monotonic()
        _wait_ready(nodes, NODES_READY_S, lambda p, i: print(
            f"  {p.name}: assigned blocks {i['blocks'][0]}:{i['blocks'][1]}, serving at {i['address']} "
            f"({i['throughput']:.0f} tokens/s measured), after {time.monotonic() - t0:.0f} s", flush=True))

        _step(4, "the swarm, as `pollinate status` shows it")
        table = subprocess.run([sys.executable, "-m", "pollinate", "status", "--coordinator", address,
                                "--token-file", str(token_file)],
                               capture_output=True, text=True, timeout=60)
        print("  " + table.stdout.strip().replace("\n", "\n  ") if table.returncode == 0
              else f"  pollinate status failed: {table.stderr.strip()}")

        _step(5, "a chat answer through the swarm (the client knows only the coordinator's address)")
        import torch
        from transformers import TextStreamer

        from pollinate.client.remote_model import RemoteModelForCausalLM

        remote = RemoteModelForCausalLM.from_pretrained(
            model_name, coordinator=address, token=token_file.read_text().strip(), cache_dir=cache_dir,
        )
        tokenizer = files.tokenizer()
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        prompt_ids = tokenizer(text, return_tensors="pt").input_ids
        gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
        print(f"  user: {args.prompt}\n  swarm: ", end="", flush=True)
        t0 = time.monotonic()
        with remote.inference_session(max_length=prompt_ids.shape[1] + args.max_new_tokens) as session:
            out = remote.generate(prompt_ids, streamer=TextStreamer(tokenizer, skip_prompt=True,
                                                                    skip_special_tokens=True), **gen)
            route = " -> ".join(str(h) for h in session.route)
        swarm_tokens = out[0, prompt_ids.shape[1]:].tolist()
        swarm_s = time.monotonic() - t0
        print(f"  ({len(swarm_tokens)} tokens in {swarm_s:.1f} s, route {route})")

        print("  the same prompt on the whole model, locally (the reference):")
        t0 = time.monotonic()
        local_model = files.load_reference_model()
        with torch.no_grad():
            local = local_model.generate(prompt_ids, **gen)[0, prompt_ids.shape[1]:].tolist()
        print(f"  local: {tokenizer.decode(local, skip_special_tokens=True)}")
        print(f"  ({len(local)} tokens in {time.monotonic() - t0:.1f} s)")
        if swarm_tokens != local:
            print(f"  MISMATCH: swarm {swarm_tokens}\n            local {local}", file=sys.stderr)
            return 1
        print(f"  match: the swarm's {len(local)} greedy tokens equal the local model's, token for token")

        _step(6, f"fine-tuning a little: {FINETUNE_STEPS} LoRA steps of job {FINETUNE_JOB!r} on two-digit "
                 "sums, trained on the nodes (the trainer knows only the coordinator's address)")
        data = workdir / "sums.jsonl"
        _write_sums(data, 64)
        before = _ask(remote, tokenizer, SUM_QUESTION, 8)
        train = subprocess.run([
            sys.executable, "-m", "pollinate", "train", "--coordinator", address,
            "--token-file", str(token_file), "--model", model_name, "--cache-dir", str(cache_dir),
            "--job", FINETUNE_JOB, "--data", str(data), "--steps", str(FINETUNE_STEPS),
            "--batch-size", "4", "--lr", FINETUNE_LR, "--eval-fraction", "0.125",
        ], timeout=FINETUNE_S)
        if train.returncode != 0:
            print(f"  pollinate train exited with code {train.returncode}", file=sys.stderr)
            return 1
        after = _ask(remote, tokenizer, SUM_QUESTION, 8, job=FINETUNE_JOB)
        print(f"  user: {SUM_QUESTION}\n  base model: {before!r}\n  with job {FINETUNE_JOB!r}: {after!r}")
        print(f"  (`pollinate generate --coordinator {address} --job {FINETUNE_JOB} ...` asks the same; "
              f"`pollinate export --job {FINETUNE_JOB} DIR` writes it as a PEFT adapter)")
        ok = True
        return 0
    except (RuntimeError, TimeoutError, OSError, ValueError, subprocess.TimeoutExpired) as e:
        print(f"\npollinate demo failed: {e}", file=sys.stderr)
        return 1
    finally:
        _step(7, "tearing down: nodes leave the swarm, then the coordinator stops")
        if remote is not None:
            remote.shutdown()
        _stop(procs)
        for p in procs:
            print(f"  {p.name} exited with code {p.popen.returncode}")
        if ok and not args.keep_logs:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"  logs kept in {workdir}")
