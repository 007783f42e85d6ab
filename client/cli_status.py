"""`pollinate status --coordinator HOST:PORT`: the swarm at a glance.

Asks the coordinator's Status RPC and prints a table of nodes (id, address, span, state,
last heartbeat, throughput, quantisation: none, int8 or int4, and how its inference steps were
batched: sessions per pass, mean and most, and a step's queue wait p50/p99) and per-block
coverage, holes highlighted. `--json` prints the reply as JSON instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pollinate.protocol.auth import TOKEN_ENV, read_token
from pollinate.protocol.channels import add_coordinator_tls_argument, coordinator_tls
from pollinate.protocol.relay import is_relayed, relay_hosts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", required=True, metavar="HOST:PORT",
                        help="the coordinator's gRPC address")
    parser.add_argument("--token-file", type=Path,
                        help=f"file holding the swarm token (or set ${TOKEN_ENV})")
    add_coordinator_tls_argument(parser)
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for the coordinator (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")


def _color(enabled: bool):
    def paint(text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if enabled else text
    return paint


def format_status(reply, *, now: float, color: bool = False) -> str:
    """The human-readable report for a StatusReply."""
    paint = _color(color)
    lines = [
        f"swarm of {reply.model_id} ({reply.num_blocks} blocks), epoch {reply.epoch}, "
        f"{len(reply.members)} nodes",
    ]
    if reply.dht_initial_peers:
        lines.append(f"DHT bootstrap: {reply.dht_initial_peers[0]}")
    lines.append(f"relays for nodes behind NAT: {len(reply.relays)}" if reply.relays else
                 "relays for nodes behind NAT: none (the coordinator runs with --no-relay, no node offers --relay)")
    for q in reply.quarantined:  # issue 18: a verified report, or enough clients' reports
        how = "verified" if q.verified else f"{q.reporters} reporters"
        lines.append(f"quarantined: {q.address} ({how}, {max(0.0, now - q.since):.0f}s ago): {q.reason}")
    lines.append("data plane: TLS, nodes certified by the coordinator's swarm CA" if reply.data_tls_ca_pem else
                 "data plane: plaintext (the coordinator runs without --data-tls)")
    lines.append("")
    header = ("ID", "ADDRESS", "SPAN", "STATE", "LAST BEAT", "TOK/S", "BATCH MEAN/MAX", "STEP WAIT P50/P99", "QUANT")
    rows = []
    for m in reply.members:
        beat = f"{max(0.0, now - m.last_heartbeat_at):.1f}s ago" if m.last_heartbeat_at else "-"
        state = m.state + (" pinned" if m.pinned else "")
        address = m.address
        if is_relayed(address):  # the circuit multiaddrs are long: name the relays' hosts
            state += " relayed"
            address = f"relayed via {', '.join(relay_hosts(address))}"
        rows.append((m.member_id, address, f"{m.span.start}:{m.span.end}", state, beat,
                     f"{m.throughput:.1f}", *format_load(m), m.quant or "none"))
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if not rows:
        lines.append("(no nodes)")
    lines.append("")
    lines.append("coverage per block (replicas, tok/s):")
    holes = []
    top = max([b.throughput for b in reply.blocks] + [1e-9])
    for b in reply.blocks:
        bar = "#" * max(1, round(20 * b.throughput / top)) if b.replicas else ""
        text = f"  {b.block:>3}  {b.replicas:>3}  {b.throughput:>9.1f}  {bar}"
        if b.replicas == 0:
            holes.append(b.block)
            text = paint(text + "  <- HOLE", "1;31")
        lines.append(text)
    lines.append("")
    if holes:
        lines.append(paint(f"{len(holes)} blocks have no replica: {', '.join(map(str, holes))}",
                           "1;31"))
    else:
        lines.append("every block is served")
    lines += ["", format_jobs(reply.jobs, now=now), "", format_rounds(reply.rounds, now=now)]
    return "\n".join(lines)


def format_load(member) -> tuple[str, str]:
    """(sessions per pass: recent mean / most, a step's queue wait p50 / p99) of a MemberInfo;
    dashes before its heartbeats carried any steps."""
    load = member.load if member.HasField("load") else None
    if load is None or not load.passes:
        return "-", "-"
    return (f"{load.mean_sessions:.1f}/{load.max_sessions}",
            f"{load.step_wait_p50_ms:.0f}/{load.step_wait_p99_ms:.0f} ms")


def format_rounds(rounds, *, now: float) -> str:
    """Per (job, span): the last committed DiLoCo round, and per member of its group every
    byte it sent and received in that round (ExchangeShard, BeginRound and CommitRound
    messages, serialized sizes)."""
    if not rounds:
        return "DiLoCo rounds: none committed"
    header = ("JOB", "SPAN", "ROUND", "COMMITTED", "MEMBER", "SHARD", "SENT", "RECEIVED")
    rows = []
    for r in rounds:
        for i, m in enumerate(r.members or [None]):
            lead = (r.job, f"{r.span.start}:{r.span.end}", str(r.round), f"{_age(now - r.committed_at)} ago") \
                if i == 0 else ("", "", "", "")
            rows.append(lead + ((m.member_id + ("" if m.committed else " (gave up)"), str(m.shard_index),
                                 _bytes(m.bytes_sent), _bytes(m.bytes_received)) if m else ("-",) * 4))
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    return "\n".join(["DiLoCo rounds (last committed; bytes per member in that round):"] + [
        "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]])


def _bytes(n: int) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def format_jobs(jobs, *, now: float) -> str:
    """A table of JobInfo messages: name, settings, state, age, and when it last changed (for
    a training job: when its last DiLoCo round formed)."""
    from pollinate.coordinator.jobs import spec_to_dict
    from pollinate.coordinator.status import job_summary

    if not jobs:
        return "jobs: none registered"
    header = ("JOB", "SETTINGS", "STATE", "CREATED", "UPDATED")
    rows = [(j.name, job_summary(spec_to_dict(j.spec) if j.spec.method else {}),
             j.state, f"{_age(now - j.created_at)} ago", f"{_age(now - j.updated_at)} ago") for j in jobs]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def run(args: argparse.Namespace) -> int:
    import asyncio

    from google.protobuf.json_format import MessageToDict

    from pollinate.coordinator.client import call_coordinator
    from pollinate.protocol.errors import PollinateError
    from pollinate.protocol.v1 import coordinator_pb2

    token = read_token(args.token_file, os.environ.get(TOKEN_ENV))
    if not token:
        print(f"pollinate status: no swarm token; pass --token-file or set ${TOKEN_ENV}",
              file=sys.stderr)
        return 2

    try:
        reply = asyncio.run(call_coordinator(args.coordinator, token, "Status",
                                             coordinator_pb2.StatusRequest(), timeout_s=args.timeout,
                                             **coordinator_tls(args.coordinator_tls)))
    except (PollinateError, ValueError) as e:
        print(f"pollinate status: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=1))
    else:
        print(format_status(reply, now=time.time(), color=sys.stdout.isatty()))
    return 0
