"""Status renderings: the `pollinate status` table, the HTML page and Prometheus metrics,
all from one snapshot of a Membership."""

from __future__ import annotations

from pollinate.client.cli_status import format_status
from pollinate.coordinator.config import MembershipConfig, StoreConfig
from pollinate.coordinator.membership import JoinParams, Membership
from pollinate.coordinator.placement import Span
from pollinate.coordinator.service import status_to_proto
from pollinate.coordinator.status import render_metrics, snapshot
from pollinate.coordinator.status_page import render_html
from pollinate.coordinator.store import Store


def swarm(tmp_path) -> dict:
    m = Membership(MembershipConfig(num_blocks=8), Store(StoreConfig(data_dir=tmp_path)).open(),
                   wall_clock=lambda: 1000.0)
    m.restore()
    a = m.join(JoinParams(address="10.0.0.1:7000", model_id="", capacity=3, throughput=4.0,
                          name="alpha"))
    m.join(JoinParams(address="10.0.0.2:7000", model_id="", capacity=2, throughput=2.0,
                      requested_span=Span(5, 7), quant="int4"))
    m.heartbeat(a.member_id, Span(0, 3))
    return snapshot(m, dht_initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/Qm"], started_at=990.0,
                    version="0.1.0")


def test_snapshot_lists_members_blocks_and_holes(tmp_path):
    s = swarm(tmp_path)
    assert s["epoch"] == 2 and s["holes"] == [3, 4, 7]
    assert [m["span"] for m in s["members"]] == [[0, 3], [5, 7]]
    assert [m["state"] for m in s["members"]] == ["online", "loading"]
    assert [m["quant"] for m in s["members"]] == ["none", "int4"]
    assert [b["throughput"] for b in s["blocks"]] == [4.0, 4.0, 4.0, 0.0, 0.0, 2.0, 2.0, 0.0]


def test_cli_table_shows_nodes_coverage_and_highlights_holes(tmp_path):
    text = format_status(status_to_proto(swarm(tmp_path)), now=1002.5)
    assert "epoch 2, 2 nodes" in text
    assert "10.0.0.1:7000" in text and "0:3" in text and "2.5s ago" in text
    assert "loading pinned" in text
    rows = {line.split()[1]: line.split() for line in text.splitlines() if "10.0.0." in line}
    assert "QUANT" in text and rows["10.0.0.1:7000"][-1] == "none" and rows["10.0.0.2:7000"][-1] == "int4"
    hole_lines = [line for line in text.splitlines() if line.endswith("<- HOLE")]
    assert [int(line.split()[0]) for line in hole_lines] == [3, 4, 7]
    assert "3 blocks have no replica: 3, 4, 7" in text
    assert "\033[" not in text  # no colour unless asked for
    assert "\033[1;31m" in format_status(status_to_proto(swarm(tmp_path / "b")), now=0, color=True)


def test_html_draws_a_cell_per_replica_and_metrics_parse(tmp_path):
    s = swarm(tmp_path)
    page = render_html(s)
    # one cell per (member, block) assigned, coloured by health; a band on each block not served
    assert page.count('class="cell online"') == 3 and page.count('class="cell loading"') == 2
    assert page.count('<rect class="unserved"') == 5  # 3, 4, 7 have nobody; 5, 6 are loading
    assert "alpha" in page
    metrics = render_metrics(s)
    samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if not line.startswith("#"))
    assert samples["pollinate_coordinator_epoch"] == "2"
    assert samples["pollinate_coordinator_holes"] == "3"
    assert samples['pollinate_coordinator_members{state="online"}'] == "1"
    assert samples['pollinate_coordinator_block_throughput{block="0"}'] == "4.0"
    assert samples["pollinate_coordinator_joins_total"] == "2"
