"""A swarm across "machines": every process in its own network namespace with its own
address (benchmarks/netlab.py), links capped by tc tbf. Skipped without root, `ip` or `tc`.

- the lab itself: a capped link carries bytes at about its rate, the counters see them, and
  nothing outside the lab can be reached; a lab goes with its namespaces and processes on
  SIGTERM, and one whose owner was SIGKILLed is removed by the next lab's stale cleanup;
- the coordinator's Join check (coordinator/address_check.py) with real processes: a node on
  another machine announcing loopback, or an address the coordinator cannot dial back, is
  refused with one line that says what to change (exit code 1, no traceback);
- a coordinator bound to 0.0.0.0 and nodes given only its address (one node without --host:
  it binds 0.0.0.0 and announces the interface that reaches the coordinator) serve the local
  model's greedy tokens and train a job whose DiLoCo rounds commit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import netlab  # noqa: E402

pytestmark = pytest.mark.skipif(netlab.unavailable() is not None, reason=str(netlab.unavailable()))

TOKEN = "netlab-token"
PROMPT = [1, 5, 9, 33, 70, 12, 8]
NEW_TOKENS = 6
CLIENT = str(Path(__file__).with_name("lab_client.py"))
FAKE_NODE = str(Path(__file__).with_name("coordinator_fake_node.py"))
COORD_PORT = 7070

SINK = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 9000)); s.listen(); print("ready", flush=True)
c, _ = s.accept(); n = 0
while True:
    d = c.recv(1 << 20)
    if not d: break
    n += len(d)
print(n, flush=True)
"""
SEND = ("import socket, sys; s = socket.create_connection((sys.argv[1], 9000)); "
        "s.sendall(b'x' * int(sys.argv[2])); s.close()")


def test_a_capped_link_carries_its_rate_and_the_counters_see_it(tmp_path):
    size = 3 << 20  # 3 MiB: 1.26 s at 20 Mbit/s
    with netlab.NetLab(tmp_path, rate_mbit=20) as lab:
        a, b = lab.add_host("a"), lab.add_host("b")
        assert "rate 20Mbit" in lab.qdisc(a)
        sink = subprocess.Popen(["ip", "netns", "exec", b.ns, sys.executable, "-c", SINK, b.ip],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert sink.stdout.readline().strip() == "ready"
            before = lab.counters()
            t0 = time.perf_counter()
            lab.exec(a, [sys.executable, "-c", SEND, b.ip, str(size)], check=True, timeout=60)
            received = int(sink.stdout.readline())
            seconds = time.perf_counter() - t0
        finally:
            sink.kill()
            sink.wait()
        after = lab.counters()
        # Nothing outside the lab: no default route in a host namespace.
        outside = lab.exec(a, [sys.executable, "-c", SEND, "192.0.2.1", "1"], capture_output=True, text=True)
        namespaces = [ns for ns in netlab.list_namespaces() if ns.startswith(lab.lab_id)]
    assert received == size
    mbit = size * 8 / seconds / 1e6
    assert 14 < mbit < 21, mbit  # the cap holds (TCP start-up and the python start cost the rest)
    sent = after["a"][1] - before["a"][1]
    assert size <= sent < size * 1.1, sent  # payload plus TCP/IP headers, counted by the kernel
    assert after["b"][0] - before["b"][0] >= size
    assert outside.returncode != 0 and "unreachable" in outside.stderr.lower(), outside.stderr
    assert len(namespaces) == 3  # the bridge and two hosts, all gone after the lab:
    assert not [ns for ns in netlab.list_namespaces() if ns.startswith(lab.lab_id)]


def _coordinator(lab, host, tmp_path, *extra: str):
    (tmp_path / "token").write_text(TOKEN + "\n")
    return lab.start(host, "coordinator", [
        "coordinator", "--data-dir", str(tmp_path / "coord-data"), "--host", "0.0.0.0",
        "--port", str(COORD_PORT), "--http-port", "7071", "--token-file", str(tmp_path / "token"),
        "--heartbeat-period", "0.5", "--lease", "10", *extra])


def test_join_refuses_loopback_and_undialable_addresses_from_another_machine(tmp_path, tiny_model_dir,
                                                                              tiny_model_files, tiny_cache_dir):
    with netlab.NetLab(tmp_path) as lab:
        ch, nh = lab.add_host("coord"), lab.add_host("node")
        coord = _coordinator(lab, ch, tmp_path, "--model", str(tiny_model_dir), "--num-blocks", "4")
        lab.group.wait_ready([coord], timeout=60)
        # Bound to 0.0.0.0, it hands out its lab address, not 0.0.0.0 or 127.0.0.1.
        assert coord.info["grpc"] == f"{ch.ip}:{COORD_PORT}", coord.info
        assert coord.info["dht_initial_peers"] and all(f"/ip4/{ch.ip}/tcp/" in m
                                                       for m in coord.info["dht_initial_peers"])
        address = coord.info["grpc"]
        # A real node told to bind loopback while its coordinator is elsewhere: refused.
        node = lab.exec(nh, [sys.executable, "-m", "pollinate", "node", "--coordinator", address,
                             "--token-file", str(tmp_path / "token"), "--host", "127.0.0.1",
                             "--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir),
                             "--blocks", "0:4", "--throughput", "10", "--torch-threads", "1"],
                        capture_output=True, text=True, timeout=120)
        # A member announcing a port nothing listens on: the dial-back fails.
        fake = lab.start(nh, "fake-node", [], cmd=[
            sys.executable, FAKE_NODE, "--coordinator", address, "--token-file", str(tmp_path / "token"),
            "--address", f"{nh.ip}:9", "--capacity", "4"])
        fake.popen.wait(60)
        fake_log = fake.log_path.read_text()
    assert node.returncode == 1, node.stderr[-2000:]
    last = node.stderr.strip().splitlines()[-1]
    assert "Traceback" not in node.stderr, node.stderr[-3000:]
    assert last.startswith("pollinate node: FailedPrecondition: announced address 127.0.0.1:"), last
    assert f"joined from {nh.ip}" in last and "--host 0.0.0.0" in last, last
    assert fake.popen.returncode != 0
    assert f"cannot connect to the announced address {nh.ip}:9" in fake_log, fake_log[-2000:]


def _http_json(lab, host, url: str) -> dict:
    done = lab.exec(host, [sys.executable, "-c",
                           "import sys, urllib.request; "
                           "print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())",
                           url], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_swarm_in_the_lab_generates_the_local_tokens_and_commits_a_round(
        tmp_path, tiny_model_dir, tiny_model_files, tiny_cache_dir, tiny_reference_model):
    import torch

    ids = torch.tensor([PROMPT])
    expected = tiny_reference_model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                             do_sample=False)[0, len(PROMPT):].tolist()
    with netlab.NetLab(tmp_path, rate_mbit=100) as lab:
        ch = lab.add_host("coord")
        nodes_h = [lab.add_host(f"node-{i}") for i in range(2)]
        th = lab.add_host("trainer")
        coord = _coordinator(lab, ch, tmp_path, "--model", str(tiny_model_dir), "--num-blocks", "4",
                             "--round-window", "5")
        lab.group.wait_ready([coord], timeout=60)
        address = coord.info["grpc"]
        common = ["--coordinator", address, "--token-file", str(tmp_path / "token"), "--model", str(tiny_model_dir),
                  "--cache-dir", str(tiny_cache_dir), "--throughput", "10", "--torch-threads", "1"]
        nodes = [
            lab.start(nodes_h[0], "node-0", ["node", *common, "--blocks", "0:2", "--host", nodes_h[0].ip]),
            # no --host: binds 0.0.0.0 and announces the interface that reaches the coordinator
            lab.start(nodes_h[1], "node-1", ["node", *common, "--blocks", "2:4"]),
        ]
        lab.group.wait_ready(nodes, timeout=120)
        done = lab.exec(th, [sys.executable, CLIENT, "--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir),
                             "--coordinator", address, "--token", TOKEN, "--prompt-ids", ",".join(map(str, PROMPT)),
                             "--max-new-tokens", str(NEW_TOKENS), "--job", "lab", "--steps", "4",
                             "--round-steps", "2"], capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:] + lab.group.dump_logs()
        result = json.loads(done.stdout.strip().splitlines()[-1])
        status = _http_json(lab, ch, f"http://{ch.ip}:7071/api/v1/status")
        counters = lab.counters()
    assert [n.info["address"] for n in nodes] == [f"{h.ip}:{n.info['address'].rsplit(':', 1)[1]}"
                                                  for h, n in zip(nodes_h, nodes)]
    assert all(f"/ip4/{h.ip}/tcp/" in n.info["dht_maddrs"][0] for h, n in zip(nodes_h, nodes))
    assert sorted(m["address"] for m in status["members"]) == sorted(n.info["address"] for n in nodes)
    assert result["tokens"] == expected
    assert len(result["losses"]) == 4
    rounds = {(r["job"], tuple(r["span"])): r["round"] for r in status["rounds"]}
    assert rounds == {("lab", (0, 2)): 2, ("lab", (2, 4)): 2}, status["rounds"]
    assert counters["trainer"][1] > 0 and counters["coord"][0] > 0


LAB_THEN_SLEEP = """
import sys, time
sys.path.insert(0, sys.argv[1])
from netlab import NetLab
with NetLab(sys.argv[2]) as lab:
    host = lab.add_host("a")
    proc = lab.start(host, "sleeper", [], cmd=["sleep", "300"], ready=False)
    print(proc.pid, flush=True)
    time.sleep(300)
"""


def _lab_in_a_process(tmp_path):
    bench = str(Path(netlab.__file__).parent)
    owner = subprocess.Popen([sys.executable, "-c", LAB_THEN_SLEEP, bench, str(tmp_path)], stdout=subprocess.PIPE,
                             text=True)
    sleeper = int(owner.stdout.readline())
    prefix = f"{netlab.PREFIX}{owner.pid}-"
    assert len([ns for ns in netlab.list_namespaces() if ns.startswith(prefix)]) == 2
    return owner, sleeper, prefix


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_lab_is_torn_down_on_sigterm_and_a_sigkilled_one_by_the_next(tmp_path):
    import signal

    owner, sleeper, prefix = _lab_in_a_process(tmp_path / "term")
    owner.send_signal(signal.SIGTERM)
    assert owner.wait(30) != 0
    assert not [ns for ns in netlab.list_namespaces() if ns.startswith(prefix)]
    assert not _alive(sleeper)

    owner, sleeper, prefix = _lab_in_a_process(tmp_path / "kill")
    owner.kill()  # nothing runs in the owner: the namespaces and the sleeper outlive it
    owner.wait(30)
    assert _alive(sleeper) and [ns for ns in netlab.list_namespaces() if ns.startswith(prefix)]
    removed = netlab.cleanup_stale()
    assert len([ns for ns in removed if ns.startswith(prefix)]) == 2, removed
    assert not [ns for ns in netlab.list_namespaces() if ns.startswith(prefix)]
    for _ in range(50):  # SIGKILL is delivered asynchronously: up to 5 s for it to land
        if not _alive(sleeper):
            break
        time.sleep(0.1)
    assert not _alive(sleeper)

