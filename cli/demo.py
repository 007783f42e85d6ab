"""`pollinate demo`: a whole swarm on this machine, on the embedded SmolLM2.

What a real deployment does across machines, here as local processes on loopback:

1. convert the model once (per-block shards in the cache; every node then reads only its own);
2. start a coordinator (temporary data dir, any free port, a fresh swarm token);
3. start 3 nodes that join through `--coordinator HOST:PORT`: one hosts the first half of
   the blocks, two host the second half, so that span has two replicas;
4. show the swarm as `pollinate status` does;
5. answer a chat prompt through the swarm, streaming tokens, the way `pollinate generate
   --coordinator HOST:PORT` does, then run the whole model locally and compare the tokens;
6. ask the base model a few held-out questions of the task the job will learn ("What is 47
   times 10?"): a 135M model answers them wrongly or not at all;
7. fine-tune a LoRA job on that task on the nodes with one trainer per replica
   (demo_trainer.py says why), each on its own data; every H inner steps the two replicas
   run a DiLoCo round (exchange compressed pseudo-gradients, commit at the coordinator),
   printed from the node logs as it commits;
8. ask the held-out questions again with the job's adapter;
9. `pollinate export` the job as a PEFT adapter, load it with peft onto the local model and
   check that it answers the same tokens as the swarm with the job;
10. tear everything down (pollinate.procs: SIGTERM, then SIGKILL of each process group, also
   on a failure, Ctrl-C or SIGTERM) and print one JSON line summarising the run.

Each process logs to a file in the temporary directory; on a failure the tails are printed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pollinate.procs import Proc, ProcGroup

DEFAULT_PROMPT = "What is the capital of France?"
# Seconds to wait for the coordinator and for the nodes to be ready. Each node imports torch
# and loads its span; on a busy 2-core machine three of them take about a minute together.
COORDINATOR_READY_S = 90.0
NODES_READY_S = 300.0
# Seconds a process gets between SIGTERM and SIGKILL.
STOP_GRACE_S = 30.0
# The demo's fine-tune (issue 17: the demo must show a change that is plainly right). The
# task: "What is N times 10?" answered with just the number. SmolLM2-135M gets it wrong
# ("77 times 10 is 77.") or talks around it ("To solve this problem, ..."); the rule (append
# a zero) is one a LoRA learns in a few steps, and it holds for numbers the trainers never
# saw, so the held-out questions test the rule, not memory. In-process LoRA on the whole
# model (rank 8, lr 3e-3) answered 8 of 8 held-out questions after 10 steps of 4, from 0.
# Rank 8 on 15 blocks: a round's committed state (θ_global and the outer momentum, fp32)
# is 1.8 MB, under the coordinator's 64 MiB state limit (COORDINATOR_STATE_BYTES).
FINETUNE_JOB = "demo-times-ten"
FINETUNE_STEPS = 10  # per trainer; the single replica of the first half takes both: 20
ROUND_STEPS = 5  # H: two rounds per trainer, the last one at its last step
FINETUNE_RANK = "8"
FINETUNE_LR = "3e-3"
FINETUNE_BATCH = 4
FINETUNE_EXAMPLES = 64  # per trainer, each from its own seed
FINETUNE_S = 600.0
HELD_OUT = (23, 47, 65, 88)  # the questions asked before and after; no trainer sees them
ANSWER_TOKENS = 12  # enough for "650" and for the base model's sentence to reach its number
# A round waits this long for the span's replicas to ask (the coordinator's --round-window):
# the two trainers share one 2-core machine and drift apart by seconds, and a replica that
# asks after the window closes is left out of the round.
ROUND_WINDOW_S = 30.0
STEPS = 10
# What the nodes and the coordinator log about rounds (node/rounds.py, coordinator/rounds.py).
ROUND_LINE = re.compile(r"(round \d+ (?:attempt \d+ )?of job .*(?:committed|failed|given up|aborted|adopted).*)")


def question(n: int) -> str:
    return f"What is {n} times 10? Answer with just the number."


def correct(answer: str, expected: str) -> bool:
    """The expected number is among the answer's numbers: generous to a base model that
    answers in a sentence ("65 times 10 is 650." counts)."""
    return expected in re.findall(r"\d+", answer)


def write_task_data(path: Path, count: int, seed: int) -> None:
    """`count` prompt/completion lines of the task, none of them a HELD_OUT question."""
    rng = random.Random(seed)
    numbers = [n for n in range(11, 100) if n not in HELD_OUT]
    with path.open("w") as f:
        for _ in range(count):
            n = rng.choice(numbers)
            f.write(json.dumps({"prompt": question(n), "completion": str(n * 10)}) + "\n")


@dataclass
class Summary:
    """The demo's last line (JSON): what it showed, for a person or a script."""

    ok: bool = False
    seconds: float = 0.0
    questions: list[str] = field(default_factory=lambda: [question(n) for n in HELD_OUT])
    expected_answers: list[str] = field(default_factory=lambda: [str(n * 10) for n in HELD_OUT])
    base_answers: list[str] = field(default_factory=list)
    job_answers: list[str] = field(default_factory=list)
    export_match: bool = False
    rounds_committed: int = 0  # last round of the replicated span committed by both replicas
    error: str = ""

    def line(self) -> str:
        count = lambda answers: sum(correct(a, e) for a, e in zip(answers, self.expected_answers))
        return json.dumps({"ok": self.ok, "seconds": round(self.seconds, 1), "questions": self.questions,
                           "expected_answers": self.expected_answers, "base_answers": self.base_answers,
                           "job_answers": self.job_answers, "base_correct": count(self.base_answers),
                           "job_correct": count(self.job_answers), "export_match": self.export_match,
                           "rounds_committed": self.rounds_committed, "steps": FINETUNE_STEPS,
                           "lr": float(FINETUNE_LR), "error": self.error})


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


class LogFollower:
    """The lines matching `pattern` that processes append to their logs, as they appear."""

    def __init__(self, procs: list[Proc], pattern: re.Pattern):
        self.procs, self.pattern = procs, pattern
        self._offsets = {p.name: 0 for p in procs}

    def new(self) -> list[tuple[str, str]]:
        """(process name, matched text) for every complete new line that matches."""
        found = []
        for p in self.procs:
            try:
                with open(p.log_path, "rb") as f:
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


def _chat_ids(tokenizer, question: str):
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt").input_ids


def _ask(remote, tokenizer, question: str, job: str | None = None) -> str:
    """The swarm's greedy answer (with `job`'s adapter when given), decoded."""
    ids = _chat_ids(tokenizer, question)
    with remote.inference_session(max_length=ids.shape[1] + ANSWER_TOKENS, job=job):
        out = remote.generate(ids, max_new_tokens=ANSWER_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


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
    summary = Summary()
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
    swarm = _Swarm(group=ProcGroup(workdir), workdir=workdir, model=model_name, cache_dir=cache_dir,
                   token_file=token_file, layout=layout, t_start=t_start)
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        _story(args, swarm, files, summary)
        summary.ok = True
        return 0
    except (RuntimeError, TimeoutError, OSError, ValueError, subprocess.TimeoutExpired) as e:
        summary.error = str(e).splitlines()[0]
        print(f"\npollinate demo failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        summary.error = "interrupted"
        print("\npollinate demo interrupted", file=sys.stderr)
        return 130
    finally:
        _step(10, "tearing down: trainers and nodes leave the swarm, then the coordinator stops", t_start)
        swarm.stop(ok=summary.ok, keep_logs=args.keep_logs)
        signal.signal(signal.SIGTERM, previous_sigterm)
        summary.seconds = time.monotonic() - t_start
        print(f"  demo {'finished' if summary.ok else 'stopped'} after {summary.seconds:.0f} s")
        print(summary.line(), flush=True)


def _story(args, swarm: _Swarm, files, summary: Summary) -> None:
    """Steps 2 to 9; what they show goes into `summary`. Raises on anything that is not as
    it must be (the swarm's tokens differ from the local model's, no round committed, ...)."""
    t_start, span, other = swarm.t_start, swarm.layout[1], swarm.layout[0]
    swarm.start(files.num_blocks)
    _step(5, "a chat answer through the swarm (the client knows only the coordinator's address)", t_start)
    remote = swarm.remote_model()
    tokenizer = files.tokenizer()
    local_model = _chat_through_the_swarm(remote, files, tokenizer, args)

    _step(6, f"{len(HELD_OUT)} questions of the task the job will learn, to the base model through the "
             "swarm (no trainer sees these questions)", t_start)
    summary.base_answers = [_ask(remote, tokenizer, q) for q in summary.questions]
    _show_answers(summary.questions, summary.base_answers, summary.expected_answers, "base model")

    _step(7, f"fine-tuning LoRA (rank {FINETUNE_RANK}) job {FINETUNE_JOB!r} on the nodes: one trainer per "
             f"replica of blocks {span[0]}:{span[1]}, {FINETUNE_STEPS} steps of {FINETUNE_BATCH} questions "
             f"each (lr {FINETUNE_LR}), its own data. Every H = {ROUND_STEPS} inner steps the replicas of a "
             "span run a DiLoCo round: each sends its compressed pseudo-gradient shard to the other, both "
             "apply the same outer step and the coordinator commits the round when their checksums agree. "
             f"{other[0]}:{other[1]} has one replica (both trainers pass through it), so its rounds are "
             "local: a group of 1, whose only traffic is its commit to the coordinator", t_start)
    summary.rounds_committed = swarm.fine_tune()

    _step(8, "the same questions with the job's adapter", t_start)
    summary.job_answers = [_ask(remote, tokenizer, q, job=FINETUNE_JOB) for q in summary.questions]
    _show_answers(summary.questions, summary.job_answers, summary.expected_answers, f"job {FINETUNE_JOB!r}")
    print(f"  (the same from the command line: `pollinate generate --coordinator {swarm.address} "
          f"--job {FINETUNE_JOB} \"{summary.questions[0]}\"`)")

    _step(9, f"`pollinate export --job {FINETUNE_JOB}`: the job's adapter from every span, as one PEFT "
             "adapter, loaded with peft onto the local model", t_start)
    exported = _export_and_ask(swarm, local_model, tokenizer, summary.questions)
    summary.export_match = exported == summary.job_answers
    if not summary.export_match:
        raise RuntimeError(f"the exported adapter answers differently from the swarm with the job:\n"
                           f"  peft  {exported}\n  swarm {summary.job_answers}")
    print(f"  match: the exported adapter answers as the swarm does with job {FINETUNE_JOB!r}")


@dataclass
class _Swarm:
    """The demo's processes: a coordinator, the nodes of `layout`, and the trainers."""

    group: ProcGroup
    workdir: Path
    model: str
    cache_dir: Path
    token_file: Path
    layout: list[tuple[int, int]]
    t_start: float
    address: str = ""  # the coordinator's gRPC address once started
    nodes: list[Proc] = field(default_factory=list)
    remote: object = None  # the RemoteModelForCausalLM this process generates with

    @property
    def auth(self) -> list[str]:
        return ["--token-file", str(self.token_file)]

    def remote_model(self):
        from pollinate.client.remote_model import RemoteModelForCausalLM

        # fp32 hidden states on the wire (the CLI's default is fp16) so that the comparisons
        # with the local model are exact.
        self.remote = RemoteModelForCausalLM.from_pretrained(
            self.model, coordinator=self.address, token=self.token_file.read_text().strip(),
            cache_dir=self.cache_dir, wire_codec="none")
        return self.remote

    def start(self, num_blocks: int) -> None:
        _step(2, "starting the coordinator (membership, span assignment, DiLoCo rounds, the bootstrap "
                 "DHT peer)", self.t_start)
        coord = self.group.start("coordinator", [
            "coordinator", "--data-dir", str(self.workdir / "coordinator-data"), "--port", "0",
            "--http-port", "0", *self.auth, "--model", self.model, "--num-blocks", str(num_blocks),
            "--round-window", str(ROUND_WINDOW_S)])
        self.group.wait_ready([coord], COORDINATOR_READY_S)
        self.address = coord.info["grpc"]
        print(f"  coordinator at {self.address}; status page http://{coord.info['http']}/")

        spans = ", ".join(f"node-{i + 1} {s}:{e}" for i, (s, e) in enumerate(self.layout))
        _step(3, f"starting {len(self.layout)} nodes that join through --coordinator {self.address}: {spans}. "
                 f"Blocks {self.layout[1][0]}:{self.layout[1][1]} have two replicas, which will train the same "
                 "job on different data and meet in DiLoCo rounds (--blocks fixes the layout; without it the "
                 "coordinator places each node where blocks are weakest)", self.t_start)
        self.nodes = [self.group.start(f"node-{i + 1}", [
            "node", "--coordinator", self.address, *self.auth, "--model", self.model, "--cache-dir",
            str(self.cache_dir), "--blocks", f"{s}:{e}", "--torch-threads", "1",
        ]) for i, (s, e) in enumerate(self.layout)]
        t0 = time.monotonic()

        def on_ready(p: Proc) -> None:
            print(f"  {p.name}: blocks {p.info['blocks'][0]}:{p.info['blocks'][1]}, serving at {p.info['address']} "
                  f"({p.info['throughput']:.0f} tokens/s measured), ready after {time.monotonic() - t0:.0f} s",
                  flush=True)

        self.group.wait_ready(self.nodes, NODES_READY_S, on_ready=on_ready)
        _step(4, "the swarm, as `pollinate status` shows it", self.t_start)
        _show(_cli(["status", "--coordinator", self.address, *self.auth]), "pollinate status")

    def fine_tune(self) -> int:
        """One trainer per replica of the second span, each avoiding the other replica; returns
        the last round of that span both replicas committed."""
        replicas = [n for n, span in zip(self.nodes, self.layout) if span == self.layout[1]]
        trainers = []
        for i, replica in enumerate(replicas):
            data = self.workdir / f"times-ten-{i + 1}.jsonl"
            write_task_data(data, FINETUNE_EXAMPLES, seed=i)
            others = [r.info["address"] for r in replicas if r is not replica]
            trainers.append(self.group.start(f"trainer-{i + 1}", [
                "--coordinator", self.address, *self.auth, "--model", self.model, "--cache-dir",
                str(self.cache_dir), "--job", FINETUNE_JOB, "--data", str(data), "--steps", str(FINETUNE_STEPS),
                "--batch-size", str(FINETUNE_BATCH), "--rank", FINETUNE_RANK, "--lr", FINETUNE_LR,
                # blocking rounds: the last Backward returns once the last round has landed, so
                # both replicas hold the committed state when the questions are asked again
                "--round-steps", str(ROUND_STEPS), "--no-overlap-rounds",
                *[f for a in others for f in ("--avoid", a)],
            ], module="pollinate.demo_trainer", ready=False))
            print(f"  trainer-{i + 1}: through {replica.name} ({replica.info['address']}), data {data.name}")
        _follow_training(trainers, LogFollower(self.nodes, ROUND_LINE), self.t_start)

        status = _cli(["status", "--coordinator", self.address, *self.auth, "--json"])
        if status.returncode != 0:
            raise RuntimeError(f"pollinate status --json exited with code {status.returncode}: {status.stderr}")
        span = self.layout[1]
        rnd, members = replica_round(json.loads(status.stdout), FINETUNE_JOB, span)
        if len(members) < 2:
            raise RuntimeError(f"no DiLoCo round of {FINETUNE_JOB!r} on {span[0]}:{span[1]} was committed by "
                               f"both replicas (last committed: round {rnd}, members {members})")
        print(f"  round {rnd} of blocks {span[0]}:{span[1]} committed by both replicas: the coordinator holds "
              "their common state. The job and its rounds, as `pollinate status` shows them:")
        _show(_cli(["status", "--coordinator", self.address, *self.auth]), "pollinate status")
        return rnd

    def export(self, out: Path) -> None:
        _show(_cli(["export", "--coordinator", self.address, *self.auth, "--model", self.model, "--cache-dir",
                    str(self.cache_dir), "--job", FINETUNE_JOB, str(out)]), "pollinate export")

    def stop(self, *, ok: bool, keep_logs: bool) -> None:
        """SIGTERM to everyone (nodes leave the swarm, announce offline), SIGKILL to the
        process groups of whoever lingers; logs removed unless kept or the demo failed."""
        if self.remote is not None:
            self.remote.shutdown()
        self.group.stop_all(STOP_GRACE_S)
        for p in self.group.procs:
            print(f"  {p.name} exited with code {p.popen.returncode}")
        if not ok:
            print(self.group.dump_logs(15), file=sys.stderr)
        if keep_logs or not ok:
            print(f"  logs kept in {self.workdir}")
        else:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)


def _chat_through_the_swarm(remote, files, tokenizer, args):
    """The prompt through the swarm (streamed), then on the local model: the same tokens.
    Returns the local model (the export check loads the adapter onto it)."""
    import torch
    from transformers import TextStreamer

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
    return local_model


def _export_and_ask(swarm: _Swarm, local_model, tokenizer, questions: list[str]) -> list[str]:
    """`pollinate export`, then the questions to the local model with the exported adapter."""
    import warnings

    import torch
    from peft import PeftModel

    export_dir = swarm.workdir / "export"
    t0 = time.monotonic()
    swarm.export(export_dir)
    print(f"  ({time.monotonic() - t0:.1f} s; files: {', '.join(sorted(p.name for p in export_dir.iterdir()))})")
    with warnings.catch_warnings():  # transformers' deprecation notice about peft's own call
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = PeftModel.from_pretrained(local_model, str(export_dir)).eval()
    answers = []
    for q in questions:
        ids = _chat_ids(tokenizer, q)
        with torch.no_grad():
            out = peft_model.generate(ids, max_new_tokens=ANSWER_TOKENS, do_sample=False)[0, ids.shape[1]:]
        answers.append(tokenizer.decode(out, skip_special_tokens=True).strip())
    print("  local model + exported adapter (peft): " + ", ".join(repr(a) for a in answers))
    return answers


def _show_answers(questions: list[str], answers: list[str], expected: list[str], who: str) -> None:
    for q, a, e in zip(questions, answers, expected):
        print(f"  {q}  {who}: {a!r}  {'right' if correct(a, e) else 'wrong'} (expected {e})")
    print(f"  {sum(correct(a, e) for a, e in zip(answers, expected))} of {len(questions)} right")


def _follow_training(trainers: list[Proc], rounds: LogFollower, t_start: float) -> None:
    """Wait for the trainers, printing each round line the nodes and the coordinator log."""
    deadline = time.monotonic() + FINETUNE_S
    pending = list(trainers)
    while pending:
        for name, line in rounds.new():
            print(f"  ({time.monotonic() - t_start:.0f} s) {name}: {line}", flush=True)
        for p in list(pending):
            if p.alive():
                continue
            pending.remove(p)
            if p.popen.returncode != 0:
                raise RuntimeError(f"{p.name} exited with code {p.popen.returncode}:\n{p.log_tail(15)}")
            result = json.loads([line for line in p.log_path.read_text(errors="replace").splitlines()
                                 if line.startswith("{")][-1])  # the trainer's last stdout line
            print(f"  {p.name} done: loss {result['first_loss']:.3f} at step 1 -> {result['loss']:.3f} at step "
                  f"{result['step']}, held-out loss {result.get('eval_loss', float('nan')):.3f}, "
                  f"{result['tokens']} tokens", flush=True)
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"{[p.name for p in pending]} not done after {FINETUNE_S:.0f} s")
        time.sleep(0.5)  # polling the trainers' exit and the logs, not a readiness wait
    for name, line in rounds.new():
        print(f"  ({time.monotonic() - t_start:.0f} s) {name}: {line}", flush=True)
