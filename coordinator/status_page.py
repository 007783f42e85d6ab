"""The status pages a person reads (issue 15): the swarm (/), a job (/jobs/NAME), a node
(/nodes/ID), each an HTML shell around a fragment that its script fetches again every
REFRESH_S seconds (`?fragment=1`) and swaps in only when it changed, so a tooltip or an open
detail survives a refresh and nothing reloads. "Updated N s ago" counts from the last fetch
that answered; when fetches fail the page says since when and keeps the last data, greyed.

Plots are inline SVG drawn here, so the page needs no script to show them and a test can
read them from the DOM. Pure functions of the status snapshot (status.py).
"""

from __future__ import annotations

import html
import json
import math
import time
from typing import Any, Callable

from pollinate.coordinator.status import (
    STALE_AFTER_BEATS,
    block_ranges,
    exchange_saving,
    fp32_exchange_bytes,
    job_summary,
    span_runs,
)

# Seconds between the page's fetches of its fragment: the old meta refresh's 2 s.
REFRESH_S = 2.0
# Rounds listed in a job's table (newest first); the plots draw every round fetched.
ROUNDS_LISTED = 50
# Up to this many points a plot's series marks each with a dot that has its value as a
# tooltip; beyond, the line alone (a dot is ~120 bytes, refetched every REFRESH_S).
MARKED_POINTS = 120

e = html.escape
HEALTH_COLOURS = {"online": "#2e9e6a", "loading": "#e0a030", "stale": "#9a9a9a"}


# ---- small formatters ---------------------------------------------------------------


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def fmt_num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "—"
    text = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return f"{text} {unit}".rstrip()


def fmt_age(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.1f} s ago" if s < 10 else f"{s:.0f} s ago"
    if s < 3600:
        return f"{s / 60:.0f} min ago"
    if s < 86400:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.1f} days ago"


def utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def ago(t: float | None, now: float) -> str:
    """'12 s ago' that the page's script keeps counting (data-t), the UTC time as tooltip."""
    if not t:
        return "never"
    return f'<span class="ago" data-t="{t!r}" title="{utc(t)}">{fmt_age(now - t)}</span>'


def span_text(span: list[int] | None) -> str:
    return f"{span[0]}:{span[1]}" if span else "—"


def table(headers: list[str], rows: list[list[str]], empty: str, *, cls: str = "") -> str:
    """A table in a horizontally scrolling box (a phone scrolls it, the page stays put).
    Cells are HTML: callers escape text."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join(rows) if rows else f'<tr><td colspan="{len(headers)}" class="muted">{empty}</td></tr>'
    return f'<div class="scroll"><table class="{cls}"><tr>{head}</tr>{body}</table></div>'


def row(cells: list[str], attrs: str = "") -> str:
    return f"<tr{attrs}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


# ---- plots --------------------------------------------------------------------------


def nice_ceiling(v: float) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^k at least v (an axis maximum a person reads)."""
    if v <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(v))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= v * (1 - 1e-12):
            return step * power
    return 10 * power


def line_chart(title: str, series: list[tuple[str, str, list[tuple[float, float]], bool]], *,
               y_format: Callable[[float], str], x_label: str = "round", plot_id: str = "",
               zero_based: bool = True, integer: bool = False) -> str:
    """An SVG line chart: series of (name, colour, [(x, y)], dashed), a y axis with up to
    five labelled ticks at round steps (from 0, or with zero_based=False around the data, as
    a loss is read; integer: whole numbers, for counts), x ticks at the data's ends and
    middle, a legend. Each series is a
    <polyline data-series=NAME data-points=N> with a <circle> per point (title: the value)."""
    w, h, left, right, top, bottom = 520, 230, 64, 12, 12, 34
    pts = [p for _, _, ps, _ in series for p in ps]
    if not pts:
        return ""
    xs = [x for x, _ in pts]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    lo, hi = min(y for _, y in pts), max(y for _, y in pts)
    if integer:  # counts: whole-number steps
        step = float(max(1, math.ceil(hi / 4)))
        ymin, n = 0.0, max(1, math.ceil(hi / step))
    elif zero_based or lo <= 0:  # at most 4 steps of a round size (1, 2, 2.5, 5 x 10^k)
        step = nice_ceiling(hi / 4) if hi > 0 else 1.0
        ymin, n = 0.0, max(1, math.ceil(hi / step - 1e-9))
    else:  # four steps of a round size around the data
        step = nice_ceiling(((hi - lo) or abs(hi) * 0.1) / 4)
        ymin = math.floor(lo / step) * step
        while ymin + 4 * step < hi:
            step = nice_ceiling(step * 1.01)
            ymin = math.floor(lo / step) * step
        n = 4
    ymax = ymin + n * step
    sx = (lambda x: left + (x - x0) / (x1 - x0) * (w - left - right))
    sy = (lambda y: top + (1 - (y - ymin) / (ymax - ymin)) * (h - top - bottom))
    parts = [f'<svg class="plot" id="{e(plot_id)}" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
             f'aria-label="{e(title)}">']
    for i in range(n + 1):
        y = ymin + step * i
        parts.append(f'<line class="grid" x1="{left}" x2="{w - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}"/>'
                     f'<text class="tick" x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{e(y_format(y))}</text>')
    for x in sorted({min(xs), (min(xs) + max(xs)) / 2, max(xs)}):
        label = f"{x:g}" if float(x).is_integer() else ""
        if label:
            parts.append(f'<text class="tick" x="{sx(x):.1f}" y="{h - bottom + 16}" text-anchor="middle">{label}</text>')
    parts.append(f'<text class="tick" x="{(left + w - right) / 2:.0f}" y="{h - 2}" text-anchor="middle">{e(x_label)}</text>')
    for name, colour, ps, dashed in series:
        if not ps:
            continue
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ps)
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        parts.append(f'<polyline data-series="{e(name)}" data-points="{len(ps)}" points="{coords}" '
                     f'fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        if len(ps) <= MARKED_POINTS:
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}">'
                      f'<title>{e(name)}, {x_label} {x:g}: {e(y_format(y))}</title></circle>' for x, y in ps]
    parts.append("</svg>")
    legend = " ".join(f'<span class="key"><i style="background:{c}"></i>{e(n)}</span>'
                      for n, c, ps, _ in series if ps)
    return f'<figure><figcaption>{e(title)}</figcaption>{"".join(parts)}<div class="legend">{legend}</div></figure>'


def coverage_svg(status: dict[str, Any]) -> str:
    """Coverage per block on a replica scale (one cell per member assigned the block, coloured
    by its health; so one fast node shrinks nobody), the count on top ('1/2': 1 of the 2
    assigned serves now), unserved blocks on a red band, block numbers below."""
    n = status["num_blocks"]
    members = status["members"]
    cells: list[list[dict]] = [[] for _ in range(n)]
    for m in members:
        for i in range(m["span"][0], min(m["span"][1], n)):
            cells[i].append(m)
    serving = [c["serving"] for c in status["coverage"]]
    ymax = max([len(c) for c in cells] + [1])
    left, top, cell_h, bottom = 34, 30, 18, 30
    col_w = max(8.0, min(36.0, 900 / n))
    w = left + n * col_w + 8
    h = top + ymax * cell_h + bottom
    base = top + ymax * cell_h
    parts = [f'<svg class="coverage" width="{w:.0f}" height="{h}" viewBox="0 0 {w:.0f} {h}" role="img" '
             f'aria-label="coverage per block">']
    for k in range(ymax + 1):
        y = base - k * cell_h
        parts.append(f'<line class="grid" x1="{left}" x2="{w - 8:.0f}" y1="{y}" y2="{y}"/>'
                     f'<text class="tick" x="{left - 5}" y="{y + 4}" text-anchor="end">{k}</text>')
    parts.append('<text class="tick" x="4" y="11">replicas</text>')
    label_every = max(1, math.ceil(n / 30))
    for i in range(n):
        x = left + i * col_w
        assigned = len(cells[i])
        if serving[i] == 0:
            parts.append(f'<rect class="unserved" data-block="{i}" x="{x:.1f}" y="{top}" width="{col_w - 1:.1f}" '
                         f'height="{ymax * cell_h}"><title>block {i}: not served now</title></rect>')
        for k, m in enumerate(sorted(cells[i], key=lambda m: (m["health"] != "online", m["member_id"]))):
            parts.append(
                f'<rect class="cell {m["health"]}" data-block="{i}" x="{x:.1f}" y="{base - (k + 1) * cell_h + 1}" '
                f'width="{col_w - 1:.1f}" height="{cell_h - 2}" fill="{HEALTH_COLOURS[m["health"]]}">'
                f'<title>block {i}: {e(m["name"] or m["address"])} ({m["health"]}, '
                f'{m["throughput"]:.1f} tok/s)</title></rect>')
        count = f"{serving[i]}/{assigned}" if serving[i] != assigned else f"{assigned}"
        if col_w >= 14 or serving[i] != assigned:
            parts.append(f'<text class="count" x="{x + col_w / 2:.1f}" y="{base - assigned * cell_h - 3}" '
                         f'text-anchor="middle">{count}</text>')
        if i % label_every == 0:
            parts.append(f'<text class="tick" x="{x + col_w / 2:.1f}" y="{base + 14}" text-anchor="middle">{i}</text>')
    parts.append(f'<text class="tick" x="{left + n * col_w / 2:.0f}" y="{h - 2}" text-anchor="middle">block</text>')
    parts.append("</svg>")
    legend = " ".join(f'<span class="key"><i style="background:{c}"></i>{s}</span>' for s, c in HEALTH_COLOURS.items())
    legend += ' <span class="key"><i class="unserved-key"></i>not served now</span>'
    return "".join(parts) + f'<div class="legend">{legend}</div>'


# ---- fragments ----------------------------------------------------------------------


def health_cell(m: dict) -> str:
    text = m["health"] + (" (pinned)" if m["pinned"] else "")
    return f'<span class="state {m["health"]}">{e(text)}</span>'


def node_rows(status: dict[str, Any]) -> list[str]:
    now = status["generated_at"]
    return [row([
        f'<a href="/nodes/{e(m["member_id"])}">{e(m["name"] or m["member_id"])}</a>',
        e(m["address"]), span_text(m["span"]), health_cell(m), ago(m["last_heartbeat_at"], now),
        fmt_num(m["throughput"], "tok/s"), ago(m["joined_at"], now),
    ], f' class="member {m["health"]}" data-member="{e(m["member_id"])}"') for m in status["members"]]


def departure_rows(status: dict[str, Any]) -> list[str]:
    now = status["generated_at"]
    return [row([ago(d["at"], now), f'<a href="/nodes/{e(d["member_id"])}">{e(d["name"] or d["member_id"])}</a>',
                 e(d["address"]), span_text(d["span"]), e(d["why"])], ' class="departure"')
            for d in status["departures"]]


def join_hint(status: dict[str, Any]) -> str:
    """What a volunteer does about a hole: the command that serves the missing blocks."""
    unserved = status["unserved"]
    if not unserved:
        return ""
    coord = status.get("coordinator_address") or "COORDINATOR:PORT"
    cmds = "<br>".join(
        f"<code>pollinate node --coordinator {e(coord)} --token-file swarm.token --blocks {a}:{b}</code>"
        for a, b in span_runs(unserved))
    return (f'<p class="join">Help: blocks {block_ranges(unserved)} need a node. With the swarm\'s '
            f'token and the model, run<br>{cmds}<br>(or leave out <code>--blocks</code> and the '
            f'coordinator puts you where you are needed).</p>')


def job_rows(status: dict[str, Any]) -> list[str]:
    now = status["generated_at"]
    out = []
    for j in status.get("jobs", []):
        rounds = ", ".join(f"{n} ({s})" for s, n in j["rounds_committed"].items()) or "0"
        out.append(row([
            f'<a href="/jobs/{e(j["name"])}">{e(j["name"])}</a>', e(job_summary(j["spec"])),
            f'<span class="activity {e(j["activity"])}">{e(j["activity"])}</span>',
            ago(j["last_committed_at"], now), e(rounds), fmt_num(j["tokens"]),
            fmt_num(j["tokens_per_s"], "tok/s"), fmt_bytes(j["bytes_sent"]),
        ], f' class="job" data-job="{e(j["name"])}"'))
    return out


def round_cells(r: dict, now: float) -> list[str]:
    saving = exchange_saving(r)
    return [span_text(r["span"]), str(r["round"]), ago(r["committed_at"], now),
            fmt_num(r["committed_at"] - r["formed_at"], "s") if r.get("formed_at") else "—",
            f'{r["committed_members"]}/{r["members"]}', fmt_num(r["tokens"]),
            fmt_bytes(r["bytes_sent"]), fmt_bytes(r["coordinator_bytes_sent"] + r["coordinator_bytes_received"]),
            f"{saving:.1f}×" if saving is not None else "—"]


ROUND_HEADERS = ["span", "round", "committed", "took", "group", "tokens", "members sent",
                 "with coordinator", "saving vs fp32"]


def overview_fragment(status: dict[str, Any]) -> str:
    now = status["generated_at"]
    health = {s: sum(m["health"] == s for m in status["members"]) for s in HEALTH_COLOURS}
    unserved = status["unserved"]
    if unserved:
        hole_line = (f'<p class="hole-text">Not served now: blocks {block_ranges(unserved)} '
                     f'({len(unserved)} of {status["num_blocks"]}); a request through them fails.</p>')
    elif health["online"]:
        hole_line = '<p class="ok-text">Every block is served.</p>'
    else:
        hole_line = '<p class="hole-text">No node serves yet.</p>'
    last_rounds = [row([f'<a href="/jobs/{e(r["job"])}">{e(r["job"])}</a>', *round_cells(r, now)])
                   for r in sorted(status.get("latest_rounds", []), key=lambda r: (r["job"], r["span"]))]
    departures = departure_rows(status)
    return f"""
<p>Model <b>{e(status["model_id"])}</b>, {status["num_blocks"]} blocks, epoch {status["epoch"]};
<b>{len(status["members"])}</b> members: {health["online"]} online, {health["loading"]} loading,
{health["stale"]} stale (no heartbeat for {status["stale_after_s"]:g} s; evicted after {status["lease_s"]:g} s).
Coordinator {e(status["version"])}, up since {ago(status["started_at"], now)}.</p>
{hole_line}{join_hint(status)}
<h2>Coverage</h2>
{coverage_svg(status)}
<details id="block-numbers"><summary>Per-block numbers</summary>
{table(["block", "assigned", "serving now", "assigned tok/s", "serving tok/s"],
       [row([str(b["block"]), str(b["replicas"]), str(c["serving"]), fmt_num(b["throughput"]),
             fmt_num(c["serving_throughput"])]) for b, c in zip(status["blocks"], status["coverage"])], "")}
</details>
<h2>Nodes</h2>
{table(["node", "address", "blocks", "state", "last heartbeat", "throughput", "joined"], node_rows(status),
       "(no node has joined)", cls="nodes")}
{"<h2>Left or evicted</h2>" + table(["when", "node", "address", "blocks", "why"], departures, "", cls="departures")
 if departures else ""}
{"<h2>Quarantined</h2>" + table(["address", "evidence", "reporters", "since", "last report"],
                                 [row([e(q["address"]), "verified" if q.get("verified") else "reports",
                                       str(q["reporters"]), ago(q["since"], now), e(q["reason"])])
                                  for q in status.get("quarantined", [])], "", cls="quarantined")
 if status.get("quarantined") else ""}
<h2>Jobs</h2>
{table(["job", "settings", "activity", "last round", "rounds (span)", "tokens", "tokens/s", "bytes sent"],
       job_rows(status), "(no jobs)", cls="jobs")}
<h2>Last DiLoCo round per job and span</h2>
{table(["job", *ROUND_HEADERS], last_rounds, "(no committed round)", cls="rounds")}
"""


SPAN_COLOURS = ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b83280", "#718096")


def memorisation_plots(analysis: list[dict]) -> str:
    """The stored `pollinate analyze` results (docs/checkpoints.md): verbatim recall and loss on
    training vs held-out examples per analysed checkpoint; a placeholder saying how to get
    them when there are none."""
    if not analysis:
        return ('<figure class="placeholder" id="plot-memorisation"><figcaption>Memorisation</figcaption><p>The '
                'generalisation gap and verbatim rates per kept checkpoint draw here once <code>pollinate analyze '
                '--job NAME --data FILE</code> has run for this job (docs/checkpoints.md).</p></figure>')
    train, held = SPAN_COLOURS[0], SPAN_COLOURS[1]

    def pts(key: str):
        return [(a["round"], a[key]) for a in analysis]

    verbatim = line_chart("Memorisation: share reproduced verbatim (greedy), per analysed checkpoint",
                          [("training examples", train, pts("verbatim_train"), False),
                           ("held-out examples", held, pts("verbatim_heldout"), True)],
                          y_format=lambda v: f"{v:.0%}", plot_id="plot-memorisation")
    loss = line_chart("Loss per analysed checkpoint (the generalisation gap)",
                      [("training examples", train, pts("train_loss"), False),
                       ("held-out examples", held, pts("heldout_loss"), True)],
                      y_format=lambda v: f"{v:.3g}", plot_id="plot-analysis-loss", zero_based=False)
    return f'<div class="plots">{verbatim}{loss}</div>'


def job_fragment(status: dict[str, Any], name: str, history: list[dict],
                 analysis: list[dict] = ()) -> str | None:
    """A job's page: its settings and activity, loss / bytes / members / tokens per round, the
    memorisation curves of its analysed checkpoints (`analysis`: Store.analyses), and its
    rounds; None if the coordinator knows no such job."""
    job = next((j for j in status.get("jobs", []) if j["name"] == name), None)
    if job is None:
        return None
    now = status["generated_at"]
    spans = sorted({tuple(r["span"]) for r in history})
    colour = {s: SPAN_COLOURS[i % len(SPAN_COLOURS)] for i, s in enumerate(spans)}
    by_span = {s: [r for r in history if tuple(r["span"]) == s] for s in spans}
    label = (lambda s: f"span {s[0]}:{s[1]}")

    def series(key: Callable[[dict], float | None], suffix: str = "", dashed: bool = False):
        return [(label(s) + suffix, colour[s], [(r["round"], key(r)) for r in by_span[s] if key(r) is not None], dashed)
                for s in spans]

    loss_series = (series(lambda r: r.get("train_loss"), " train")
                   + series(lambda r: r.get("heldout_loss"), " held-out", dashed=True))
    if any(ps for _, _, ps, _ in loss_series):
        loss = line_chart("Loss per round", loss_series, y_format=lambda v: f"{v:.3g}", plot_id="plot-loss",
                          zero_based=False)
    else:
        loss = ('<figure class="placeholder" id="plot-loss"><figcaption>Loss per round</figcaption>'
                '<p>No loss reported for this job\'s rounds yet: <code>pollinate train --coordinator</code> '
                'reports its training and held-out loss at each evaluation (<code>--eval-every</code>); this '
                'plot draws them per round.</p></figure>')
    bytes_plot = line_chart(
        "Bytes members sent per round (dashed: the same exchange in fp32, estimated)",
        series(lambda r: r["bytes_sent"]) + series(
            lambda r: fp32_exchange_bytes(r["members"], r["state_bytes"]) + r["coordinator_bytes_sent"] or None,
            " in fp32 (est.)", dashed=True),
        y_format=fmt_bytes, plot_id="plot-bytes")
    members_plot = line_chart("Members per round", series(lambda r: r["members"]),
                              y_format=lambda v: f"{v:g}", plot_id="plot-members", integer=True)
    tokens_plot = line_chart("Tokens trained per round", series(lambda r: r["tokens"]),
                             y_format=fmt_num, plot_id="plot-tokens")
    plots = "".join(p for p in (loss, bytes_plot, members_plot, tokens_plot) if p) if history else \
        '<p class="muted">No round of this job has committed yet: the plots appear with the first.</p>'
    rounds = [row(round_cells(r, now), ' class="round"') for r in reversed(history[-ROUNDS_LISTED:])]
    return f"""
<h2>Job {e(name)}</h2>
<p>{e(job_summary(job["spec"]))} on <b>{e(job["base_model"] or status["model_id"])}</b>;
<span class="activity {e(job["activity"])}">{e(job["activity"])}</span>
(registered {ago(job["created_at"], now)}, last round formed {ago(job["updated_at"], now)}).
Rounds committed: {e(", ".join(f"{n} on span {s}" for s, n in job["rounds_committed"].items()) or "none")};
tokens {fmt_num(job["tokens"])}, {fmt_num(job["tokens_per_s"], "tokens/s")} over recent rounds;
{fmt_bytes(job["bytes_sent"])} sent by members in all.
JSON: <a href="/api/v1/jobs/{e(name)}">/api/v1/jobs/{e(name)}</a>.</p>
<div class="plots">{plots}</div>
{memorisation_plots(list(analysis))}
<h2>Rounds (newest first{f", the last {ROUNDS_LISTED}" if len(history) > ROUNDS_LISTED else ""})</h2>
{table(ROUND_HEADERS, rounds, "(no committed round)", cls="rounds")}
<p class="muted">Saving vs fp32: the group's ExchangeShard bytes against the same exchange in fp32
((n−1) × the committed fp32 state, which holds θ and the momentum); a group of one exchanges nothing.
The codec each round used is not recorded at the coordinator.</p>
"""


def node_fragment(status: dict[str, Any], member_id: str, info: dict | None = None) -> str | None:
    """A node's page: what the coordinator knows of a live member and what the node says of
    itself (`info`, its Info RPC: http_status.ask_node_info), or how it left; None if
    neither."""
    now = status["generated_at"]
    m = next((m for m in status["members"] if m["member_id"] == member_id), None)
    if m is None:
        d = next((d for d in status["departures"] if d["member_id"] == member_id), None)
        if d is None:
            return None
        return (f'<h2>Node {e(d["name"] or member_id)}</h2><p class="departure">Gone: {e(d["why"])} '
                f'{ago(d["at"], now)} ({utc(d["at"])}); it served blocks {span_text(d["span"])} at '
                f'{e(d["address"])}.</p>')
    age = m["heartbeat_age_s"]
    facts = [
        ("member id", e(m["member_id"])), ("name", e(m["name"] or "—")), ("address", e(m["address"])),
        ("state", health_cell(m)),
        ("last heartbeat", ago(m["last_heartbeat_at"], now) + (
            f' (stale after {status["stale_after_s"]:g} s, evicted after {status["lease_s"]:g} s)'
            if age is None or age > status["stale_after_s"] else "")),
        ("assigned blocks", span_text(m["span"]) + (" (pinned by --blocks)" if m["pinned"] else "")),
        ("serving blocks", span_text(m["serving_span"])), ("capacity", f'{m["capacity_blocks"]} blocks'),
        ("throughput", fmt_num(m["throughput"], "tok/s") + " (as it announced it)"),
        ("joined", ago(m["joined_at"], now)),
    ]
    if info is not None and "error" in info:
        facts.append(("asked now", f'<span class="state stale">no answer to Info ({e(info["error"])})</span>'))
    elif info is not None:
        facts += [("version", e(info["version"])), ("dtype", e(info["dtype"])), ("model", e(info["model_id"])),
                  ("measured throughput", fmt_num(info["throughput"], "tok/s")),
                  ("hosts blocks", span_text(info["span"]))]
    return (f'<h2>Node {e(m["name"] or member_id)}</h2>'
            + table(["", ""], [row([k, v], f' class="fact" data-fact="{e(k)}"') for k, v in facts], "", cls="facts")
            + '<p class="muted">Device, cache and load: nodes do not report them yet.</p>')


# ---- the page shell -----------------------------------------------------------------

_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,sans-serif;margin:0 auto;padding:0 1em 2em;max-width:1100px;color:#222;line-height:1.4}
header{display:flex;flex-wrap:wrap;gap:.3em 1em;align-items:baseline;padding:.6em 0;border-bottom:1px solid #ddd}
header a.home{font-weight:bold;font-size:1.2em;color:#222;text-decoration:none}
#updated{color:#555;font-size:.9em}
#banner{background:#fde8e8;border:1px solid #d33;color:#900;padding:.5em;margin:.5em 0}
body.stale-data main{opacity:.55;filter:grayscale(1)}
h2{font-size:1.1em;margin:1.2em 0 .3em}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.9em}td,th{padding:3px 8px;text-align:left;white-space:nowrap}
tr:nth-child(even){background:#f4f4f4}
.muted{color:#777}
.hole-text{color:#c22;font-weight:bold}.ok-text{color:#2e7d4f}
.join{background:#fff7e0;border:1px solid #e0a030;padding:.5em}
code{font-size:.9em;background:#f0f0f0;padding:0 .2em;word-break:break-all}
.state.online{color:#2e7d4f}.state.loading{color:#b07000}.state.stale{color:#c22;font-weight:bold}
tr.stale td{background:#f0f0f0;color:#777}
.activity.training{color:#2e7d4f}.activity.idle{color:#777}
svg{max-width:100%;height:auto;display:block}
svg text{font-size:11px;fill:#444}svg.plot text{font-size:13px}svg .count{font-size:10px;fill:#222}
svg .grid{stroke:#e4e4e4}svg rect.unserved{fill:#d33;opacity:.15}
.legend{font-size:.85em;color:#444;margin:.2em 0 .6em}.key{margin-right:1em;white-space:nowrap}
.key i{display:inline-block;width:.9em;height:.9em;margin-right:.3em;vertical-align:-.1em}
.key i.unserved-key{background:#d33;opacity:.3}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,460px),1fr));gap:1em}
figure{margin:0}figcaption{font-weight:bold;font-size:.95em}
figure.placeholder{border:1px dashed #bbb;padding:.5em;color:#666;margin-top:1em}
footer{margin-top:2em;font-size:.85em;color:#666}
"""

_JS = """
(function () {
  var live = document.getElementById('live'), updated = document.getElementById('updated'),
      banner = document.getElementById('banner');
  var refreshMs = REFRESH_MS, lastOk = Date.now(), failingSince = null, lastText = null;
  var skew = Date.now() / 1000 - Number(document.body.dataset.generatedAt);  // our clock - the coordinator's
  function age(s) {
    s = Math.max(0, s);
    if (s < 10) return s.toFixed(1) + ' s ago';
    if (s < 60) return Math.round(s) + ' s ago';
    if (s < 3600) return Math.round(s / 60) + ' min ago';
    if (s < 86400) return (s / 3600).toFixed(1) + ' h ago';
    return (s / 86400).toFixed(1) + ' days ago';
  }
  function timeless(html) {  // the fragment without its times (ages and their tooltips)
    return html === null ? null : html.replace(/<span class="ago"[^>]*>[^<]*<\/span>/g, '');
  }
  function tick() {
    var now = Date.now() / 1000 - skew;
    live.querySelectorAll('.ago[data-t]').forEach(function (el) { el.textContent = age(now - Number(el.dataset.t)); });
    var since = (Date.now() - lastOk) / 1000;
    updated.textContent = 'updated ' + age(since) + ' (' + new Date(lastOk).toLocaleTimeString() + ')';
    if (since * 1000 > 3 * refreshMs) document.body.classList.add('stale-data');
  }
  function fail(why) {
    if (failingSince === null) failingSince = new Date();
    banner.hidden = false;
    banner.textContent = 'The coordinator is not answering (' + why + ') since ' + failingSince.toLocaleTimeString() +
      '; the data below is from ' + new Date(lastOk).toLocaleTimeString() + ' and may be out of date.';
    document.body.classList.add('stale-data');
  }
  function refresh() {
    var url = location.pathname + '?fragment=1';
    fetch(url, {cache: 'no-store'}).then(function (r) {
      if (!r.ok && r.status !== 404) throw new Error('HTTP ' + r.status);  // 404: no such job (yet)
      var generated = Number(r.headers.get('X-Generated-At'));
      return r.text().then(function (text) {
        if (generated) skew = Date.now() / 1000 - generated;
        if (timeless(text) === timeless(lastText)) {
          // only times moved (a heartbeat): update them in place, so a tooltip stays open
          var fresh = document.createElement('div');
          fresh.innerHTML = text;
          var olds = live.querySelectorAll('.ago'), news = fresh.querySelectorAll('.ago');
          for (var i = 0; i < olds.length && i < news.length; i++) {
            olds[i].dataset.t = news[i].dataset.t;
            olds[i].title = news[i].title;
          }
        } else {  // swap; the open <details> stay open
          var open = Array.prototype.map.call(live.querySelectorAll('details[open][id]'), function (d) { return d.id; });
          live.innerHTML = text;
          open.forEach(function (id) { var d = document.getElementById(id); if (d) d.open = true; });
        }
        lastText = text;
        lastOk = Date.now(); failingSince = null; banner.hidden = true;
        updated.dataset.fetches = String(Number(updated.dataset.fetches || 0) + 1);  // answered fetches
        document.body.classList.remove('stale-data');
        tick();
      });
    }).catch(function (err) { fail(err.message || String(err)); tick(); });
  }
  setInterval(refresh, refreshMs);
  setInterval(tick, 1000);
  refresh();
})();
"""


def page(title: str, fragment: str, status: dict[str, Any]) -> str:
    """The whole document: header with "updated" (kept by the script), an alert banner for a
    coordinator that stops answering, the fragment in <main id=live>."""
    now = status["generated_at"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title><style>{_CSS}</style></head>
<body data-generated-at="{now!r}">
<header><a class="home" href="/">Pollinate swarm</a><span>{e(status["model_id"])}</span>
<span id="updated" title="when this page last heard from the coordinator">as of {utc(now)}
(live updates need JavaScript)</span></header>
<div id="banner" role="alert" hidden></div>
<main id="live">{fragment}</main>
<footer>JSON: <a href="/api/v1/status">/api/v1/status</a> · metrics: <a href="/metrics">/metrics</a> ·
a node is stale after {STALE_AFTER_BEATS:g} missed heartbeats.</footer>
<script>{_JS.replace("REFRESH_MS", str(int(REFRESH_S * 1000)))}</script>
</body></html>
"""


def render_html(status: dict[str, Any]) -> str:
    """The swarm's page (/)."""
    return page("Pollinate swarm", overview_fragment(status), status)


def job_json(status: dict[str, Any], name: str, history: list[dict], analysis: list[dict] = ()) -> str | None:
    job = next((j for j in status.get("jobs", []) if j["name"] == name), None)
    return None if job is None else json.dumps({"job": job, "rounds": history, "analysis": list(analysis)}, indent=1)
