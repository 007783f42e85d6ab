"""`pollinate job create|list|show|record`: training jobs registered at the coordinator.

    pollinate job create sums --coordinator HOST:PORT --method lora --rank 16
    pollinate job list --coordinator HOST:PORT
    pollinate job show sums --coordinator HOST:PORT [--json]     # settings, kept checkpoints
    pollinate job record sums --coordinator HOST:PORT > sums.json  # the open record (issue 15)

`record` prints, as JSON, what anyone needs to check which data and code produced a
checkpoint: the data files' sizes and SHA-256 as each trainer read them, the job's
settings, the code versions, each round's members and tokens, the committed states'
checksums (docs/checkpoints.md).

A job's settings flags are shared with `pollinate train` (add_job_arguments): train with
flags registers the job (or checks them against the registered settings); train with none
uses the registered job's settings (job_spec).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pollinate.protocol.channels import add_coordinator_tls_argument, coordinator_tls

# Job settings and their defaults. The flags default to None so that `train` can tell
# "not given" (use the registered job's value) from "given" (must match it).
SPEC_DEFAULTS = {"method": "lora", "rank": 8, "alpha": 16.0, "targets": "", "feedforward": "",
                 "num_virtual_tokens": 20, "lr": 4e-4, "weight_decay": 0.1, "grad_clip": 1.0,
                 "micro_batches": 1, "seed": 0}
# DiLoCo settings (issue 6): flag dest -> (JobSpec field, value meaning "DiLoCoConfig's default").
# The defaults themselves live in node/diloco.py's DiLoCoConfig, read by the nodes.
DILOCO_FLAGS = {"round_steps": ("round_steps", 0), "diloco_codec": ("codec", ""), "diloco_p": ("codec_p", 0.0),
                "diloco_k": ("codec_k", 0.0), "diloco_bits": ("codec_bits", 0), "diloco_bucket": ("codec_bucket", 0),
                "warmup_rounds": ("warmup_rounds", None), "outer_lr": ("outer_lr", 0.0),
                "outer_momentum": ("outer_momentum", None), "overlap_rounds": ("overlap_rounds", None)}
# Checkpoint retention at the coordinator (issue 15): flag dest -> (JobSpec field, unset);
# the defaults live in coordinator/retention.py.
RETENTION_FLAGS = {"keep_last": ("keep_last", None), "keep_log_spaced": ("keep_log_spaced", None),
                   "keep_every": ("keep_every", None), "keep_max_bytes": ("keep_max_bytes", None)}


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that define a job (the JobSpec); without any, a registered job's settings."""
    g = p.add_argument_group("job settings (default: the registered job's, else the value shown)")
    g.add_argument("--method", help="lora, ia3, ln-tuning, full, bottleneck, reft, galore, prefix-tuning, "
                                    "llama-adapter (trained on the nodes) or prompt-tuning (a soft prompt trained by the trainer) [lora]")
    g.add_argument("--rank", type=int, help="LoRA rank; bottleneck width; LoReFT rank; GaLore projection rank; "
                                                "LLaMA-Adapter: adapted top blocks L [8]")
    g.add_argument("--alpha", type=float, help="LoRA alpha [16]")
    g.add_argument("--targets", help="comma-separated module names [the method's, as PEFT's]")
    g.add_argument("--feedforward", help="IA3: comma-separated targets scaled at their input [down_proj if targeted]")
    g.add_argument("--num-virtual-tokens", type=int, help="prompt / prefix tuning: virtual tokens; LLaMA-Adapter: prompt length [20]")
    g.add_argument("--lr", type=float, help="inner AdamW learning rate [4e-4]")
    g.add_argument("--weight-decay", type=float, help="inner AdamW weight decay [0.1]")
    g.add_argument("--grad-clip", type=float, help="max L2 norm of each span's gradient per step; 0 = off [1.0]")
    g.add_argument("--micro-batches", type=int, help="micro-batches per optimizer step [1]")
    g.add_argument("--seed", type=int, help="adapter initialisation seed (and train's data order) [0]")
    d = p.add_argument_group("DiLoCo rounds between replicas of a span (default: the registered job's, "
                             "else the nodes' DiLoCoConfig defaults, node/diloco.py; docs/diloco.md)")
    d.add_argument("--round-steps", type=int, help="H: inner steps between outer rounds")
    d.add_argument("--diloco-codec", choices=("cocktail", "int8", "fp16", "none"),
                   help="pseudo-gradient codec: cocktail (random mask + top-k + low-bit), int8, fp16, none (fp32)")
    d.add_argument("--diloco-p", type=float, help="cocktail: fraction of coordinates in the random mask, (0, 1] "
                   "[0.73 for adapter jobs, 0.75 for full weights]")
    d.add_argument("--diloco-k", type=float, help="cocktail: fraction of the masked coordinates kept (top-k), (0, 1]")
    d.add_argument("--diloco-bits", type=int, help="cocktail: bits per kept value, 1..8")
    d.add_argument("--diloco-bucket", type=int, help="cocktail: kept values per fp32 scale")
    d.add_argument("--warmup-rounds", type=int, help="first rounds sent uncompressed (fp32); 0 = none")
    d.add_argument("--outer-lr", type=float, help="outer Nesterov SGD learning rate, > 0 "
                   "[1.2 for adapter jobs, 1.6 for full weights]")
    d.add_argument("--outer-momentum", type=float, help="outer momentum in [0, 1); 0 = plain averaging step "
                   "[0.7 for adapter jobs, 0.8 for full weights]")
    d.add_argument("--overlap-rounds", action=argparse.BooleanOptionalAction, default=None,
                   help="run each round in the background while the next inner steps proceed (its "
                        "update lands late, training does not stop); --no-overlap-rounds: the Backward "
                        "that ends a round's steps waits for the round")
    k = p.add_argument_group("checkpoints the coordinator keeps (docs/checkpoints.md; default: the "
                             "registered job's, else coordinator/retention.py's: last 3, log-spaced, every 10th)")
    k.add_argument("--keep-last", type=int, help="keep each span's last K committed rounds (>= 1)")
    k.add_argument("--keep-log-spaced", action=argparse.BooleanOptionalAction, default=None,
                   help="keep rounds 1, 2, 4, 8, ... (Pythia's early checkpoints)")
    k.add_argument("--keep-every", type=int, help="keep every M-th round; 0 = none")
    k.add_argument("--keep-max-bytes", type=int, help="cap on this job's kept states in bytes, oldest pruned "
                                                      "first (never a span's last round); 0 = none")


def spec_flags_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, k, None) is not None for k in [*SPEC_DEFAULTS, *DILOCO_FLAGS, *RETENTION_FLAGS])


def job_spec(args: argparse.Namespace, registered=None):
    """The JobSpec the flags ask for: each flag not given takes the registered job's value
    (a node_pb2.JobSpec, or None) or else its default. ValueError names a bad setting."""
    from pollinate.protocol.shared import JobSpec

    base = JobSpec.from_proto(registered) if registered is not None else None
    def pick(key, from_registered):
        value = getattr(args, key, None)
        if value is not None:
            return value
        return from_registered(base) if base is not None else SPEC_DEFAULTS[key]

    method = pick("method", lambda b: b.method)
    names = lambda key, attr: tuple(t for t in pick(key, lambda b: ",".join(getattr(b, attr))).split(",") if t)
    return JobSpec(
        method=method, rank=pick("rank", lambda b: b.rank), alpha=pick("alpha", lambda b: b.alpha),
        targets=names("targets", "targets"), feedforward=names("feedforward", "feedforward"),
        num_virtual_tokens=(pick("num_virtual_tokens", lambda b: b.num_virtual_tokens)
                            if method in ("prompt-tuning", "prefix-tuning", "llama-adapter") else 0),
        lr=pick("lr", lambda b: b.lr), weight_decay=pick("weight_decay", lambda b: b.weight_decay),
        grad_clip=pick("grad_clip", lambda b: b.grad_clip), micro_batches=pick("micro_batches", lambda b: b.micro_batches),
        seed=pick("seed", lambda b: b.seed), betas=base.betas if base is not None else (0.9, 0.95),
        **{field: (getattr(args, dest, None) if getattr(args, dest, None) is not None
                   else getattr(base, field) if base is not None else unset)
           for dest, (field, unset) in {**DILOCO_FLAGS, **RETENTION_FLAGS}.items()},
    )


async def register_job(coordinator: str, token: str, name: str, args: argparse.Namespace,
                       *, timeout_s: float = 10.0):
    """The job `name` as the coordinator registers it: (JobInfo, created). A new job is
    created from the flags (defaults for the rest). For a registered one, the flags left out
    take its values and the flags given must equal them (FailedPrecondition names the fields
    that differ), so `train --job NAME` alone trains with the registered settings."""
    from pollinate.coordinator.client import call_coordinator
    from pollinate.protocol.errors import NotFound
    from pollinate.protocol.v1 import coordinator_pb2, node_pb2

    tls = coordinator_tls(getattr(args, "coordinator_tls", None))
    registered = None
    try:
        info = await call_coordinator(coordinator, token, "GetJob", coordinator_pb2.GetJobRequest(name=name),
                                      timeout_s=timeout_s, **tls)
        registered = info.spec if info.spec.method else None  # a round's placeholder row has no spec
    except NotFound:
        pass
    if registered is not None and not spec_flags_given(args):
        return info, False
    spec = job_spec(args, registered).to_proto(node_pb2)
    reply = await call_coordinator(coordinator, token, "CreateJob",
                                   coordinator_pb2.CreateJobRequest(name=name, spec=spec), timeout_s=timeout_s, **tls)
    return reply.job, reply.created


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="job_command", metavar="ACTION", required=True)
    for action, help_text in (("create", "register a job (same settings again: no-op)"),
                              ("list", "every registered job"),
                              ("show", "one job's settings, state and kept checkpoints"),
                              ("record", "one job's open record as JSON: data checksums, settings, code, rounds")):
        q = sub.add_parser(action, help=help_text, description=help_text)
        if action != "list":
            q.add_argument("name", help="job name")
        if action == "create":
            add_job_arguments(q)
        q.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's gRPC address")
        q.add_argument("--token-file", type=Path, help="file holding the swarm token (or set $POLLINATE_TOKEN)")
        add_coordinator_tls_argument(q)
        q.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the coordinator")
        q.add_argument("--json", action="store_true", help="print JSON")


def _job_dict(info) -> dict:
    from pollinate.coordinator.jobs import spec_to_dict

    return {"name": info.name, "base_model": info.base_model,
            "spec": spec_to_dict(info.spec) if info.spec.method else {}, "state": info.state,
            "created_at": info.created_at, "updated_at": info.updated_at}


def run(args: argparse.Namespace) -> int:
    import asyncio

    from pollinate.client.cli_args import swarm_token
    from pollinate.client.cli_status import format_jobs
    from pollinate.coordinator.client import call_coordinator
    from pollinate.protocol.errors import PollinateError
    from pollinate.protocol.v1 import coordinator_pb2

    prog = f"pollinate job {args.job_command}"
    token = swarm_token(args)
    if not token:
        print(f"{prog}: no swarm token; pass --token-file or set $POLLINATE_TOKEN", file=sys.stderr)
        return 2
    try:
        tls = coordinator_tls(args.coordinator_tls)
        if args.job_command == "create":
            job_spec(args)  # bad settings: a clear error before any RPC
            info, created = asyncio.run(register_job(args.coordinator, token, args.name, args, timeout_s=args.timeout))
            jobs = [info]
            print(f"job {info.name!r} {'registered' if created else 'already registered with these settings'}",
                  file=sys.stderr)
        elif args.job_command in ("show", "record"):
            from pollinate.client.checkpoints import job_history

            history = asyncio.run(job_history(args.coordinator, token, args.name, timeout_s=args.timeout, **tls))
            jobs = [history.job]
        else:
            jobs = list(asyncio.run(call_coordinator(args.coordinator, token, "ListJobs",
                                                     coordinator_pb2.ListJobsRequest(), timeout_s=args.timeout, **tls)).jobs)
    except (ValueError, PollinateError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    if args.job_command == "record":
        print(json.dumps(job_record(history), indent=1))
    elif args.job_command == "show":  # JSON on stdout; what is kept, in words, on stderr
        shown = {**_job_dict(jobs[0]), "checkpoints": checkpoint_summary(history)}
        print(json.dumps(shown, indent=1))
        if not args.json:
            print(format_checkpoints(shown["checkpoints"]), file=sys.stderr)
    elif args.json:
        out = [_job_dict(j) for j in jobs]
        print(json.dumps(out if args.job_command == "list" else out[0], indent=1))
    elif args.job_command == "list":
        print(format_jobs(jobs, now=time.time()))
    else:
        print(json.dumps(_job_dict(jobs[0]), indent=1))
    return 0


def checkpoint_summary(history) -> dict:
    """What the coordinator keeps of the job: per span the kept rounds and their bytes, the
    pruned rounds, and the retention settings in force."""
    spans: dict[str, dict] = {}
    for r in history.rounds:
        entry = spans.setdefault(f"{r.span.start}:{r.span.end}", {"kept": [], "kept_bytes": 0, "pruned": []})
        if r.kept:
            entry["kept"].append(r.round)
            entry["kept_bytes"] += r.state_bytes
        else:
            entry["pruned"].append({"round": r.round, "reason": r.pruned_reason})
    return {"retention": {"keep_last": history.keep_last, "keep_log_spaced": history.keep_log_spaced,
                          "keep_every": history.keep_every, "keep_max_bytes": history.keep_max_bytes,
                          "coordinator_max_bytes": history.coordinator_max_bytes},
            "kept_bytes": sum(e["kept_bytes"] for e in spans.values()), "spans": spans}


def format_checkpoints(summary: dict) -> str:
    from pollinate.coordinator.status_page import fmt_bytes

    r = summary["retention"]
    lines = [f"checkpoints kept: {fmt_bytes(summary['kept_bytes'])} (retention: last {r['keep_last']}, "
             f"{'log-spaced, ' if r['keep_log_spaced'] else ''}every {r['keep_every'] or '-'}, job cap "
             f"{fmt_bytes(r['keep_max_bytes']) if r['keep_max_bytes'] else 'none'}, coordinator cap "
             f"{fmt_bytes(r['coordinator_max_bytes']) if r['coordinator_max_bytes'] else 'none'})"]
    for span, e in sorted(summary["spans"].items(), key=lambda kv: int(kv[0].split(":")[0])):
        lines.append(f"  blocks {span}: rounds {', '.join(map(str, e['kept'])) or '-'} kept "
                     f"({fmt_bytes(e['kept_bytes'])}); {len(e['pruned'])} pruned")
    if not summary["spans"]:
        lines.append("  (no round committed yet)")
    return "\n".join(lines)


def job_record(history) -> dict:
    """The open record (issue 15): enough to verify which data and code made each checkpoint."""
    from pollinate.client.checkpoints import code_version, history_to_dict

    h = history_to_dict(history)
    rounds = [{"span": [r["span"].get("start", 0), r["span"].get("end", 0)], "round": int(r["round"]),
               "members": [{"member_id": m["member_id"], "tokens": int(m["tokens"]), "committed": m["committed"]}
                           for m in r.get("members", [])],
               "tokens": sum(int(m["tokens"]) for m in r.get("members", [])),
               "checksum": r["checksum"], "state_bytes": int(r["state_bytes"]), "committed_at": r["committed_at"],
               "kept": r["kept"], **({"pruned_reason": r["pruned_reason"]} if not r["kept"] else {})}
              for r in h.get("rounds", [])]
    return {"job": history.job.name, "base_model": history.job.base_model, "settings": _job_dict(history.job)["spec"],
            "retention": checkpoint_summary(history)["retention"],
            "code": {"coordinator": history.coordinator_version,
                     "trainers": [{"trainer_id": t.trainer_id, "version": t.version, "git_commit": t.git_commit}
                                  for t in history.trainers],
                     "record_written_by": code_version()},
            "data": [{"trainer_id": t["trainer_id"], "joined_at": t["joined_at"],
                      "files": [{**f, "size_bytes": int(f["size_bytes"]), "examples": int(f["examples"])}
                                for f in t.get("data_files", [])]} for t in h.get("trainers", [])],
            "rounds": rounds,
            "losses": [{**loss, "round": int(loss["round"]), "step": int(loss["step"]), "tokens": int(loss["tokens"])}
                       for loss in h.get("losses", [])]}
