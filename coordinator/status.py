"""The swarm at a glance: one JSON-able snapshot of membership, rendered three ways (the
Status RPC in service.py, /api/v1/status as JSON, an HTML page) plus Prometheus metrics.

Pure functions of the snapshot, so each rendering is testable without a server.
"""

from __future__ import annotations

import html
import time
from collections import Counter
from typing import Any

from pollinate.coordinator.membership import Membership
from pollinate.coordinator.store import JobRecord
from pollinate.protocol.relay import is_relayed


def snapshot(
    membership: Membership,
    *,
    dht_initial_peers: list[str],
    started_at: float,
    version: str,
    jobs: list[JobRecord] = (),
    rounds: list[dict[str, Any]] = (),
    relays: list[str] = (),
) -> dict[str, Any]:
    """Everything `pollinate status`, the HTML page and /metrics show, as plain data."""
    cfg = membership.config
    throughputs = membership.block_throughputs()
    replicas = membership.block_replicas()
    members = [
        {
            "member_id": m.member_id,
            "address": m.record.address,
            "name": m.name,
            "span": [m.span.start, m.span.end],
            "serving_span": [m.serving_span.start, m.serving_span.end] if m.serving_span else None,
            "state": m.state,
            "throughput": m.throughput,
            "capacity_blocks": m.record.capacity,
            "pinned": m.record.pinned,
            "joined_at": m.record.joined_at,
            "last_heartbeat_at": m.last_heartbeat_at,
            "relayed": is_relayed(m.record.address),
        }
        for m in sorted(membership.members.values(), key=lambda m: (m.span.start, m.span.end,
                                                                     m.record.address))
    ]
    return {
        "epoch": membership.epoch,
        "model_id": cfg.model_id,
        "num_blocks": cfg.num_blocks,
        "members": members,
        "blocks": [
            {"block": i, "replicas": replicas[i], "throughput": throughputs[i]}
            for i in range(cfg.num_blocks)
        ],
        "holes": [i for i in range(cfg.num_blocks) if replicas[i] == 0],
        "dht_initial_peers": list(dht_initial_peers),
        "relays": list(relays),
        "started_at": started_at,
        "version": version,
        "heartbeat_period_s": cfg.heartbeat_period_s,
        "lease_s": cfg.lease_s,
        "counters": dict(membership.counters),
        "jobs": [job_to_dict(j) for j in jobs],
        "rounds": list(rounds),  # Store.last_committed_rounds(): per (job, span), bytes per member
    }


def job_to_dict(job: JobRecord) -> dict[str, Any]:
    return {"name": job.name, "base_model": job.base_model, "spec": job.spec, "state": job.state,
            "created_at": job.created_at, "updated_at": job.updated_at}


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


def render_metrics(status: dict[str, Any]) -> str:
    """Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:g}")

    states = Counter(m["state"] for m in status["members"])
    metric("pollinate_coordinator_epoch", "gauge", "Membership epoch.",
           [("", status["epoch"])])
    metric("pollinate_coordinator_members", "gauge", "Live members by state.",
           [(f'{{state="{s}"}}', states.get(s, 0)) for s in ("online", "loading")])
    metric("pollinate_coordinator_blocks", "gauge", "Decoder blocks of the model.",
           [("", status["num_blocks"])])
    metric("pollinate_coordinator_holes", "gauge", "Blocks no member is assigned.",
           [("", len(status["holes"]))])
    metric("pollinate_coordinator_block_replicas", "gauge", "Members assigned each block.",
           [(f'{{block="{b["block"]}"}}', b["replicas"]) for b in status["blocks"]])
    metric("pollinate_coordinator_block_throughput", "gauge",
           "Throughput assigned to each block, tokens/s.",
           [(f'{{block="{b["block"]}"}}', b["throughput"]) for b in status["blocks"]])
    counters = status["counters"]
    for key, help_text in (
        ("joins", "Joins accepted."),
        ("heartbeats", "Heartbeats accepted."),
        ("leaves", "Graceful leaves."),
        ("evictions", "Members evicted for a missed lease."),
        ("moves", "Span moves ordered by rebalancing."),
    ):
        metric(f"pollinate_coordinator_{key}_total", "counter", help_text,
               [("", counters.get(key, 0))])
    metric("pollinate_coordinator_uptime_seconds", "gauge", "Seconds since start.",
           [("", round(time.time() - status["started_at"], 3))])
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin-top:1em}td,th{padding:2px 8px;text-align:left}
tr:nth-child(even){background:#f4f4f4}
.bars{display:flex;align-items:flex-end;height:120px;gap:2px;margin-top:1em}
.bar{flex:1;background:#4a8;min-height:2px;position:relative}
.bar.hole{background:#d33;height:120px!important;opacity:.35}
.lbl{font-size:10px;text-align:center;flex:1}
.hole-text{color:#d33;font-weight:bold}
"""


def render_html(status: dict[str, Any]) -> str:
    """A page that shows coverage per block (a bar each, holes in red) and the members."""
    e = html.escape
    blocks = status["blocks"]
    top = max([b["throughput"] for b in blocks] + [1e-9])
    bars = "".join(
        f'<div class="bar{" hole" if b["replicas"] == 0 else ""}" '
        f'style="height:{max(2, int(120 * b["throughput"] / top))}px" '
        f'title="block {b["block"]}: {b["replicas"]} replicas, {b["throughput"]:.1f} tok/s"></div>'
        for b in blocks
    )
    labels = "".join(f'<div class="lbl">{b["block"]}</div>' for b in blocks)
    rows = "".join(
        "<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in (
            m["member_id"], m["address"], m["name"], f'{m["span"][0]}:{m["span"][1]}',
            m["state"] + (" (pinned)" if m["pinned"] else ""),
            f'{time.time() - m["last_heartbeat_at"]:.1f} s ago' if m["last_heartbeat_at"] else "-",
            f'{m["throughput"]:.1f}',
        )) + "</tr>"
        for m in status["members"]
    )
    job_rows = "".join(
        "<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in (
            j["name"], job_summary(j["spec"]), j["state"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(j["created_at"])) + " UTC",
        )) + "</tr>"
        for j in status.get("jobs", [])
    ) or '<tr><td colspan="4">(no jobs)</td></tr>'
    round_rows = "".join(
        "<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in (
            r["job"], f'{r["span"][0]}:{r["span"][1]}', r["round"], m["member_id"],
            m["bytes_sent"], m["bytes_received"],
        )) + "</tr>"
        for r in status.get("rounds", []) for m in r["members"]
    ) or '<tr><td colspan="6">(no committed round)</td></tr>'
    holes = status["holes"]
    hole_line = (f'<p class="hole-text">Holes: blocks {", ".join(map(str, holes))} have no replica</p>'
                 if holes else "<p>Every block is served.</p>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>Pollinate swarm</title><style>{_CSS}</style></head><body>
<h1>Pollinate swarm</h1>
<p>Model <b>{e(status["model_id"])}</b>, {status["num_blocks"]} blocks, epoch {status["epoch"]},
{len(status["members"])} members. JSON: <a href="/api/v1/status">/api/v1/status</a>,
metrics: <a href="/metrics">/metrics</a>.</p>
<h2>Coverage per block (tokens/s)</h2>
<div class="bars">{bars}</div><div style="display:flex;gap:2px">{labels}</div>
{hole_line}
<h2>Nodes</h2>
<table><tr><th>id</th><th>address</th><th>name</th><th>span</th><th>state</th>
<th>last heartbeat</th><th>tok/s</th></tr>{rows}</table>
<h2>Jobs</h2>
<table><tr><th>name</th><th>settings</th><th>state</th><th>created</th></tr>{job_rows}</table>
<h2>DiLoCo rounds (last committed; ExchangeShard bytes per member in it)</h2>
<table><tr><th>job</th><th>span</th><th>round</th><th>member</th><th>bytes sent</th>
<th>bytes received</th></tr>{round_rows}</table>
</body></html>
"""
