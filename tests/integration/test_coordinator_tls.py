"""A coordinator process started with --tls-cert/--tls-key: a client that trusts the
(self-signed, generated here) certificate joins and heartbeats; plaintext and untrusting
clients are refused, and the coordinator keeps serving."""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pollinate.coordinator.client import CoordinatorClient, CoordinatorClientConfig, call_coordinator
from pollinate.coordinator.probe import ProbeError, probe_coordinator
from pollinate.protocol.channels import ChannelConfig, open_channel
from pollinate.protocol.errors import PeerUnavailable
from pollinate.protocol.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from procs import ProcGroup, pollinate_cmd

TOKEN = "tls-token"


def self_signed(tmp, name: str) -> tuple:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def coordinator_args(tmp, *tls: str) -> list[str]:
    (tmp / "token").write_text(TOKEN)
    return ["coordinator", "--data-dir", str(tmp / "data"), "--port", "0", "--http-port", "-1",
            "--token-file", str(tmp / "token"), "--no-dht", "--heartbeat-period", "0.2", *tls]


def start_tls_coordinator(group: ProcGroup, tmp):
    """A coordinator process serving TLS with a fresh self-signed certificate: (proc, cert)."""
    cert, key = self_signed(tmp, "coordinator")
    coord = group.start("coordinator", coordinator_args(tmp, "--tls-cert", str(cert), "--tls-key", str(key)))
    group.wait_ready([coord], timeout=90)
    return coord, cert


async def test_tls_coordinator_serves_a_trusting_client_and_refuses_plaintext(tmp_path):
    other_cert, _ = self_signed(tmp_path, "someone-else")
    with ProcGroup(tmp_path) as group:
        coord, cert = start_tls_coordinator(group, tmp_path)
        address = coord.info["grpc"]
        assert coord.info["tls"] is True

        node = CoordinatorClient(CoordinatorClientConfig(
            coordinator=address, token=TOKEN, address="127.0.0.1:7001", capacity_blocks=4,
            throughput=5.0, tls=True, tls_root_cert_file=cert, join_timeout_s=30))
        await node.start()
        try:
            assert node.span is not None and node.connected
            await wait_heartbeats(node, 2)  # on the HeartbeatStream, over TLS
        finally:
            await node.stop()

        # Plaintext to a TLS port: the handshake fails, nothing is served.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call_plain(address, common_pb2.HealthRequest(), "Health")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # TLS that trusts another certificate: refused as well.
        with pytest.raises(PeerUnavailable):
            await call_coordinator(address, TOKEN, "Status", coordinator_pb2.StatusRequest(),
                                   timeout_s=5, tls=True, tls_root_cert_file=other_cert)
        # The coordinator kept serving: the node's join and leave are in its state.
        reply = await call_coordinator(address, TOKEN, "Status", coordinator_pb2.StatusRequest(),
                                       tls=True, tls_root_cert_file=cert)
        assert reply.epoch == 2 and list(reply.members) == []
        assert coord.alive()


def test_commands_reach_a_tls_coordinator_with_coordinator_tls(tmp_path):
    """status, job and the DHT-peer probe that node/generate/train run first: with
    --coordinator-tls CERT they work, without it they fail and say so, and a certificate
    file that is not one is refused before any connection."""
    with ProcGroup(tmp_path) as group:
        coord, cert = start_tls_coordinator(group, tmp_path)
        address = coord.info["grpc"]
        auth = ["--coordinator", address, "--token-file", str(tmp_path / "token")]

        def cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(pollinate_cmd(*args), capture_output=True, text=True, timeout=120)

        created = cli("job", "create", "sums", *auth, "--coordinator-tls", str(cert), "--json")
        assert created.returncode == 0, created.stderr[-2000:]
        status = cli("status", *auth, "--coordinator-tls", str(cert), "--json")
        assert status.returncode == 0, status.stderr[-2000:]
        assert json.loads(status.stdout)["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        listed = cli("job", "list", *auth, "--coordinator-tls", str(cert), "--json")
        assert [j["name"] for j in json.loads(listed.stdout)] == ["sums"]

        plain = cli("status", *auth, "--timeout", "3")
        assert plain.returncode == 1 and "pollinate status:" in plain.stderr, plain.stderr[-2000:]
        bogus = cli("status", *auth, "--coordinator-tls", str(tmp_path / "token"))
        assert bogus.returncode == 1 and "not a PEM certificate" in bogus.stderr, bogus.stderr[-2000:]

        info = probe_coordinator(address, TOKEN, timeout_s=20, tls=True, tls_root_cert_file=cert)
        assert info.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and info.dht_initial_peers == ()
        with pytest.raises(ProbeError, match="refused: --coordinator-tls"):
            probe_coordinator(address, TOKEN, timeout_s=5, tls=True,
                              tls_root_cert_file=tmp_path / "missing.pem")
        assert coord.alive()


def test_tls_flags_need_each_other_and_existing_files(tmp_path):
    cert, _ = self_signed(tmp_path, "coordinator")
    for tls, message in (
        (["--tls-cert", str(cert)], "needs both a certificate and its key"),
        (["--tls-cert", str(cert), "--tls-key", str(tmp_path / "missing.key")], "does not exist"),
    ):
        result = subprocess.run(pollinate_cmd(*coordinator_args(tmp_path, *tls)),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


async def wait_heartbeats(client: CoordinatorClient, n: int, timeout: float = 30.0) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while client.heartbeats_ok < n:
        assert loop.time() < end, f"only {client.heartbeats_ok} heartbeats in {timeout} s"
        await asyncio.sleep(0.05)


async def call_plain(address: str, request, method: str):
    channel = open_channel(address, ChannelConfig(token=TOKEN))
    try:
        return await getattr(coordinator_pb2_grpc.CoordinatorStub(channel), method)(request, timeout=5)
    finally:
        await channel.close()
