"""Strangers in the DHT (issue 18). The swarm's DHT takes records from anyone who can reach
it, no token needed, so a stranger can announce blocks at an address of its choosing, with a
throughput that makes routes prefer it, and learn the token from the first call sent there.
Nodes tag their records with the swarm token and clients with the token drop records without a
valid tag (node/announce.py: record_tag): a client bootstrapped from --initial-peers alone
ignores a stranger without the token, generates the local model's tokens through the member and
never dials the stranger. A stranger that holds the token (any volunteer or user) tags its
records as a node does. A client that knows the coordinator routes only through records at its
members' addresses (ListQuarantined lists them): it never dials that stranger either. A client
bootstrapped from --initial-peers alone has no member list and does dial it: the hole the list
closes (docs/security.md). In a --data-tls swarm, such a client given the swarm's CA
certificate (--swarm-ca) still dials the stranger, but only to offer a TLS handshake the
stranger cannot complete: no call, so no token, reaches it, and the client generates the local
model's tokens through the member.

TLS ClientHello records start with 0x16 (handshake) 0x03 (TLS major version); a plaintext gRPC
connection starts with the HTTP/2 preface, "PRI * HTTP/2.0".
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

from procs import ProcGroup
from rounds_swarm import start_swarm

SERVING_CLIENT = str(Path(__file__).with_name("serving_client.py"))
STRANGER = str(Path(__file__).with_name("dht_stranger.py"))
TOKEN = "stranger-token"
PROMPT = [1, 5, 9, 33, 70, 12]
NEW_TOKENS = 4


class Trap:
    """A TCP listener that keeps the first bytes each connection sends it, then closes it."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.first_bytes: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def dialled(self) -> int:
        return len(self.first_bytes)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            conn.settimeout(5)
            try:
                self.first_bytes.append(conn.recv(16))
            except OSError:
                self.first_bytes.append(b"")
            conn.close()


def generate(model_dir, cache_dir, *bootstrap: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SERVING_CLIENT, "--model", str(model_dir), "--cache-dir", str(cache_dir), "--token", TOKEN,
         "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW_TOKENS), *bootstrap],
        capture_output=True, text=True, timeout=120)


@contextlib.contextmanager
def swarm_and_stranger(tmp_path, model_dir, cache_dir, *, stranger_token: str | None,
                       coordinator_args: tuple[str, ...] = ()):
    """A one-node swarm and a stranger announcing all its blocks at a Trap's address, its
    records tagged with `stranger_token` (None: untagged): (process group, coordinator, the
    DHT's bootstrap peers, the trap)."""
    trap = Trap()
    try:
        with ProcGroup(tmp_path) as group:
            coord, _ = start_swarm(group, tmp_path, model_dir, cache_dir, replicas=1, token=TOKEN,
                                   coordinator_args=coordinator_args)
            dht_peers = coord.info["dht_initial_peers"]
            stranger = group.start("stranger", [], cmd=[
                sys.executable, STRANGER, "--initial-peers", *dht_peers, "--model", str(model_dir),
                "--blocks", "0:4", "--address", trap.address,
                *(("--token", stranger_token) if stranger_token else ())])
            group.wait_ready([stranger], timeout=60)  # its records are stored
            yield group, coord, dht_peers, trap
    finally:
        trap.sock.close()


def local_tokens(reference_model) -> list[int]:
    import torch

    return reference_model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                    do_sample=False)[0, len(PROMPT):].tolist()


def test_a_client_without_the_coordinator_ignores_a_dht_stranger_without_the_token(
        tmp_path, tiny_model_dir, tiny_model_files, tiny_cache_dir, tiny_reference_model):
    expected = local_tokens(tiny_reference_model)
    with swarm_and_stranger(tmp_path, tiny_model_dir, tiny_cache_dir, stranger_token=None) as (group, _, dht_peers,
                                                                                              trap):
        peers_only = generate(tiny_model_dir, tiny_cache_dir, "--initial-peers", *dht_peers)
        assert peers_only.returncode == 0, peers_only.stderr[-3000:] + group.dump_logs()
        assert json.loads(peers_only.stdout.strip().splitlines()[-1])["tokens"] == expected
        assert trap.dialled == 0, "a client with the token dialled a stranger without it"
        assert f"at {trap.address}: no token tag" in peers_only.stderr, peers_only.stderr[-3000:]  # read, dropped
        assert TOKEN not in peers_only.stderr


def test_a_client_routes_only_through_members_not_dht_strangers(tmp_path, tiny_model_dir, tiny_model_files,
                                                               tiny_cache_dir, tiny_reference_model):
    expected = local_tokens(tiny_reference_model)
    with swarm_and_stranger(tmp_path, tiny_model_dir, tiny_cache_dir, stranger_token=TOKEN) as (group, coord,
                                                                                               dht_peers, trap):
        member_client = generate(tiny_model_dir, tiny_cache_dir, "--coordinator", coord.info["grpc"])
        assert member_client.returncode == 0, member_client.stderr[-3000:] + group.dump_logs()
        assert json.loads(member_client.stdout.strip().splitlines()[-1])["tokens"] == expected
        assert trap.dialled == 0, "a client that knows the coordinator dialled the stranger"
        assert f"at {trap.address} (blocks 0:4) names no member of the swarm" in member_client.stderr

        peers_only = generate(tiny_model_dir, tiny_cache_dir, "--initial-peers", *dht_peers)
        assert trap.dialled > 0, peers_only.stderr[-3000:]  # what the member list prevents, from token holders
        assert "no coordinator given: routing through every DHT record tagged" in peers_only.stderr  # and says so
        assert "no coordinator given" not in member_client.stderr


def test_a_client_with_the_swarm_ca_sends_a_dht_stranger_no_call(tmp_path, tiny_model_dir, tiny_model_files,
                                                                tiny_cache_dir, tiny_reference_model):
    expected = local_tokens(tiny_reference_model)
    with swarm_and_stranger(tmp_path, tiny_model_dir, tiny_cache_dir, stranger_token=TOKEN,
                            coordinator_args=("--data-tls",)) as (group, _, dht_peers, trap):
        ca = tmp_path / "coord-data" / "swarm-ca.pem"
        pinned = generate(tiny_model_dir, tiny_cache_dir, "--initial-peers", *dht_peers, "--swarm-ca", str(ca))
        assert pinned.returncode == 0, pinned.stderr[-3000:] + group.dump_logs()
        assert json.loads(pinned.stdout.strip().splitlines()[-1])["tokens"] == expected
        assert trap.dialled > 0, pinned.stderr[-3000:]  # the stranger's record was tried ...
        assert all(b[:2] == b"\x16\x03" for b in trap.first_bytes), trap.first_bytes  # ... for a handshake only
        assert "no coordinator given" not in pinned.stderr  # nothing to warn of: strangers get no call

        wrong = tmp_path / "copied-key.pem"  # the CA's key, not its certificate: refused before any dial
        wrong.write_text((tmp_path / "coord-data" / "swarm-ca-key.pem").read_text())
        refused = generate(tiny_model_dir, tiny_cache_dir, "--initial-peers", *dht_peers, "--swarm-ca", str(wrong))
        assert refused.returncode != 0 and "not a PEM certificate" in refused.stderr, refused.stderr[-2000:]
