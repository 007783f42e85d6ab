"""A span served from behind NAT, through libp2p circuit relays, against the same span served
directly: SmolLM2 in the network lab (benchmarks/netlab.py), unlimited links.

    sudo python benchmarks/bench_relay.py [--quick] [--gen-tokens N] [--reps N]

The lab: a coordinator (relaying nothing: --no-relay), two relays that are also members
(`pollinate node --relay`, blocks 0:15 each), a direct node for 15:30, a node at "home" for
15:30 behind a router that masquerades and drops unsolicited inbound connections (it finds
out by itself and serves through the relays), and a client. Same swarm, same run:

- generation: greedy tokens through 0:15 then 15:30, once leaving out the home node (direct)
  and once leaving out the direct one (relayed), alternating for --reps rounds;
  `direct_tokens_per_s`, `relayed_tokens_per_s` are medians, `relay_ratio` = relayed / direct,
  `relay_penalty_ms_per_token` = the difference per token (what client/routing.py's
  relay_penalty_s stands for), `tokens_match` = every run's tokens are the same;
- a DiLoCo round of 15:30 between the home and the direct replica (tests/integration/
  rounds_client.py: Backward through both, then each replica's committed state against the
  coordinator's): `round_committed` = round 2 committed and both replicas equal to it;
- a relayed generation during which the relay carrying the most bytes is SIGKILLed (its whole
  process group: the relay is the node's DHT daemon): `relay_killed_recovered` = it finished
  with the same tokens; `killed_relay` names it.

One JSON object. Needs root, iproute2 and nftables; timings are CPU-bound on a small machine
(every process shares its cores), say so beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import netlab  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLIENT = str(Path(__file__).with_name("relay_client.py"))
ROUNDS = str(ROOT / "tests" / "integration" / "rounds_client.py")
TOKEN = "bench-relay-token"
COORD_PORT = 7070


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer tokens and repetitions")
    p.add_argument("--gen-tokens", type=int, help="tokens per timed generation (default 48, quick 16)")
    p.add_argument("--reps", type=int, help="alternating direct/relayed repetitions (default 3, quick 1)")
    p.add_argument("--cache-dir", help="converted-model cache (default ~/.cache/pollinate)")
    p.add_argument("--workdir", type=Path, help="logs go here (default: a temporary directory)")
    args = p.parse_args(argv)
    args.gen_tokens = args.gen_tokens or (16 if args.quick else 48)
    args.reps = args.reps or (1 if args.quick else 3)
    return args


def client(lab, host, coord, args, runs: dict[str, str], *, reps: int, gen_tokens: int, signal_file=None):
    cmd = [sys.executable, CLIENT, "--coordinator", coord, "--token", TOKEN, "--gen-tokens", str(gen_tokens),
           "--reps", str(reps), *(f"--run={name}:{avoid}" for name, avoid in runs.items()),
           *(["--cache-dir", args.cache_dir] if args.cache_dir else []),
           *(["--signal-file", str(signal_file)] if signal_file else [])]
    return subprocess.Popen(["ip", "netns", "exec", host.ns, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def results(proc, timeout: float) -> list[dict]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"relay_client failed:\n{err[-3000:]}")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def kill_busiest(lab, relays, gen, signal_file: Path, *, min_bytes: int = 50_000, timeout_s: float = 300.0):
    """Once the timed generation runs, SIGKILL the relay whose link moved the most bytes (at
    least min_bytes); its name, or None if the generation ended first."""
    deadline = time.monotonic() + timeout_s
    while not signal_file.exists():
        if gen.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(0.05)  # polls a file the client writes; the client is what we wait for
    before = lab.counters()
    while gen.poll() is None and time.monotonic() < deadline:
        now = lab.counters()
        moved = {r.name: sum(now[r.name]) - sum(before[r.name]) for r in relays}
        busiest = max(moved, key=moved.get)
        if moved[busiest] >= min_bytes:
            os.killpg(next(r for r in relays if r.name == busiest).pid, signal.SIGKILL)
            return busiest
        time.sleep(0.02)  # byte-counter poll
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    why = netlab.nat_unavailable()
    if why:
        raise SystemExit(f"bench_relay: {why}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-relay-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "token").write_text(TOKEN + "\n")
    cache = ["--cache-dir", args.cache_dir] if args.cache_dir else []
    with netlab.NetLab(work) as lab:
        ch, r1h, r2h, dh, th = (lab.add_host(n) for n in ("coord", "relay-1", "relay-2", "direct", "client"))
        hh = lab.add_home("home")
        coord = lab.start(ch, "coordinator", [
            "coordinator", "--data-dir", str(work / "coord-data"), "--host", "0.0.0.0", "--port", str(COORD_PORT),
            "--http-port", "-1", "--token-file", str(work / "token"), "--round-window", "10", "--no-relay"])
        lab.group.wait_ready([coord], timeout=120)
        address = coord.info["grpc"]
        common = ["--coordinator", address, "--token-file", str(work / "token"), "--throughput", "10",
                  "--torch-threads", "1", *cache]
        relays = [lab.start(h, h.name, ["node", *common, "--blocks", "0:15", "--relay"]) for h in (r1h, r2h)]
        lab.group.wait_ready(relays, timeout=300)
        home = lab.start(hh, "home", ["node", *common, "--blocks", "15:30"])
        direct = lab.start(dh, "direct", ["node", *common, "--blocks", "15:30"])
        lab.group.wait_ready([home, direct], timeout=300)
        if not home.info.get("relayed"):
            raise SystemExit(f"bench_relay: the home node did not go relayed: {home.info}")

        runs = {"direct": home.info["address"], "relayed": direct.info["address"]}
        gen = results(client(lab, th, address, args, runs, reps=args.reps, gen_tokens=args.gen_tokens),
                      timeout=1800)

        done = lab.exec(th, [sys.executable, ROUNDS, "--coordinator", address, "--token", TOKEN, "--nodes",
                             f"{home.info['address']},{direct.info['address']}", "--job", "relay-round", "--steps", "4",
                             "--round-steps", "2", "--first-block", "15", "--num-blocks", "30", "--no-overlap"],
                        capture_output=True, text=True, timeout=900)
        report = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None

        os.killpg(direct.pid, signal.SIGKILL)  # 15:30 is the home's alone
        flag = work / "timed-run-started"
        proc = client(lab, th, address, args, {"relayed": direct.info["address"]}, reps=1,
                      gen_tokens=args.gen_tokens, signal_file=flag)
        killed = kill_busiest(lab, relays, proc, flag)
        try:
            after = results(proc, timeout=900)
        except RuntimeError as e:
            after = []
            print(str(e), file=sys.stderr)

    def median_tps(name):
        times = [r["seconds"] for r in gen if r["run"] == name]
        return args.gen_tokens / statistics.median(times) if times else None

    direct_tps, relayed_tps = median_tps("direct"), median_tps("relayed")
    reference = gen[0]["tokens"] if gen else None
    print(json.dumps({
        "model": "smollm2", "gen_tokens": args.gen_tokens, "reps": args.reps, "link": "unlimited",
        "direct_tokens_per_s": direct_tps, "relayed_tokens_per_s": relayed_tps,
        "relay_ratio": relayed_tps / direct_tps if direct_tps and relayed_tps else None,
        "relay_penalty_ms_per_token": (1e3 / relayed_tps - 1e3 / direct_tps) if direct_tps and relayed_tps else None,
        "tokens_match": bool(gen) and all(r["tokens"] == reference for r in gen),
        "round_committed": bool(report) and report["round"] == 2
                           and report["replicas_equal_coordinator"] == [True, True],
        "round_error": None if done.returncode == 0 else done.stderr[-500:],
        "relay_killed_recovered": killed is not None and bool(after) and after[-1]["tokens"] == reference,
        "killed_relay": killed,
        "machine": f"{os.cpu_count()} cores shared by every process of the lab",
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
