"""`pollinate demo`: a whole swarm on this machine, on the embedded SmolLM2.

What a real deployment does across machines, here as local processes on loopback:

1. convert the model once (per-block shards in the cache; every node then reads only its own);
2. start a coordinator (temporary data dir, any free port, a fresh swarm token);
3. start 3 nodes that join through `--coordinator HOST:PORT`: one hosts the first half of
   the blocks, two host the second half, so that span has two replicas;
4. show the swarm as `pollinate status` does;
5. answer a chat prompt through the swarm, streaming tokens, the way `pollinate generate
   --coordinator HOST:PORT` does, then run the whole model locally and compare the tokens;
6. fine-tune a LoRA job on the nodes with one trainer per replica (demo_trainer.py says why),
   each on its own data; every H inner steps the two replicas run a DiLoCo round (exchange
   compressed pseudo-gradients, commit at the coordinator), printed from the node logs as it
   commits;
7. ask the question again with the job's adapter;
8. `pollinate export` the job as a PEFT adapter, load it with peft onto the local model and
   check that it answers the same tokens as the swarm with the job;
9. tear everything down: SIGTERM, then SIGKILL whatever lingers (also on a failure, Ctrl-C
   or SIGTERM).

Each process logs to a file in the temporary directory; on a failure the tails are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
STOP_GRACE_S = 30.0
# The demo's fine-tune: LoRA on two-digit sums, each replica's trainer on its own 64 of them.
# H = 4 inner steps per round and 8 steps per trainer give 2 rounds between the replicas:
# enough to show rounds committing, not to teach arithmetic (benchmarks/bench_finetune.py
# measures that). Rank 4, not the default 8: a round's committed state (θ_global and the
# outer momentum, fp32) travels in one CommitRound message, and for rank 8 on 15 of
# SmolLM2's blocks that is 1.8 MB, over the 1.1 MB gRPC message limit (docs/deploy.md).
FINETUNE_JOB = "demo-sums"
FINETUNE_STEPS = 8
ROUND_STEPS = 4
FINETUNE_RANK = "8"
FINETUNE_LR = "2e-3"
FINETUNE_BATCH = 4
FINETUNE_S = 600.0
# A round waits this long for the span's replicas to ask (the coordinator's --round-window):
# the two trainers share one 2-core machine and drift apart by seconds, and a replica that
# asks after the window closes is left out of the round.
ROUND_WINDOW_S = 30.0
SUM_QUESTION = "What is 23 + 45? Answer with just the number."
SUM_TOKENS = 8
STEPS = 9
# What the nodes and the coordinator log about rounds (node/rounds.py, coordinator/rounds.py).
ROUND_LINE = re.compile(r"(round \d+ (?:attempt \d+ )?of job .*(?:committed|failed|given up|aborted|adopted).*)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pollinate.node.cli_convert import add_cache_dir_argument

    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message (default: %(default)r)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--model", default=None, help="a model other than the embedded SmolLM2")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary directory with the logs")
    add_cache_dir_argument(parser)
    from pollinate.client.cli_args import add_torch_threads_argument

    add_torch_threads_argument(parser)  # this process runs the local reference model


def split_blocks(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) ranges of near-equal size covering all blocks: 30 in 3 -> 0:10, 10:20, 20:30."""
    if not 0 < parts <= num_blocks:
        raise ValueError(f"cannot cut {num_blocks} blocks into {parts} spans")
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def node_layout(num_blocks: int) -> list[tuple[int, int]]:
    """The demo's nodes: one replica of the first half of the blocks, two of the second."""
    first, second = split_blocks(num_blocks, 2)
    return [first, second, second]


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    ready: Path | None

    def tail(self, lines: int = 15) -> str:
        try:
            text = "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            text = "(no log)"
        return f"--- {self.name} ({self.log}) ---\n{text}"


def _start(workdir: Path, name: str, args: list[str], *, module: str = "pollinate", ready: bool = True) -> _Proc:
    log = workdir / f"{name}.log"
    ready_file = workdir / f"{name}.ready.json" if ready else None
    with open(log, "wb") as out:
        popen = subprocess.Popen([sys.executable, "-m", module, *args,
                                  *(["--ready-file", str(ready_file)] if ready_file else [])],
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return _Proc(name, popen, log, ready_file)


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


class LogFollower:
    """The lines matching `pattern` that processes append to their logs, as they appear."""

    def __init__(self, procs: list[_Proc], pattern: re.Pattern):
        self.procs, self.pattern = procs, pattern
        self._offsets = {p.name: 0 for p in procs}

    def new(self) -> list[tuple[str, str]]:
        """(process name, matched text) for every complete new line that matches."""
        found = []
        for p in self.procs:
            try:
                with open(p.log, "rb") as f:
                    f.seek(self._offsets[p.name])
                    chunk = f.read()
            except FileNotFoundError:
                continue
            complete = chunk[:chunk.rfind(b"\n") + 1]  # a half-written line waits for the next call
            self._offsets[p.name] += len(complete)
            for line in complete.decode(errors="replace").splitlines():
                m = self.pattern.search(line)
                if m:
                    found.append((p.name, m.group(1)))
        return found


def _step(n: int, text: str, t_start: float) -> None:
    import textwrap

    head = f"[{n}/{STEPS}] ({time.monotonic() - t_start:.0f} s) "
    print("\n" + textwrap.fill(head + text, width=100, subsequent_indent=" " * len(head)), flush=True)


def replica_round(status: dict, job: str, span: tuple[int, int]) -> tuple[int, list[str]]:
    """From `pollinate status --json`: the last committed round of `job` on `span` and the
    members whose checksum is in it ((0, []) when none committed)."""
    for r in status.get("rounds", []):  # proto3 JSON leaves zeros and false out
        got = (r.get("span", {}).get("start", 0), r.get("span", {}).get("end", 0))
        if r.get("job") == job and got == tuple(span):
            return int(r.get("round", 0)), [m["member_id"] for m in r.get("members", []) if m.get("committed")]
    return 0, []


def _write_sums(path: Path, count: int, seed: int) -> None:
    """`count` prompt/completion lines of two-digit sums answered with just the number."""
    import random

    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(count):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            f.write(json.dumps({"prompt": f"What is {a} + {b}? Answer with just the number.",
                                "completion": str(a + b)}) + "\n")


def _chat_ids(tokenizer, question: str):
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt").input_ids


def _ask(remote, tokenizer, question: str, max_new_tokens: int, job: str | None = None) -> list[int]:
    """Greedy answer tokens from the swarm (with `job`'s adapter when given)."""
    ids = _chat_ids(tokenizer, question)
    with remote.inference_session(max_length=ids.shape[1] + max_new_tokens, job=job):
        out = remote.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def _cli(args: list[str], timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pollinate", *args], capture_output=True, text=True,
                          timeout=timeout_s)


def _show(out: subprocess.CompletedProcess, what: str) -> None:
    if out.returncode != 0:
        raise RuntimeError(f"{what} exited with code {out.returncode}: {out.stderr.strip()}")
    print("  " + out.stdout.strip().replace("\n", "\n  "))


def _raise_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so that `finally` tears the swarm down


def run(args: argparse.Namespace) -> int:
    from pollinate.node.cli_convert import cache_dir_from_cli
    from pollinate.node.model_files import ModelError, open_model

    t_start = time.monotonic()
    model_name = args.model or "smollm2"
    cache_dir = cache_dir_from_cli(args.cache_dir)
    _step(1, f"the model: {model_name} (converted once into per-block shards, then shared by every node)", t_start)
    try:
        files = open_model(model_name, cache_dir=cache_dir, show_progress=True)
        layout = node_layout(files.num_blocks)
    except (ModelError, ValueError) as e:
        print(f"pollinate demo: {e}", file=sys.stderr)
        return 2
    print(f"  {files.num_blocks} blocks, hidden size {files.hidden_size}, cache {files.path}")

    workdir = Path(tempfile.mkdtemp(prefix="pollinate-demo-"))
    print(f"  every process logs to {workdir}/<name>.log (removed at the end unless --keep-logs or a failure)")
    token_file = workdir / "swarm.token"
    token_file.write_text(secrets.token_hex(16) + "\n")
    token_file.chmod(0o600)
    auth = ["--token-file", str(token_file)]
    procs: list[_Proc] = []
    remote = None
    ok = False
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        _step(2, "starting the coordinator (membership, span assignment, DiLoCo rounds, the bootstrap "
                 "DHT peer)", t_start)
        coord = _start(workdir, "coordinator", [
            "coordinator", "--data-dir", str(workdir / "coordinator-data"), "--port", "0",
            "--http-port", "0", *auth, "--model", model_name, "--num-blocks", str(files.num_blocks),
            "--round-window", str(ROUND_WINDOW_S),
        ])
        procs.append(coord)
        info: dict = {}
        _wait_ready([coord], COORDINATOR_READY_S, lambda p, i: info.update(i))
        address = info["grpc"]
        print(f"  coordinator at {address}; status page http://{info['http']}/")

        spans = ", ".join(f"node-{i + 1} {s}:{e}" for i, (s, e) in enumerate(layout))
        _step(3, f"starting {len(layout)} nodes that join through --coordinator {address}: {spans}. "
                 f"Blocks {layout[1][0]}:{layout[1][1]} have two replicas, which will train the same job on "
                 "different data and meet in DiLoCo rounds (--blocks fixes the layout; without it the "
                 "coordinator places each node where blocks are weakest)", t_start)
        nodes = [_start(workdir, f"node-{i + 1}", [
            "node", "--coordinator", address, *auth, "--model", model_name, "--cache-dir", str(cache_dir),
            "--blocks", f"{s}:{e}", "--torch-threads", "1",
        ]) for i, (s, e) in enumerate(layout)]
        procs[:0] = nodes  # stopped before the coordinator, so they can leave gracefully
        addresses: dict[str, str] = {}
        t0 = time.monotonic()

        def on_node_ready(p: _Proc, i: dict) -> None:
            addresses[p.name] = i["address"]
            print(f"  {p.name}: blocks {i['blocks'][0]}:{i['blocks'][1]}, serving at {i['address']} "
                  f"({i['throughput']:.0f} tokens/s measured), ready after {time.monotonic() - t0:.0f} s",
                  flush=True)

        _wait_ready(nodes, NODES_READY_S, on_node_ready)

        _step(4, "the swarm, as `pollinate status` shows it", t_start)
        _show(_cli(["status", "--coordinator", address, *auth]), "pollinate status")

        _step(5, "a chat answer through the swarm (the client knows only the coordinator's address)", t_start)
        import torch
        from transformers import TextStreamer

        from pollinate.client.remote_model import RemoteModelForCausalLM

        # fp32 hidden states on the wire (the CLI's default is fp16) so that the comparisons
        # with the local model below are exact.
        remote = RemoteModelForCausalLM.from_pretrained(
            model_name, coordinator=address, token=token_file.read_text().strip(), cache_dir=cache_dir,
            wire_codec="none",
        )
        tokenizer = files.tokenizer()
        prompt_ids = _chat_ids(tokenizer, args.prompt)
        gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
        print(f"  user: {args.prompt}\n  swarm: ", end="", flush=True)
        t0 = time.monotonic()
        with remote.inference_session(max_length=prompt_ids.shape[1] + args.max_new_tokens) as session:
            out = remote.generate(prompt_ids, streamer=TextStreamer(tokenizer, skip_prompt=True,
                                                                    skip_special_tokens=True), **gen)
            route = " -> ".join(str(h) for h in session.route)
        swarm_tokens = out[0, prompt_ids.shape[1]:].tolist()
        print(f"  ({len(swarm_tokens)} tokens in {time.monotonic() - t0:.1f} s, route {route})")

        print("  the same prompt on the whole model, locally (the reference):")
        t0 = time.monotonic()
        local_model = files.load_reference_model()
        with torch.no_grad():
            local = local_model.generate(prompt_ids, **gen)[0, prompt_ids.shape[1]:].tolist()
        print(f"  local: {tokenizer.decode(local, skip_special_tokens=True)}")
        print(f"  ({len(local)} tokens in {time.monotonic() - t0:.1f} s)")
        if swarm_tokens != local:
            raise RuntimeError(f"the swarm's tokens differ from the local model's:\n  swarm {swarm_tokens}\n"
                               f"  local {local}")
        print(f"  match: the swarm's {len(local)} greedy tokens equal the local model's, token for token")
        before = _ask(remote, tokenizer, SUM_QUESTION, SUM_TOKENS)

        replicas = [n for n, (s, e) in zip(nodes, layout) if (s, e) == layout[1]]
        _step(6, f"fine-tuning LoRA (rank {FINETUNE_RANK}) job {FINETUNE_JOB!r} on the nodes: one trainer per replica of blocks "
                 f"{layout[1][0]}:{layout[1][1]}, {FINETUNE_STEPS} steps of {FINETUNE_BATCH} two-digit sums each, "
                 f"its own data. Every H = {ROUND_STEPS} inner steps the replicas of a span run a DiLoCo round: "
                 "each sends its compressed pseudo-gradient shard to the other, both apply the same outer step "
                 f"and the coordinator commits the round when their checksums agree. "
                 f"{layout[0][0]}:{layout[0][1]} has one replica (both trainers pass through it), so its "
                 "rounds are local: a group of 1, whose only traffic is its commit to the coordinator",
                 t_start)
        trainers = []
        for i, replica in enumerate(replicas):
            data = workdir / f"sums-{i + 1}.jsonl"
            _write_sums(data, 64, seed=i)
            others = [a for n, a in addresses.items() if n != replica.name and n in {r.name for r in replicas}]
            trainers.append(_start(workdir, f"trainer-{i + 1}", [
                "--coordinator", address, *auth, "--model", model_name, "--cache-dir", str(cache_dir),
                "--job", FINETUNE_JOB, "--data", str(data), "--steps", str(FINETUNE_STEPS),
                "--batch-size", str(FINETUNE_BATCH), "--rank", FINETUNE_RANK, "--lr", FINETUNE_LR,
                "--round-steps", str(ROUND_STEPS),
                *[f for a in others for f in ("--avoid", a)],
            ], module="pollinate.demo_trainer", ready=False))
            print(f"  trainer-{i + 1}: through {replica.name} ({addresses[replica.name]}), data {data.name}")
        procs[:0] = trainers
        _follow_training(trainers, LogFollower(nodes, ROUND_LINE), t_start)

        status = _cli(["status", "--coordinator", address, *auth, "--json"])
        if status.returncode != 0:
            raise RuntimeError(f"pollinate status --json exited with code {status.returncode}: {status.stderr}")
        rnd, members = replica_round(json.loads(status.stdout), FINETUNE_JOB, layout[1])
        if len(members) < 2:
            raise RuntimeError(f"no DiLoCo round of {FINETUNE_JOB!r} on {layout[1][0]}:{layout[1][1]} was "
                               f"committed by both replicas (last committed: round {rnd}, members {members})")
        print(f"  round {rnd} of blocks {layout[1][0]}:{layout[1][1]} committed by both replicas: the coordinator "
              "holds their common state. The job and its rounds, as `pollinate status` shows them:")
        _show(_cli(["status", "--coordinator", address, *auth]), "pollinate status")

        _step(7, "the same question to the swarm, without and with the job's adapter", t_start)
        after = _ask(remote, tokenizer, SUM_QUESTION, SUM_TOKENS, job=FINETUNE_JOB)
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()
        print(f"  user: {SUM_QUESTION}\n  base model:          {decode(before)!r}\n"
              f"  with job {FINETUNE_JOB!r}: {decode(after)!r}")
        print(f"  (the same from the command line: `pollinate generate --coordinator {address} "
              f"--job {FINETUNE_JOB} \"{SUM_QUESTION}\"`)")

        _step(8, f"`pollinate export --job {FINETUNE_JOB}`: the job's adapter from every span, as one PEFT "
                 "adapter, loaded with peft onto the local model", t_start)
        export_dir = workdir / "export"
        t0 = time.monotonic()
        _show(_cli(["export", "--coordinator", address, *auth, "--model", model_name, "--cache-dir", str(cache_dir),
                    "--job", FINETUNE_JOB, str(export_dir)]), "pollinate export")
        print(f"  ({time.monotonic() - t0:.1f} s; files: {', '.join(sorted(p.name for p in export_dir.iterdir()))})")
        import warnings

        from peft import PeftModel

        with warnings.catch_warnings():  # transformers' deprecation notice about peft's own call
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = PeftModel.from_pretrained(local_model, str(export_dir)).eval()
        ids = _chat_ids(tokenizer, SUM_QUESTION)
        with torch.no_grad():
            exported = peft_model.generate(ids, max_new_tokens=SUM_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist()
        print(f"  local model + exported adapter (peft): {decode(exported)!r}")
        if exported != after:
            raise RuntimeError(f"the exported adapter answers differently from the swarm with the job:\n"
                               f"  peft  {exported}\n  swarm {after}")
        print(f"  match: the exported adapter gives the swarm's {len(after)} tokens with job {FINETUNE_JOB!r}")
        ok = True
        return 0
    except (RuntimeError, TimeoutError, OSError, ValueError, subprocess.TimeoutExpired) as e:
        print(f"\npollinate demo failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\npollinate demo interrupted", file=sys.stderr)
        return 130
    finally:
        _step(9, "tearing down: trainers and nodes leave the swarm, then the coordinator stops", t_start)
        if remote is not None:
            remote.shutdown()
        _stop(procs)
        for p in procs:
            print(f"  {p.name} exited with code {p.popen.returncode}")
        signal.signal(signal.SIGTERM, previous_sigterm)
        if ok and not args.keep_logs:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        else:
            if not ok:
                print("\n".join(p.tail() for p in procs), file=sys.stderr)
            print(f"  logs kept in {workdir}")
        print(f"  demo {'finished' if ok else 'stopped'} after {time.monotonic() - t_start:.0f} s")


def _follow_training(trainers: list[_Proc], rounds: LogFollower, t_start: float) -> None:
    """Wait for the trainers, printing each round line the nodes and the coordinator log."""
    deadline = time.monotonic() + FINETUNE_S
    pending = list(trainers)
    while pending:
        for name, line in rounds.new():
            print(f"  ({time.monotonic() - t_start:.0f} s) {name}: {line}", flush=True)
        for p in list(pending):
            if p.popen.poll() is None:
                continue
            pending.remove(p)
            if p.popen.returncode != 0:
                raise RuntimeError(f"{p.name} exited with code {p.popen.returncode}:\n{p.tail()}")
            result = json.loads([line for line in p.log.read_text(errors="replace").splitlines()
                                 if line.startswith("{")][-1])  # the trainer's last stdout line
            print(f"  {p.name} done: loss {result['first_loss']:.3f} at step 1 -> {result['loss']:.3f} at step "
                  f"{result['step']}, held-out loss {result.get('eval_loss', float('nan')):.3f}, "
                  f"{result['tokens']} tokens", flush=True)
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"{[p.name for p in pending]} not done after {FINETUNE_S:.0f} s")
        time.sleep(0.5)
    for name, line in rounds.new():
        print(f"  ({time.monotonic() - t_start:.0f} s) {name}: {line}", flush=True)
