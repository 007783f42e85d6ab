"""The status page in a real browser (issue 15): headless Chromium opens the page of a
running coordinator whose job committed three DiLoCo rounds through two real nodes, and the
test reads the DOM after the page's scripts ran. Then, with the page left open (no reload),
a node is SIGKILLed: its row and its coverage cells turn stale. Then the coordinator goes
down: the page says so and greys the data it still shows. And on a phone-sized viewport
nothing overflows the screen."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from browser import Browser
from procs import ProcGroup

CLIENT = str(Path(__file__).with_name("rounds_client.py"))
TOKEN = "page-token"
HEARTBEAT_S = 1.0  # stale after 2.5 s: a slow beat on a busy test machine is not a dead node
LEASE_S = 60.0  # long: a killed node stays a stale member (not evicted) while the page is read
# the page's script fetched its fragment and swapped it in (it counts the fetches answered)
FETCHED = "Number(document.getElementById('updated').dataset.fetches) >= 1"


def http_json(address: str, path: str) -> dict:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as r:
        return json.loads(r.read())


def test_page_draws_rounds_marks_a_killed_node_stale_and_a_dead_coordinator(
        tmp_path, tiny_model_dir, tiny_model_files, tiny_cache_dir):
    with Browser.start(log=tmp_path / "chromium.log") as browser, ProcGroup(tmp_path) as group:
        (tmp_path / "token").write_text(TOKEN + "\n")
        coord = group.start("coordinator", [
            "coordinator", "--data-dir", str(tmp_path / "coord-data"), "--port", "0", "--http-port", "0",
            "--token-file", str(tmp_path / "token"), "--model", str(tiny_model_dir), "--num-blocks", "4",
            "--heartbeat-period", str(HEARTBEAT_S), "--lease", str(LEASE_S), "--round-window", "20",
        ])
        group.wait_ready([coord], timeout=60)
        nodes = [group.start(f"node-{i}", [
            "node", "--coordinator", coord.info["grpc"], "--token-file", str(tmp_path / "token"),
            "--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir), "--blocks", "0:4",
            "--throughput", "10", "--torch-threads", "1",
        ]) for i in range(2)]
        group.wait_ready(nodes, timeout=120)
        done = subprocess.run(
            [sys.executable, CLIENT, "--coordinator", coord.info["grpc"], "--token", TOKEN,
             "--nodes", ",".join(n.info["address"] for n in nodes), "--steps", "9", "--round-steps", "3",
             "--no-overlap", "--expect-round", "3"],
            capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:] + group.dump_logs()
        http = coord.info["http"]
        members = {m["address"]: m for m in http_json(http, "/api/v1/status")["members"]}
        victim = members[nodes[1].info["address"]]["member_id"]
        survivor = members[nodes[0].info["address"]]["member_id"]

        # the job's page: the script fetched its fragment (#updated is the script's), the plots drew
        job = browser.open(f"http://{http}/jobs/rounds")
        job.wait_for(FETCHED, timeout=20)
        for plot in ("plot-bytes", "plot-members", "plot-tokens"):
            points = job.eval(f"Array.from(document.querySelectorAll('#{plot} polyline'), p => p.dataset.points)")
            assert points and points[0] == "3", (plot, points)  # one point per committed round
            box = job.eval(f"(r => [r.width, r.height])(document.getElementById('{plot}').getBoundingClientRect())")
            assert box[0] > 200 and box[1] > 50, (plot, box)  # laid out, visible
        assert job.eval("document.querySelectorAll('tr.round').length") == 3
        assert "No loss reported" in job.eval("document.getElementById('plot-loss').innerText")
        job.screenshot(tmp_path / "job.png")

        # the swarm's page, left open from here on
        page = browser.open(f"http://{http}/")
        page.wait_for(FETCHED, timeout=20)
        page.eval("window.loadedOnce = true")  # gone if the page reloads
        row = (lambda mid: f"document.querySelector('tr[data-member=\"{mid}\"]').className")
        assert page.eval(row(victim)) == "member online" and page.eval(row(survivor)) == "member online"
        assert page.eval("document.querySelectorAll('svg.coverage rect.cell.online').length") == 8
        assert "Every block is served" in page.eval("document.getElementById('live').innerText")
        # a heartbeat moves only a time: updated in place, the table is the same element
        page.eval("document.querySelector('table.nodes').dataset.kept = '1'")
        beat = (f"document.querySelector('tr[data-member=\"{survivor}\"] .ago').dataset.t")
        first_beat = page.eval(beat)
        page.wait_for(f"{beat} !== '{first_beat}'", timeout=10)
        assert page.eval("document.querySelector('table.nodes').dataset.kept") == "1"

        # a node's page: what the coordinator knows, and what the node says (its Info RPC)
        node = browser.open(f"http://{http}/nodes/{survivor}")
        node.wait_for(FETCHED, timeout=20)
        fact = (lambda k: node.eval(f"document.querySelector('tr[data-fact=\"{k}\"] td:last-child').innerText"))
        assert fact("dtype") == "float32" and fact("version") == http_json(http, "/api/v1/status")["version"]
        assert fact("address") == nodes[0].info["address"]

        nodes[1].kill()  # SIGKILL: no Leave, its lease runs on
        killed_at = time.monotonic()
        page.wait_for(f"{row(victim)} === 'member stale'", timeout=15)
        stale_after = time.monotonic() - killed_at
        assert page.eval("window.loadedOnce === true")  # updated in place, not reloaded
        assert page.eval(row(survivor)) == "member online"
        assert page.eval("document.querySelectorAll('svg.coverage rect.cell.stale').length") == 4
        assert page.eval("document.querySelectorAll('svg.coverage rect.cell.online').length") == 4
        assert any(m["member_id"] == victim for m in http_json(http, "/api/v1/status")["members"])  # not evicted
        assert stale_after < LEASE_S
        page.screenshot(tmp_path / "stale.png")

        # the phone: nothing wider than the screen (tables scroll inside their boxes)
        phone = browser.open(f"http://{http}/", width=390, height=844)
        phone.wait_for(FETCHED, timeout=20)
        assert phone.eval("document.documentElement.scrollWidth") <= 390
        phone.screenshot(tmp_path / "phone.png")

        coord.stop()  # the coordinator goes down under the open page
        page.wait_for("!document.getElementById('banner').hidden", timeout=15)
        assert "not answering" in page.eval("document.getElementById('banner').innerText")
        assert page.eval("document.body.classList.contains('stale-data')")
        assert page.eval(row(victim)) == "member stale"  # the last data stays, marked out of date
