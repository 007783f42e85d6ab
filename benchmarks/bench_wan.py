"""The swarm on capped links: SmolLM2 over three nodes in network namespaces, at several rates.

    sudo python benchmarks/bench_wan.py [--quick] [--wires fp32-resend,fp32,int8row,int8row-zstd]
        [--default-wire int8row-zstd] [--baseline-wire fp32-resend] [--rates 0,100,20]

benchmarks/netlab.py gives the coordinator, three nodes (blocks 0:10, 10:20, 20:30: one
replica per span, so each span's DiLoCo round is a group of one that still commits its
state to the coordinator) and the trainer a namespace and an address each, with `tc tbf` on
both directions of every link. For each rate (0 = unlimited) it times greedy generation
(fp16 activations, as `pollinate generate`) and, per wire, trains a fresh LoRA job (same
seed, same steps, same data: examples/train.jsonl) with benchmarks/wan_client.py.
Generation is timed first, apart from training: `--gen-repeats` samples per rate, the rates
interleaved (unlimited, 100, 20, then 20, 100, unlimited, ...: one client process whose
samples bench_wan paces, setting the rate before each), so that a slow spell of the shared
machine falls on every rate alike rather than on one.

A wire is a trainer codec (`fp32` = codec `none`; any other name is the codec id, e.g.
`int8row`), optionally followed by `/` and the gradients' codec (`int8row-zstd/int4row-zstd`;
without it the gradients use the same codec), optionally suffixed `-resend`: then the trainer does not let nodes keep its
Forward inputs and every Backward carries its input again, as before issue 12.
`fp32-resend` is therefore the fp32 wire as it was (the baseline of `bytes_reduction`).

One JSON object per (rate, wire), then a summary object:
- `gen_tokens_per_s`: the median over the rate's samples of generated tokens / seconds of
  one greedy generation (fp16 wire, after a warm-up); `gen_samples` holds every sample's
  tokens/s in the order taken, `gen_spread` (max - min) / median. The same on every wire's
  line of a rate (generation does not use the training wire).
- `train_tokens_per_s`: input tokens (prompt + completion) the trainer sent / training seconds.
- `train_bytes_per_token`: bytes every lab host sent during training (the sum of each eth0's
  tx counter: a byte crossing trainer -> node-0 is counted once, when it leaves the trainer),
  trainer, nodes and coordinator, / input tokens. `trainer_bytes_per_step` is the trainer's
  link (rx + tx) per step, the issue's "13.85 MB per step".
- `round_bytes_per_token`: the coordinator's link (rx + tx) during training / input tokens
  (the same tokens as `train_bytes_per_token`). Only nodes talk to the coordinator while the trainer trains (heartbeats,
  a few hundred bytes a second, and the rounds' BeginRound/CommitRound), and with one
  replica per span there is no peer exchange, so this is the round traffic, commit included.
- `bytes_by_host`: {host: [rx, tx]} of each eth0 during training; `wire_bytes_by_kind`: the
  trainer's encoded tensor bytes by RPC, tensor and direction (client/trainer.py's
  SwarmChain.bytes_by_kind; payload only, without gRPC/HTTP2/TCP framing).
- `trainer_round_wait_fraction`: the sum of `backward_wait_s=<float>` over the lines the nodes
  logged during the run / training seconds; null while nodes log no such line.
- summary: `bytes_reduction` (baseline wire / default wire, train bytes per token,
  unlimited rate), `loss_ratio` (default wire / baseline held-out loss, unlimited rate), `throughput_ratio_20mbit`
  (default wire's train tokens/s at 20 Mbit/s / unlimited), `gen_ratio_100mbit` (the medians'
  ratio), `background_bytes_per_s` ({host: bytes sent per second while nothing trains or
  generates: heartbeats, DHT; measured for `--idle-s` seconds before anything runs); each row's
  `background_bytes_per_token` is that rate x the row's training seconds / its input tokens, the
  share of `train_bytes_per_token` that does not depend on the wire (it grows as training slows).

Needs root, `ip` and `tc`; the lab models bandwidth only (no netem here: no added delay).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import netlab  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLIENT = str(Path(__file__).with_name("wan_client.py"))
# Wire names -> the trainer's --codec values; a name not listed is passed through as the
# codec id, so a codec registered in compression/ plugs in by its own name.
WIRE_CODECS = {"fp32": "none"}
RESEND = "-resend"  # wire suffix: no kept Forward inputs, every Backward re-sends its input
SPANS = [(0, 10), (10, 20), (20, 30)]
TOKEN = "bench-wan-token"
COORD_PORT = 7070
WAIT_LINE = re.compile(r"backward_wait_s=([0-9.eE+-]+)")


def wire_codec(name: str) -> str:
    """The hidden states' codec of a wire (before any "/")."""
    name = name.removesuffix(RESEND).split("/")[0]
    return WIRE_CODECS.get(name, name)


def wire_grad_codec(name: str) -> str:
    """The gradients' codec of a wire: after "/" (e.g. int8row-zstd/int4row-zstd), else "" (as the
    hidden states)."""
    name = name.removesuffix(RESEND)
    if "/" not in name:
        return ""
    grad = name.split("/", 1)[1]
    return WIRE_CODECS.get(grad, grad)


def keeps_inputs(wire: str) -> bool:
    return not wire.endswith(RESEND)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps, fewer tokens, fewer generation samples")
    p.add_argument("--wires", default="fp32-resend,fp32,int8row,int8row-zstd",
                   help="training wires, comma-separated: a codec (fp32 = none), optionally with the suffix "
                        "-resend (Backward re-sends its input, as before kept inputs)")
    p.add_argument("--default-wire", default="int8row-zstd",
                   help="the wire the summary compares with the baseline (pollinate train's default codec)")
    p.add_argument("--baseline-wire", default="fp32-resend", help="the fp32 wire as it was before issue 12")
    p.add_argument("--rates", default="0,100,20", help="Mbit/s per link, comma-separated; 0 = unlimited")
    p.add_argument("--steps", type=int, help="training steps per (rate, wire) (default 12, quick 4)")
    p.add_argument("--round-steps", type=int, help="DiLoCo H (default: about half the steps, never dividing them)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gen-tokens", type=int, help="tokens per generation (default 64, quick 24)")
    p.add_argument("--gen-repeats", type=int, help="generation samples per rate (default 5, quick 3); 0: none")
    p.add_argument("--idle-s", type=float, default=20.0,
                   help="seconds of idle swarm over which background traffic is measured (0: skip)")
    p.add_argument("--eval-examples", type=int, help="held-out examples for the loss (default 16, quick 8)")
    p.add_argument("--data", type=Path, default=ROOT / "examples" / "train.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", help="converted-model cache (default ~/.cache/pollinate)")
    p.add_argument("--workdir", type=Path, help="logs go here (default: a temporary directory)")
    args = p.parse_args(argv)
    args.steps = args.steps or (4 if args.quick else 12)
    args.round_steps = args.round_steps or default_round_steps(args.steps)
    args.gen_tokens = args.gen_tokens or (24 if args.quick else 64)
    if args.gen_repeats is None:
        args.gen_repeats = 3 if args.quick else 5
    args.eval_examples = args.eval_examples or (8 if args.quick else 16)
    args.wire_list = [w for w in args.wires.split(",") if w]
    args.rate_list = [float(r) for r in args.rates.split(",") if r]
    for name in (args.baseline_wire, args.default_wire):
        if name not in args.wire_list:
            p.error(f"--wires must include the baseline and default wires ({name!r} is missing)")
    return args


def default_round_steps(steps: int) -> int:
    """About two rounds per run, and never a round at the last step: rounds overlap training
    (the default), so a round started by the last Backward would land while the held-out loss
    is being measured, and the loss would depend on which came first. With a boundary before
    the end, overlap_max_steps (1) holds a later Backward until the round has landed."""
    h = max(1, (steps - 1) // 2)
    while steps % h == 0 and h < steps:
        h += 1
    return h


def log_sizes(procs) -> dict[str, int]:
    return {p.name: p.log_path.stat().st_size if p.log_path.exists() else 0 for p in procs}


def round_wait_s(procs, since: dict[str, int]) -> float | None:
    """Sum of backward_wait_s over what the nodes logged since `since`; None if no such line."""
    total, seen = 0.0, False
    for p in procs:
        with open(p.log_path, "rb") as f:
            f.seek(since[p.name])
            for m in WAIT_LINE.finditer(f.read().decode(errors="replace")):
                total += float(m.group(1))
                seen = True
    return total if seen else None


def start_swarm(lab: netlab.NetLab, args, work: Path):
    coord_h = lab.add_host("coord")
    node_hs = [lab.add_host(f"node-{i}") for i in range(len(SPANS))]
    trainer_h = lab.add_host("trainer")
    (work / "token").write_text(TOKEN + "\n")
    cache = ["--cache-dir", args.cache_dir] if args.cache_dir else []
    coord = lab.start(coord_h, "coordinator", [
        "coordinator", "--data-dir", str(work / "coord-data"), "--host", coord_h.ip, "--port", str(COORD_PORT),
        "--http-port", "-1", "--token-file", str(work / "token"), "--round-window", "10"])
    lab.group.wait_ready([coord], timeout=120)
    nodes = [lab.start(h, h.name, [
        "node", "--coordinator", coord.info["grpc"], "--token-file", str(work / "token"), "--host", h.ip,
        "--blocks", f"{s}:{e}", "--throughput", "10", "--torch-threads", "1", *cache])
        for h, (s, e) in zip(node_hs, SPANS)]
    lab.group.wait_ready(nodes, timeout=300)
    return coord, nodes, trainer_h


def client_cmd(coord, args) -> list[str]:
    return [sys.executable, CLIENT, "--coordinator", coord.info["grpc"], "--token", TOKEN,
            *(["--cache-dir", args.cache_dir] if args.cache_dir else [])]


def generation_slots(rates: list[float], repeats: int) -> list[float]:
    """The rate of each generation sample, in order: the rates forward, then backward, ...
    (so no rate always comes first after training's start or after another rate's sample)."""
    return [rate for r in range(repeats) for rate in (rates if r % 2 == 0 else rates[::-1])]


def time_generation(lab, trainer_h, coord, args, log: Path) -> dict[float, list[float]]:
    """{rate: [tokens/s of each sample]}: args.gen_repeats samples per rate, the rates taken in
    turn (forward, then backward, ...) by one client that waits for each rate to be set."""
    slots = generation_slots(args.rate_list, args.gen_repeats)
    cmd = [*client_cmd(coord, args), "--gen-slots", str(len(slots)), "--gen-repeats", "1",
           "--gen-tokens", str(args.gen_tokens)]
    samples: dict[float, list[float]] = {rate: [] for rate in args.rate_list}
    with open(log, "w") as err:
        proc = subprocess.Popen(["ip", "netns", "exec", trainer_h.ns, *cmd], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        for line in proc.stdout:
            if not line.startswith('{"slot"'):
                continue
            msg = json.loads(line)
            rate = slots[msg["slot"]]
            if "gen_seconds" in msg:
                samples[rate].append(msg["gen_tokens"] / msg["gen_seconds"])
                continue
            lab.set_rate(rate)
            proc.stdin.write("go\n")
            proc.stdin.flush()
        if proc.wait(timeout=60) != 0:
            raise RuntimeError(f"wan_client (generation) failed:\n{log.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return samples


def idle_traffic(lab, seconds: float) -> dict[str, float]:
    """{host: bytes sent per second} while the swarm is up and idle."""
    before, t0 = lab.counters(), time.perf_counter()
    time.sleep(seconds)  # the measurement window itself, not a wait for readiness
    after, dt = lab.counters(), time.perf_counter() - t0
    return {name: (after[name][1] - before[name][1]) / dt for name in after}


def run_client(lab, trainer_h, coord, args, *, job: str, wire: str) -> dict:
    count = ",".join(f"{h.name}={h.ns}" for h in lab.hosts.values() if h.name != "trainer") + \
        f",trainer={trainer_h.ns}"
    cmd = [*client_cmd(coord, args), "--job", job, "--codec", wire_codec(wire), "--grad-codec", wire_grad_codec(wire),
           *([] if keeps_inputs(wire) else ["--no-keep-inputs"]), "--data", str(args.data),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--round-steps", str(args.round_steps),
           "--eval-examples", str(args.eval_examples), "--seed", str(args.seed), "--count", count]
    done = lab.exec(trainer_h, cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"wan_client ({job}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def record(rate: float, wire: str, res: dict, gen: list[float], wait_s: float | None, steps: int) -> dict:
    counters = res["counters"]
    sent = sum(tx for _, tx in counters.values())
    trainer_rx, trainer_tx = counters["trainer"]
    coord_rx, coord_tx = counters["coord"]
    return {
        "rate_mbit": rate, "wire": wire, "codec": wire_codec(wire), "grad_codec": wire_grad_codec(wire) or wire_codec(wire),
        "keep_inputs": keeps_inputs(wire),
        "gen_tokens_per_s": median(gen), "gen_wire": "fp16", "gen_samples": gen,
        "gen_spread": (max(gen) - min(gen)) / median(gen) if gen else None,
        "train_tokens_per_s": res["input_tokens"] / res["train_seconds"],
        "train_bytes_per_token": sent / res["input_tokens"],
        "round_bytes_per_token": (coord_rx + coord_tx) / res["input_tokens"],
        "trainer_round_wait_fraction": None if wait_s is None else wait_s / res["train_seconds"],
        "trainer_bytes_per_step": (trainer_rx + trainer_tx) / steps,
        "s_per_step": res["train_seconds"] / steps,
        "input_tokens": res["input_tokens"], "trained_tokens": res["trained_tokens"],
        "train_loss": res["train_loss"], "eval_loss": res["eval_loss"], "eval_examples": res["eval_examples"],
        "steps": steps, "bytes_by_host": counters, "wire_bytes_by_kind": res["wire_bytes_by_kind"],
    }


def summary(rows: list[dict], args, background: dict[str, float] | None) -> dict:
    def row(rate, wire):
        return next((r for r in rows if r["rate_mbit"] == rate and r["wire"] == wire), None)

    def ratio(a, b):
        return None if a is None or b is None or not b else a / b

    base, default = row(0.0, args.baseline_wire), row(0.0, args.default_wire)
    slow = row(20.0, args.default_wire)
    gen100 = next((r["gen_tokens_per_s"] for r in rows if r["rate_mbit"] == 100.0), None)
    out = {
        "summary": True, "default_wire": args.default_wire, "baseline_wire": args.baseline_wire,
        "bytes_reduction": ratio(base and base["train_bytes_per_token"], default and default["train_bytes_per_token"]),
        "loss_ratio": ratio(default and default["eval_loss"], base and base["eval_loss"]),
        "throughput_ratio_20mbit": ratio(slow and slow["train_tokens_per_s"],
                                         default and default["train_tokens_per_s"]),
        "gen_ratio_100mbit": ratio(gen100, base and base["gen_tokens_per_s"]),
        "steps": args.steps, "round_steps": args.round_steps, "batch_size": args.batch_size,
        "quick": args.quick, "gen_repeats": args.gen_repeats, "background_bytes_per_s": background,
    }
    if all(r["trainer_round_wait_fraction"] is None for r in rows):
        out["note"] = ("trainer_round_wait_fraction is null: no node logged a backward_wait_s= line "
                       "(nodes do not report the Backward wait for a round yet)")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    why = netlab.unavailable()
    if why is not None:
        print(f"bench_wan: {why}", file=sys.stderr)
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-wan-"))
    rows: list[dict] = []
    with netlab.NetLab(work) as lab:
        coord, nodes, trainer_h = start_swarm(lab, args, work)
        print(f"bench_wan: swarm ready in the lab (logs in {work})", file=sys.stderr)
        background = idle_traffic(lab, args.idle_s) if args.idle_s > 0 else None
        gen = time_generation(lab, trainer_h, coord, args, work / "gen-client.log") if args.gen_repeats else {}
        for rate in args.rate_list:
            lab.set_rate(rate)
            for wire in args.wire_list:
                since = log_sizes(nodes)
                t0 = time.perf_counter()
                res = run_client(lab, trainer_h, coord, args, job=f"wan-{int(rate)}-{wire}", wire=wire)
                rows.append(record(rate, wire, res, gen.get(rate, []), round_wait_s(nodes, since), args.steps))
                if background is not None:  # what the idle swarm would have sent over the same seconds
                    rows[-1]["background_bytes_per_token"] = \
                        sum(background.values()) * res["train_seconds"] / res["input_tokens"]
                print(json.dumps(rows[-1]), flush=True)
                print(f"bench_wan: rate {rate:g} wire {wire}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(json.dumps(summary(rows, args, background)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
