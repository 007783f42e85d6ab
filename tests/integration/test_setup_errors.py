"""Set-up errors reach the user as one line that says what to change, with a non-zero exit
code and no traceback (cli/main.py, protocol/errors.SetupError)."""

from __future__ import annotations

import subprocess
import sys

# A syntactically valid DHT multiaddr on a port nothing listens on (port 1 on loopback).
DEAD_PEER = "/ip4/127.0.0.1/tcp/1/p2p/QmXt1obCDx7XKfGHrnxZTUD7ktuqFFY9sTyxm6pYUTtzc5"


def pollinate(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pollinate", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_a_node_whose_dht_cannot_bootstrap_says_what_to_check(tiny_model_dir, tiny_model_files, tiny_cache_dir):
    done = pollinate("node", "--blocks", "0:2", "--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir),
                     "--initial-peers", DEAD_PEER, "--torch-threads", "1")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pollinate node: cannot join the swarm's DHT at {DEAD_PEER}"), last
    assert "failed to connect to bootstrap peers" in last and "--announce-host" in last, last


def test_a_coordinator_told_to_announce_the_wildcard_refuses_to_start(tmp_path):
    (tmp_path / "token").write_text("t\n")
    done = pollinate("coordinator", "--data-dir", str(tmp_path / "d"), "--token-file", str(tmp_path / "token"),
                     "--host", "0.0.0.0", "--announce-host", "0.0.0.0", "--port", "0", "--http-port", "-1")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "pollinate coordinator: --announce-host 0.0.0.0 is not an address others can dial; "
        "give this machine's LAN or public address")


def test_a_coordinator_on_a_taken_port_says_so(tmp_path):
    import socket

    (tmp_path / "token").write_text("t\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = pollinate("coordinator", "--data-dir", str(tmp_path / "d"), "--token-file", str(tmp_path / "token"),
                         "--port", str(port), "--http-port", "-1", "--no-dht")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"pollinate coordinator: OSError: cannot listen on 127.0.0.1:{port}")


def test_an_empty_token_file_is_one_line_for_every_command(tmp_path):
    """Before, `status` and `job` (and `generate`) printed a traceback for it."""
    empty = tmp_path / "token"
    empty.write_text("\n")
    for command in (["status"], ["job", "show", "j"], ["generate", "hi", "--initial-peers", DEAD_PEER]):
        done = pollinate(*command, "--coordinator", "127.0.0.1:1", "--token-file", str(empty))
        assert done.returncode != 0 and "Traceback" not in done.stderr, (command, done.stderr[-3000:])
        assert done.stderr.strip().splitlines()[-1] == f"pollinate {command[0]}: token file {empty} is empty", \
            done.stderr[-2000:]
    # generate imports transformers, which imports torchao: its import-time warnings stay out
    assert "torchao" not in done.stderr and "_pytree" not in done.stderr, done.stderr
