"""The status page and /metrics (issue 15), from a real Membership, Store and Rounds: rounds
committed through Rounds.begin/commit feed the history the job page plots; loading and
stale members do not count as served; an evicted node is listed; /metrics parses with
prometheus_client's own parser without precision loss; HEAD has no body."""

from __future__ import annotations

import asyncio
import re

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from pollinate.compression.outer import state_checksum, state_to_bytes
from pollinate.coordinator.config import MembershipConfig, RoundsConfig, StoreConfig
from pollinate.coordinator.http_status import HttpStatusServer, ask_node_info
from pollinate.coordinator.membership import JoinParams, Membership
from pollinate.coordinator.rounds import Rounds
from pollinate.coordinator.status import (
    block_ranges,
    exchange_saving,
    job_activity,
    prom_labels,
    render_metrics,
    snapshot,
    span_runs,
)
from pollinate.coordinator.status_page import job_fragment, node_fragment, render_html
from pollinate.coordinator.store import JobRecord, Store
from pollinate.protocol.shared import Span

SPAN = Span(0, 4)
T0 = 1_000_000.0  # wall clock of the fake swarm, unix s


class Clock:
    """Wall and monotonic time the test moves by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def mono(self) -> float:
        return self.t

    def wall(self) -> float:
        return T0 + self.t


def swarm(tmp_path, clock: Clock) -> tuple[Membership, Store, list[str]]:
    """8 blocks; a and b pinned to 0:4 and serving it, c assigned 5:7 and still loading."""
    store = Store(StoreConfig(data_dir=tmp_path)).open()
    m = Membership(MembershipConfig(num_blocks=8, heartbeat_period_s=1.0, lease_s=5.0), store,
                   clock=clock.mono, wall_clock=clock.wall)
    m.restore()
    ids = []
    for i, (name, span) in enumerate((("alpha", SPAN), ("beta", SPAN), ("gamma", Span(5, 7)))):
        ids.append(m.join(JoinParams(address=f"10.0.0.{i + 1}:7000", model_id="", capacity=span.length,
                                     throughput=4.0 + i, name=name, requested_span=span)).member_id)
    m.heartbeat(ids[0], SPAN)
    m.heartbeat(ids[1], SPAN)
    return m, store, ids


def commit_rounds(store: Store, m: Membership, ids: list[str], n: int, first: int = 1) -> None:
    """Rounds first..n of job 'sst2' span 0:4 by a and b through Rounds, each member reporting
    its ExchangeShard and BeginRound bytes; a sends the whole state with its commit."""
    rounds = Rounds(RoundsConfig(window_s=5.0, commit_timeout_s=5.0), store, m)
    theta = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    momentum = torch.zeros(1000)

    async def run() -> None:
        for r in range(first, n + 1):
            await asyncio.gather(rounds.begin("sst2", SPAN, r, ids[0], 100 * r),
                                 rounds.begin("sst2", SPAN, r, ids[1], 50))
            theta.add_(0.01)
            checksum = state_checksum(theta, momentum)
            out = await asyncio.gather(
                rounds.commit("sst2", SPAN, r, ids[0], checksum, state_to_bytes(theta, momentum),
                              bytes_sent=1000 * r, bytes_received=900, coordinator_bytes_sent=10),
                rounds.commit("sst2", SPAN, r, ids[1], checksum, bytes_sent=700, bytes_received=800,
                              coordinator_bytes_sent=20))
            assert all(o.committed for o in out), out

    asyncio.run(run())


def status_of(m: Membership, store: Store, **kw) -> dict:
    jobs = [JobRecord(name=j.name, base_model=j.base_model, spec=j.spec, state=j.state,
                      created_at=j.created_at, updated_at=j.updated_at) for j in store.load_jobs()]
    return snapshot(m, dht_initial_peers=[], started_at=T0 - 10, version="0.1.0", jobs=jobs,
                    rounds=store.last_committed_rounds(), history=store.round_history(),
                    totals=store.round_totals(), latest=store.round_history(latest_only=True),
                    coordinator_address="203.0.113.5:7070", **kw)


def test_round_history_sums_each_rounds_members_tokens_and_bytes(tmp_path):
    clock = Clock()
    m, store, ids = swarm(tmp_path, clock)
    commit_rounds(store, m, ids, 3)
    history = store.round_history("sst2")
    assert [r["round"] for r in history] == [1, 2, 3]  # oldest first
    assert [r["tokens"] for r in history] == [150, 250, 350]
    assert [r["members"] for r in history] == [2, 2, 2]
    assert [r["committed_members"] for r in history] == [2, 2, 2]
    # ExchangeShard + BeginRound as reported, plus the CommitRound requests Rounds counted (0 here)
    assert [r["bytes_sent"] for r in history] == [1730, 2730, 3730]
    assert [r["coordinator_bytes_sent"] for r in history] == [30, 30, 30]
    assert all(r["state_bytes"] > 8000 for r in history)  # θ and momentum, 1000 fp32 each
    assert store.round_history("sst2", limit=2)[0]["round"] == 2
    assert [r["round"] for r in store.round_history(latest_only=True)] == [3]
    assert store.round_history("other") == []
    (total,) = store.round_totals()
    assert total == {"job": "sst2", "span": [0, 4], "rounds": 3, "last_round": 3,
                     "last_committed_at": history[-1]["committed_at"], "tokens": 750,
                     "bytes_sent": 1730 + 2730 + 3730, "bytes_received": 3 * 1700,
                     "checkpoints_kept": 3, "checkpoint_bytes": sum(r["state_bytes"] for r in history)}
    commit_rounds(store, m, ids, 4, first=4)  # round_totals() is kept until the next write
    assert store.round_totals()[0]["rounds"] == 4 and store.round_totals()[0]["tokens"] == 750 + 450
    # fp32 reference: (n-1) x the state; the group's exchange is bytes_sent less the coordinator's
    assert exchange_saving(history[0]) == pytest.approx(history[0]["state_bytes"] / 1700)


def test_loading_and_stale_members_do_not_count_as_served_and_an_eviction_is_listed(tmp_path):
    clock = Clock()
    m, store, ids = swarm(tmp_path, clock)
    s = status_of(m, store)
    assert [x["health"] for x in s["members"]] == ["online", "online", "loading"]
    assert s["holes"] == [4, 7]  # assigned to nobody
    assert s["unserved"] == [4, 5, 6, 7]  # gamma is loading 5:7: not served
    page = render_html(s)
    assert "Every block is served" not in page
    assert "Not served now: blocks 4–7 (4 of 8)" in page
    assert "--blocks 4:8" in page and "203.0.113.5:7070" in page  # how to join
    # alpha and beta go silent (SIGKILL); gamma keeps beating. 2.6 s: past 2.5 periods, inside the lease
    clock.t = 2.6
    m.heartbeat(ids[2], Span(5, 7))
    s = status_of(m, store)
    assert [x["health"] for x in s["members"]] == ["stale", "stale", "online"]
    assert [x["state"] for x in s["members"]] == ["online", "online", "online"]  # membership's view
    assert s["unserved"] == [0, 1, 2, 3, 4, 7]
    page = render_html(s)
    assert len(re.findall(r'<tr class="member stale"', page)) == 2
    assert page.count('class="cell stale"') == 8 and page.count('class="cell online"') == 2
    assert "0–4, 7" in page
    # the lease runs out: evicted, and listed with why, also on the node's own page
    clock.t = 5.5
    assert sorted(m.evict_expired()) == sorted(ids[:2])
    s = status_of(m, store)
    assert sorted(d["member_id"] for d in s["departures"]) == sorted(ids[:2])
    assert s["departures"][0]["why"] == "missed their lease (5 s)"
    assert "Left or evicted" in render_html(s) and "alpha" in render_html(s)
    assert "Gone: missed their lease" in node_fragment(s, ids[0])
    assert node_fragment(s, "nobody") is None
    assert "gamma" in node_fragment(s, ids[2])
    assert "no answer to Info (UNAVAILABLE)" in node_fragment(s, ids[2], {"error": "UNAVAILABLE"})


def test_a_node_that_does_not_answer_info_is_said_so():
    info = asyncio.run(ask_node_info("127.0.0.1:1", token=None, timeout_s=2.0))  # nothing listens on port 1
    assert set(info) == {"error"} and info["error"] in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def test_page_is_readable_on_a_phone_and_updates_without_reloading(tmp_path):
    clock = Clock()
    m, store, _ = swarm(tmp_path, clock)
    page = render_html(status_of(m, store))
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert 'http-equiv="refresh"' not in page  # no full reload that dismisses tooltips
    assert "?fragment=1" in page and 'id="updated"' in page and 'id="banner"' in page


def test_job_page_plots_bytes_members_and_tokens_per_round_and_loss_once_reported(tmp_path):
    clock = Clock()
    m, store, ids = swarm(tmp_path, clock)
    commit_rounds(store, m, ids, 3)
    s = status_of(m, store)
    (job,) = s["jobs"]
    assert job["activity"] == "training" and job["rounds_committed"] == {"0:4": 3} and job["tokens"] == 750
    history = store.round_history("sst2")
    frag = job_fragment(s, "sst2", history)
    for plot in ("plot-bytes", "plot-members", "plot-tokens"):
        svg = re.search(rf'<svg class="plot" id="{plot}".*?</svg>', frag, re.S).group(0)
        assert 'data-points="3"' in svg, plot
    assert 'id="plot-loss"' in frag and "No loss reported" in frag  # the place for the loss
    assert frag.count('<tr class="round">') == 3
    assert job_fragment(s, "nope", []) is None
    # once rounds carry a loss (issue 15's per-round eval), the same page draws it
    with_loss = [dict(r, train_loss=2.0 - 0.1 * r["round"], heldout_loss=2.1 - 0.05 * r["round"]) for r in history]
    frag = job_fragment(s, "sst2", with_loss)
    svg = re.search(r'<svg class="plot" id="plot-loss".*?</svg>', frag, re.S).group(0)
    assert svg.count('data-points="3"') == 2 and "held-out" in svg
    # the memorisation curves: a placeholder until `pollinate analyze` stored results, then drawn
    assert 'class="placeholder" id="plot-memorisation"' in frag and "pollinate analyze" in frag
    from pollinate.coordinator.jobs import Jobs

    rows = [{"round": r, "train_loss": 2.0 / r, "heldout_loss": 2.5, "verbatim_train": 0.2 * r,
             "verbatim_heldout": 0.0, "train_examples": 5, "heldout_examples": 2} for r in (1, 2, 3)]
    Jobs(store, base_model="m").report_analysis("sst2", rows, data_sha256="ab" * 32)
    frag = job_fragment(s, "sst2", history, store.analyses("sst2"))
    for plot in ("plot-memorisation", "plot-analysis-loss"):
        svg = re.search(rf'<svg class="plot" id="{plot}".*?</svg>', frag, re.S).group(0)
        assert svg.count('data-points="3"') == 2 and "held-out examples" in svg, plot
    assert "60%" in re.search(r'<svg class="plot" id="plot-memorisation".*?</svg>', frag, re.S).group(0)


def test_job_turns_idle_when_rounds_stop():
    recent = [{"committed_at": t, "span": [0, 4], "tokens": 10} for t in (0.0, 100.0, 200.0)]
    # rounds every 100 s: idle once none formed for 3 x 100 s
    assert job_activity("training", 200.0, recent, now=499.0) == "training"
    assert job_activity("training", 200.0, recent, now=501.0) == "idle"
    assert job_activity("training", 200.0, [], now=200.0 + 121) == "idle"  # the 120 s floor
    assert job_activity("created", 0.0, [], now=1e9) == "created"


def test_holes_read_as_ranges():
    assert block_ranges(list(range(15, 30))) == "15–29"
    assert block_ranges([3, 4, 5, 9]) == "3–5, 9" and block_ranges([]) == ""
    assert span_runs([3, 4, 5, 9]) == [(3, 6), (9, 10)]


def test_metrics_parse_with_prometheus_client_and_keep_every_digit(tmp_path):
    clock = Clock()
    m, store, ids = swarm(tmp_path, clock)
    commit_rounds(store, m, ids, 2)
    m.counters["heartbeats"] = 12345678  # `{:g}` printed 1.23457e+07
    families = {f.name: f for f in text_string_to_metric_families(render_metrics(status_of(m, store), now=T0))}
    samples = [s for f in families.values() for s in f.samples]  # counters: family name without _total
    value = (lambda name, **labels: next(s.value for s in samples if s.name == name and s.labels == labels))
    assert value("pollinate_coordinator_heartbeats_total") == 12345678
    assert families["pollinate_coordinator_heartbeats"].type == "counter"
    assert value("pollinate_coordinator_members", state="online") == 2
    assert value("pollinate_coordinator_members", state="loading") == 1
    assert value("pollinate_coordinator_unserved_blocks") == 4
    assert value("pollinate_coordinator_block_serving_replicas", block="0") == 2
    assert value("pollinate_coordinator_block_throughput", block="0") == 9.0
    assert value("pollinate_coordinator_start_time_seconds") == T0 - 10
    assert value("pollinate_job_info", job="sst2", method="", activity="training") == 1
    assert value("pollinate_job_rounds_committed_total", job="sst2", span="0:4") == 2
    assert value("pollinate_job_tokens_total", job="sst2", span="0:4") == 400
    assert value("pollinate_job_round_bytes_total", job="sst2", span="0:4", direction="sent") == 1730 + 2730
    assert value("pollinate_round_last", job="sst2", span="0:4") == 2
    assert value("pollinate_round_last_members", job="sst2", span="0:4") == 2
    assert value("pollinate_round_last_bytes", job="sst2", span="0:4", direction="received") == 1700
    assert not families["pollinate_round_last_loss"].samples  # none reported yet
    state_bytes = store.job_rounds("sst2")[0]["state_bytes"]
    assert value("pollinate_job_checkpoints_kept", job="sst2", span="0:4") == 2
    assert value("pollinate_job_checkpoint_bytes", job="sst2", span="0:4") == 2 * state_bytes
    # retention prunes round 1 (keep the last only, nothing scheduled): the gauges follow
    from pollinate.coordinator.checkpoints import Checkpoints
    from pollinate.coordinator.jobs import Jobs

    Jobs(store, base_model="m").create("sst2", {"method": "lora", "rank": 4, "alpha": 8.0, "lr": 0.01, "micro_batches": 1,
                                                "keep_last": 1, "keep_log_spaced": False, "keep_every": 0})
    Checkpoints(store).apply()
    families = {f.name: f for f in text_string_to_metric_families(render_metrics(status_of(m, store), now=T0))}
    samples = [s for f in families.values() for s in f.samples]
    assert value("pollinate_job_checkpoints_kept", job="sst2", span="0:4") == 1
    assert value("pollinate_job_checkpoint_bytes", job="sst2", span="0:4") == state_bytes
    assert value("pollinate_job_rounds_committed_total", job="sst2", span="0:4") == 2  # the record keeps both


def test_metric_labels_and_values_survive_the_parser():
    labels = prom_labels(job='a"b\\c', name="line\nbreak")
    text = "# TYPE x gauge\nx" + labels + " 1\n# TYPE y gauge\ny 0.1\n"
    (x, y) = text_string_to_metric_families(text)
    assert x.samples[0].labels == {"job": 'a"b\\c', "name": "line\nbreak"}
    from pollinate.coordinator.status import prom_value
    for v in (0.1, 1e-300, 2 ** 53 + 1, 123456789.125, float("inf")):
        (f,) = text_string_to_metric_families(f"# TYPE z gauge\nz {prom_value(v)}\n")
        assert f.samples[0].value == v


def test_http_routes_head_has_no_body(tmp_path):
    clock = Clock()
    m, store, ids = swarm(tmp_path, clock)
    commit_rounds(store, m, ids, 1)

    async def request(address: str, line: str) -> tuple[str, bytes]:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"{line} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return head.decode(), body

    async def run() -> None:
        server = HttpStatusServer("127.0.0.1", 0, lambda: status_of(m, store),
                                  history=lambda job: store.round_history(job))
        address = await server.start()
        try:
            head, body = await request(address, "GET /metrics")
            length = int(re.search(r"Content-Length: (\d+)", head).group(1))
            assert head.startswith("HTTP/1.1 200") and len(body) == length > 0
            head, body = await request(address, "HEAD /metrics")
            # the length a GET would have now (uptime moves between the two requests: not equal)
            head_length = int(re.search(r"Content-Length: (\d+)", head).group(1))
            assert head.startswith("HTTP/1.1 200") and abs(head_length - length) < 16 and body == b""
            head, body = await request(address, "HEAD /")
            assert head.startswith("HTTP/1.1 200") and body == b""
            head, body = await request(address, "GET /jobs/sst2")
            assert head.startswith("HTTP/1.1 200") and b"<!doctype html>" in body and b'id="plot-bytes"' in body
            head, body = await request(address, "GET /jobs/sst2?fragment=1")
            assert b"<!doctype html>" not in body and b'id="plot-bytes"' in body
            assert re.search(r"X-Generated-At: [\d.]+", head)
            head, body = await request(address, f"GET /nodes/{ids[0]}")
            assert head.startswith("HTTP/1.1 200") and b"alpha" in body
            head, _ = await request(address, "GET /jobs/nope")
            assert head.startswith("HTTP/1.1 404")
            head, body = await request(address, "GET /api/v1/jobs/sst2")
            assert head.startswith("HTTP/1.1 200") and b'"rounds"' in body
            head, _ = await request(address, "POST /")
            assert head.startswith("HTTP/1.1 405")
        finally:
            await server.stop()

    asyncio.run(run())
