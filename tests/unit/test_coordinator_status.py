"""Status renderings: the `pollinate status` table, the HTML page and Prometheus metrics,
all from one snapshot of a Membership."""

from __future__ import annotations

from pollinate.client.cli_status import format_status
from pollinate.coordinator.config import MembershipConfig, StoreConfig
from pollinate.coordinator.membership import JoinParams, Membership
from pollinate.coordinator.service import status_to_proto
from pollinate.coordinator.status import render_metrics, snapshot
from pollinate.coordinator.status_page import render_html
from pollinate.coordinator.store import Store
from pollinate.protocol.shared import Span


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
    assert "data plane: plaintext" in text
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


def test_heartbeat_load_reaches_the_status_table(tmp_path):
    """A node's batch sizes and queue waits (node/batching.py) ride on its heartbeat through the
    coordinator's service into `pollinate status`; a node that sent none shows dashes."""
    from pollinate.coordinator.service import CoordinatorServicer
    from pollinate.node.batching import BatchStats
    from pollinate.protocol.v1 import common_pb2, coordinator_pb2

    m = Membership(MembershipConfig(num_blocks=8), Store(StoreConfig(data_dir=tmp_path)).open(),
                   wall_clock=lambda: 1000.0)
    m.restore()
    a = m.join(JoinParams(address="10.0.0.1:7000", model_id="", capacity=8, throughput=4.0))
    stats = BatchStats(passes=40, steps=250, max_sessions=8)
    stats.recent_sizes.extend([8, 7, 5])
    stats.step_waits.extend([0.004, 0.012, 0.030])
    load = stats.to_proto()
    assert (load.passes, load.max_sessions, round(load.mean_sessions, 2)) == (40, 8, 6.67)
    service = CoordinatorServicer.__new__(CoordinatorServicer)  # only its heartbeat path
    service.membership, service.rounds = m, None
    service._heartbeat(coordinator_pb2.HeartbeatRequest(
        member_id=a.member_id, serving_span=common_pb2.Span(start=0, end=8), load=load))
    b = m.join(JoinParams(address="10.0.0.2:7000", model_id="", capacity=8, throughput=4.0))
    s = snapshot(m, dht_initial_peers=[], started_at=990.0, version="0.1.0")
    assert [x["load"] and x["load"]["steps"] for x in s["members"]] == [250, None]
    text = format_status(status_to_proto(s), now=1001.0)
    row_a = next(line for line in text.splitlines() if "10.0.0.1:7000" in line)
    row_b = next(line for line in text.splitlines() if "10.0.0.2:7000" in line)
    assert "6.7/8" in row_a and "12/30 ms" in row_a
    assert row_b.split()[-3:-1] == ["-", "-"]  # batch columns, then QUANT
    assert b.member_id in row_b
