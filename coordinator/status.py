"""The swarm at a glance: one JSON-able snapshot of membership, jobs and rounds, rendered
four ways (the Status RPC in service.py, /api/v1/status as JSON, the HTML pages in
status_page.py, and the Prometheus metrics here).

Pure functions of the snapshot, so each rendering is testable without a server.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from typing import Any, Iterable

from pollinate.coordinator.membership import Membership
from pollinate.coordinator.store import JobRecord
from pollinate.protocol.identity import fingerprint
from pollinate.protocol.relay import is_relayed

# A member whose last heartbeat is older than this many heartbeat periods is shown "stale"
# (and its blocks stop counting as served) although its lease has not run out yet: 2.5 beats
# missed is no longer one slow beat, and the default lease (5 beats) evicts it soon after.
STALE_AFTER_BEATS = 2.5
# A "training" job with no round formed for max(this, IDLE_AFTER_INTERVALS x its median
# round interval) is shown "idle": the coordinator hears of a trainer only through rounds,
# so it cannot tell an exited trainer from a slow one sooner than that.
IDLE_FLOOR_S = 120.0
IDLE_AFTER_INTERVALS = 3.0


def snapshot(
    membership: Membership,
    *,
    dht_initial_peers: list[str],
    started_at: float,
    version: str,
    jobs: list[JobRecord] = (),
    rounds: list[dict[str, Any]] = (),
    history: list[dict[str, Any]] = (),
    totals: list[dict[str, Any]] = (),
    latest: list[dict[str, Any]] = (),
    coordinator_address: str = "",
    now: float | None = None,
    relays: list[str] = (),
    quarantined: list[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Everything `pollinate status`, the HTML pages and /metrics show, as plain data.

    rounds: Store.last_committed_rounds(); history: Store.round_history() (recent committed
    rounds, for rates); totals: Store.round_totals(); latest: Store.round_history(
    latest_only=True) (the last round of each job and span). `now` defaults to the clock.
    """
    now = membership.wall_clock() if now is None else now
    cfg = membership.config
    throughputs = membership.block_throughputs()
    replicas = membership.block_replicas()
    stale_after = STALE_AFTER_BEATS * cfg.heartbeat_period_s
    members = []
    for m in sorted(membership.members.values(),
                    key=lambda m: (m.span.start, m.span.end, m.record.address)):
        age = now - m.last_heartbeat_at if m.last_heartbeat_at else None
        stale = age is None or age > stale_after
        members.append({
            "member_id": m.member_id,
            "address": m.record.address,
            "name": m.name,
            "span": [m.span.start, m.span.end],
            "serving_span": [m.serving_span.start, m.serving_span.end] if m.serving_span else None,
            "state": m.state,
            # online / loading as `state`, or stale: no heartbeat for STALE_AFTER_BEATS periods
            # (or none since this coordinator restarted); its lease still holds
            "health": "stale" if stale else m.state,
            "heartbeat_age_s": age,
            "throughput": m.throughput,
            "capacity_blocks": m.record.capacity,
            "pinned": m.record.pinned,
            "joined_at": m.record.joined_at,
            "last_heartbeat_at": m.last_heartbeat_at,
            "relayed": is_relayed(m.record.address),
            "quant": m.quant,
            # fingerprint of the public key that joined (protocol/identity.py); "" if unsigned
            "identity": fingerprint(m.member_key) if m.member_key else "",
            # passes, steps, mean/max sessions per pass, step queue wait p50/p99 (ms), as its
            # last heartbeat reported them; None before the first
            "load": m.load,
        })
    coverage = serving_coverage(members, cfg.num_blocks)
    history = list(history)
    return {
        "generated_at": now,
        "epoch": membership.epoch,
        "model_id": cfg.model_id,
        "num_blocks": cfg.num_blocks,
        "coordinator_address": coordinator_address,
        "members": members,
        # what membership assigned: `replicas` members, their summed throughput
        "blocks": [
            {"block": i, "replicas": replicas[i], "throughput": throughputs[i]}
            for i in range(cfg.num_blocks)
        ],
        # what is served now: members online (not loading, not stale) whose serving span has it
        "coverage": coverage,
        "holes": [i for i in range(cfg.num_blocks) if replicas[i] == 0],
        "unserved": [c["block"] for c in coverage if c["serving"] == 0],
        "departures": list(reversed(membership.departures)),  # newest first
        "dht_initial_peers": list(dht_initial_peers),
        "relays": list(relays),
        # nodes quarantined for answering wrong (coordinator/quarantine.py): address, peer_id,
        # reporters, since, reason, verified, member_keys
        "quarantined": list(quarantined),
        "started_at": started_at,
        "version": version,
        "heartbeat_period_s": cfg.heartbeat_period_s,
        "lease_s": cfg.lease_s,
        "stale_after_s": stale_after,
        "counters": dict(membership.counters),
        "jobs": [job_to_dict(j, totals=totals, history=history, now=now) for j in jobs],
        "rounds": list(rounds),  # Store.last_committed_rounds(): per (job, span), bytes per member
        "round_totals": list(totals),
        "history": history,
        "latest_rounds": list(latest),
    }


def serving_coverage(members: list[dict], num_blocks: int) -> list[dict]:
    """Per block: members that serve it now (online, fresh heartbeat, serving span covers
    it) and their summed throughput; loading and stale members do not count."""
    serving = [0] * num_blocks
    tput = [0.0] * num_blocks
    for m in members:
        if m["health"] != "online" or m["serving_span"] is None:
            continue
        for i in range(m["serving_span"][0], min(m["serving_span"][1], num_blocks)):
            serving[i] += 1
            tput[i] += m["throughput"]
    return [{"block": i, "serving": serving[i], "serving_throughput": tput[i]} for i in range(num_blocks)]


def job_to_dict(job: JobRecord, *, totals: Iterable[dict] = (), history: Iterable[dict] = (),
                now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    spans = [t for t in totals if t["job"] == job.name]
    recent = [r for r in history if r["job"] == job.name]
    return {"name": job.name, "base_model": job.base_model, "spec": job.spec, "state": job.state,
            "created_at": job.created_at, "updated_at": job.updated_at,
            "activity": job_activity(job.state, job.updated_at, recent, now),
            "rounds_committed": {f"{t['span'][0]}:{t['span'][1]}": t["rounds"] for t in spans},
            # a trainer's tokens pass through every span: the job's are its busiest span's
            "tokens": max((t["tokens"] for t in spans), default=0),
            "tokens_per_s": tokens_per_s(recent),
            "bytes_sent": sum(t["bytes_sent"] for t in spans),
            "last_committed_at": max((t["last_committed_at"] for t in spans), default=None)}


def job_activity(state: str, last_formed_at: float, recent: list[dict], now: float) -> str:
    """'training' while rounds keep forming, 'idle' once none formed for longer than the
    job's rounds take (IDLE_FLOOR_S at least), else the stored state ('created')."""
    if state != "training":
        return state
    times = sorted(r["committed_at"] for r in recent)
    gaps = [b - a for a, b in zip(times, times[1:])]
    idle_after = max(IDLE_FLOOR_S, IDLE_AFTER_INTERVALS * statistics.median(gaps)) if gaps else IDLE_FLOOR_S
    return "training" if now - last_formed_at <= idle_after else "idle"


def tokens_per_s(recent: list[dict]) -> float | None:
    """Tokens trained per second over a job's recent committed rounds, per span, the busiest
    span's; a round's tokens are those since the previous round, so the first is left out."""
    best = None
    for span in {tuple(r["span"]) for r in recent}:
        rs = sorted((r for r in recent if tuple(r["span"]) == span), key=lambda r: r["committed_at"])
        if len(rs) >= 2 and rs[-1]["committed_at"] > rs[0]["committed_at"]:
            rate = sum(r["tokens"] for r in rs[1:]) / (rs[-1]["committed_at"] - rs[0]["committed_at"])
            best = rate if best is None else max(best, rate)
    return best


def fp32_exchange_bytes(members: int, state_bytes: int) -> int:
    """What a group's ExchangeShard traffic would weigh uncompressed: each of the n members
    sends (n-1)/n of the fp32 pseudo-gradient to the shards' owners and each owner its fp32
    result to the n-1 others, 2(n-1) x 4P bytes in all; the committed state holds θ_global
    and the momentum in fp32, 8P bytes, so (n-1) x its size (an estimate: the header is in)."""
    return max(0, members - 1) * state_bytes


def exchange_saving(r: dict) -> float | None:
    """fp32 exchange bytes / the group's actual ExchangeShard bytes sent; None for a group of
    one (no exchange) or a round whose members reported no bytes."""
    sent = r["bytes_sent"] - r["coordinator_bytes_sent"]
    ref = fp32_exchange_bytes(r["members"], r["state_bytes"])
    return ref / sent if ref and sent > 0 else None


def job_summary(spec: dict[str, Any]) -> str:
    """'lora r=8 alpha=16 lr=0.0004' - the settings a person compares at a glance."""
    if not spec:
        return "(not registered: seen in a round)"
    parts = [spec["method"]]
    if spec["method"] == "lora":
        parts += [f"r={spec.get('rank')}", f"alpha={spec.get('alpha'):g}"]
    if spec["method"] == "prompt-tuning":
        parts.append(f"tokens={spec.get('num_virtual_tokens')}")
    parts.append(f"lr={spec.get('lr'):g}")
    return " ".join(parts)


def block_ranges(blocks: list[int]) -> str:
    """[3, 4, 5, 9] -> '3–5, 9': holes as a person reads them, not '15, 16, ..., 29'."""
    out: list[str] = []
    start = prev = None
    for b in sorted(blocks) + [None]:
        if start is not None and b != prev + 1:
            out.append(f"{start}" if start == prev else f"{start}–{prev}")
            start = None
        if start is None:
            start = b
        prev = b
    return ", ".join(out)


def span_runs(blocks: list[int]) -> list[tuple[int, int]]:
    """[3, 4, 5, 9] -> [(3, 6), (9, 10)]: START:END spans (end exclusive) for --blocks."""
    runs: list[tuple[int, int]] = []
    for b in sorted(blocks):
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs


# ---- Prometheus ---------------------------------------------------------------------


def prom_value(v: float | int | bool) -> str:
    """A sample value without precision loss: integers in full (12345678, not 1.23457e+07,
    which would break rate()), floats as Python's shortest round-trip repr."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def prom_labels(**labels: Any) -> str:
    """{a="x",b="y"} with the text format's escapes (backslash, double quote, newline)."""
    if not labels:
        return ""
    esc = (lambda s: str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}"


def render_metrics(status: dict[str, Any], now: float | None = None) -> str:
    """Prometheus text exposition format (version 0.0.4)."""
    now = time.time() if now is None else now
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {prom_value(value)}")

    health = Counter(m["health"] for m in status["members"])
    metric("pollinate_coordinator_info", "gauge", "The coordinator's version and model (always 1).",
           [(prom_labels(version=status["version"], model=status["model_id"]), 1)])
    metric("pollinate_coordinator_epoch", "gauge", "Membership epoch.", [("", status["epoch"])])
    metric("pollinate_coordinator_members", "gauge",
           "Live members by health: online, loading, stale (no heartbeat for "
           f"{STALE_AFTER_BEATS:g} periods, lease not yet expired).",
           [(prom_labels(state=s), health.get(s, 0)) for s in ("online", "loading", "stale")])
    metric("pollinate_coordinator_blocks", "gauge", "Decoder blocks of the model.",
           [("", status["num_blocks"])])
    metric("pollinate_coordinator_holes", "gauge", "Blocks no member is assigned.",
           [("", len(status["holes"]))])
    metric("pollinate_coordinator_unserved_blocks", "gauge",
           "Blocks no online member with a fresh heartbeat serves.", [("", len(status["unserved"]))])
    metric("pollinate_coordinator_block_replicas", "gauge", "Members assigned each block.",
           [(prom_labels(block=b["block"]), b["replicas"]) for b in status["blocks"]])
    metric("pollinate_coordinator_block_serving_replicas", "gauge",
           "Online members with a fresh heartbeat serving each block.",
           [(prom_labels(block=c["block"]), c["serving"]) for c in status["coverage"]])
    metric("pollinate_coordinator_block_throughput", "gauge",
           "Throughput assigned to each block, tokens/s.",
           [(prom_labels(block=b["block"]), b["throughput"]) for b in status["blocks"]])
    counters = status["counters"]
    for key, help_text in (
        ("joins", "Joins accepted."),
        ("heartbeats", "Heartbeats accepted."),
        ("leaves", "Graceful leaves."),
        ("evictions", "Members evicted for a missed lease."),
        ("moves", "Span moves ordered by rebalancing."),
    ):
        metric(f"pollinate_coordinator_{key}_total", "counter", help_text,
               [("", int(counters.get(key, 0)))])
    metric("pollinate_coordinator_start_time_seconds", "gauge", "Unix time the coordinator started.",
           [("", status["started_at"])])
    metric("pollinate_coordinator_uptime_seconds", "gauge", "Seconds since start.",
           [("", round(now - status["started_at"], 3))])

    jobs = status.get("jobs", [])
    metric("pollinate_job_info", "gauge",
           "Registered jobs: method and activity (training, idle, created); always 1.",
           [(prom_labels(job=j["name"], method=j["spec"].get("method", ""), activity=j["activity"]), 1)
            for j in jobs])
    metric("pollinate_job_tokens_per_second", "gauge",
           "Tokens trained per second over the job's recent rounds (busiest span).",
           [(prom_labels(job=j["name"]), j["tokens_per_s"]) for j in jobs if j["tokens_per_s"] is not None])
    totals = status.get("round_totals", [])
    span = (lambda t: f"{t['span'][0]}:{t['span'][1]}")
    metric("pollinate_job_rounds_committed_total", "counter", "DiLoCo rounds committed per (job, span).",
           [(prom_labels(job=t["job"], span=span(t)), t["rounds"]) for t in totals])
    metric("pollinate_job_tokens_total", "counter", "Tokens members trained on, summed over committed rounds.",
           [(prom_labels(job=t["job"], span=span(t)), t["tokens"]) for t in totals])
    metric("pollinate_job_round_bytes_total", "counter",
           "Bytes members moved in committed rounds (ExchangeShard plus BeginRound/CommitRound).",
           [(prom_labels(job=t["job"], span=span(t), direction=d), t[f"bytes_{d}"])
            for t in totals for d in ("sent", "received")])
    metric("pollinate_job_checkpoints_kept", "gauge",
           "Committed round states the coordinator still stores per (job, span), after retention.",
           [(prom_labels(job=t["job"], span=span(t)), t.get("checkpoints_kept", 0)) for t in totals])
    metric("pollinate_job_checkpoint_bytes", "gauge", "Bytes of those stored states.",
           [(prom_labels(job=t["job"], span=span(t)), t.get("checkpoint_bytes", 0)) for t in totals])
    last_rounds = status.get("latest_rounds", [])
    per_round = (lambda r, **extra: prom_labels(job=r["job"], span=f"{r['span'][0]}:{r['span'][1]}", **extra))
    metric("pollinate_round_last", "gauge", "The last committed round number per (job, span).",
           [(per_round(r), r["round"]) for r in last_rounds])
    metric("pollinate_round_last_committed_timestamp_seconds", "gauge", "Unix time the last round committed.",
           [(per_round(r), r["committed_at"]) for r in last_rounds])
    metric("pollinate_round_last_members", "gauge", "Group size of the last committed round.",
           [(per_round(r), r["members"]) for r in last_rounds])
    metric("pollinate_round_last_tokens", "gauge", "Tokens trained for the last committed round.",
           [(per_round(r), r["tokens"]) for r in last_rounds])
    metric("pollinate_round_last_bytes", "gauge", "Bytes the last committed round's members moved.",
           [(per_round(r, direction=d), r[f"bytes_{d}"]) for r in last_rounds for d in ("sent", "received")])
    metric("pollinate_round_last_state_bytes", "gauge", "Size of the last committed state.",
           [(per_round(r), r["state_bytes"]) for r in last_rounds])
    # Loss per round: drawn from the round rows once trainers report it (issue 15's per-round
    # eval); no sample until then.
    metric("pollinate_round_last_loss", "gauge", "Loss reported for the last committed round.",
           [(per_round(r, kind=k), r[f"{k}_loss"]) for r in last_rounds for k in ("train", "heldout")
            if r.get(f"{k}_loss") is not None])
    return "\n".join(lines) + "\n"

