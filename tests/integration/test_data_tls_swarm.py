"""A swarm with TLS on its data plane (`pollinate coordinator --data-tls`): a coordinator and
two real node processes hosting the whole tiny model, one dialled directly and one through a
circuit relay (the coordinator's DHT peer; --reachability relay), each serving gRPC with the
certificate the coordinator (the swarm's CA) issued for its address and key. A client given only the
coordinator's address generates the local model's greedy tokens over TLS; a trainer trains
one job on both replicas until their DiLoCo round (ExchangeShard between the nodes, over
TLS) commits, both replicas equal to the coordinator's copy; a plaintext caller is refused
with an error that says why. Certificates last CERT_VALIDITY_S: the nodes renew them while
they serve (a connection opened before a renewal goes on, new ones get the new certificate,
also past the old one's expiry), and a node quarantined by a liar report gets no new one, so
within one validity period nobody can open a TLS connection to it while the other node serves on."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from procs import ProcGroup
from rounds_swarm import start_swarm

SERVING_CLIENT = str(Path(__file__).with_name("serving_client.py"))
ROUNDS_CLIENT = str(Path(__file__).with_name("rounds_client.py"))
TOKEN = "data-tls-token"
PROMPT = [1, 5, 9, 33, 70, 12, 8]
NEW_TOKENS = 6
# --data-tls-cert-validity for this swarm: renewals every 3 s, so the test sees several, and
# a node that gets no new certificate is shut out of the data plane within seconds.
CERT_VALIDITY_S = 6.0


async def renewal_and_quarantine(coordinator: str, ca_pem: str, direct: str, relayed: str) -> dict:
    """A node's certificate renewed while it serves; then the direct node quarantined (one
    liar report is enough in this swarm) and shut out of TLS within a validity period."""
    import datetime
    import ssl

    from cryptography import x509

    from pollinate.coordinator.client import call_coordinator
    from pollinate.protocol.channels import open_channel, peer_channel_config
    from pollinate.protocol.data_tls import use_swarm_ca
    from pollinate.protocol.errors import PeerUnavailable, translate_rpc_errors
    from pollinate.protocol.relay import dialer
    from pollinate.protocol.v1 import common_pb2, coordinator_pb2, node_pb2, node_pb2_grpc

    loop = asyncio.get_running_loop()
    use_swarm_ca(ca_pem)  # as a client that asked the coordinator's Status
    host, port = direct.rsplit(":", 1)

    def served_expiry() -> datetime.datetime:  # what a new TLS handshake with the direct node is shown
        pem = ssl.get_server_certificate((host, int(port)), timeout=5)
        return x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc

    async def info(channel) -> int:
        with translate_rpc_errors():
            return (await node_pb2_grpc.NodeStub(channel).Info(node_pb2.InfoRequest(), timeout=10)).span.end

    async def info_new(address: str) -> int:  # on a new connection
        channel = open_channel(address, peer_channel_config(TOKEN))
        try:
            return await info(channel)
        finally:
            await channel.close()

    held = open_channel(direct, peer_channel_config(TOKEN))
    try:
        await info(held)  # connected now, before the next renewal
        first = await asyncio.to_thread(served_expiry)
        give_up = loop.time() + 2 * CERT_VALIDITY_S
        while (renewed := await asyncio.to_thread(served_expiry)) == first:  # renewed at half its lifetime
            assert loop.time() < give_up, f"no renewal within {2 * CERT_VALIDITY_S} s"
            await asyncio.sleep(0.2)
        now = datetime.datetime.now(datetime.timezone.utc)
        assert now < first < renewed, (now, first, renewed)  # renewed before the first one expired
        await asyncio.sleep((first - now).total_seconds() + 0.5)  # until the first one has expired
        assert await info(held) == await info_new(direct) == 4  # the old connection and a new one

        reported = await call_coordinator(coordinator, TOKEN, "ReportLiar", coordinator_pb2.ReportLiarRequest(
            address=direct, peer_id="12D3KooWliar", blocks=common_pb2.Span(start=0, end=4), distance=0.5,
            tolerance=0.03))
        assert reported.quarantined
        quarantined_at = loop.time()
        while True:  # its certificate runs out unrenewed: new connections fail the handshake
            try:
                await info_new(direct)
            except PeerUnavailable as exc:
                refused = str(exc)
                break
            assert loop.time() - quarantined_at < CERT_VALIDITY_S + 5, "still certified after a validity period"
            await asyncio.sleep(0.2)
        shut_out_s = loop.time() - quarantined_at
        return {"shut_out_s": shut_out_s, "refused": refused, "relayed_end": await info_new(relayed)}
    finally:
        await held.close()
        await dialer().close()  # the relayed address's libp2p daemon, before the loop ends


async def plaintext_info(addresses: list[str]) -> list[Exception | None]:
    """What a plaintext Info call to each address raised (None: it was answered)."""
    from pollinate.protocol.channels import ChannelConfig, open_channel
    from pollinate.protocol.errors import translate_rpc_errors
    from pollinate.protocol.relay import dialer
    from pollinate.protocol.v1 import node_pb2, node_pb2_grpc

    out = []
    try:
        for address in addresses:
            channel = open_channel(address, ChannelConfig(token=TOKEN))
            try:
                with translate_rpc_errors(peer=address):
                    await node_pb2_grpc.NodeStub(channel).Info(node_pb2.InfoRequest(), timeout=10)
                out.append(None)
            except Exception as exc:
                out.append(exc)
            finally:
                await channel.close()
    finally:
        await dialer().close()  # the relayed address's libp2p daemon, before the loop ends
    return out


def test_a_data_tls_swarm_generates_trains_and_refuses_plaintext(tmp_path, tiny_model_dir, tiny_model_files,
                                                               tiny_cache_dir, tiny_reference_model):
    import torch

    from pollinate.client.cli_status import format_status
    from pollinate.coordinator.client import call_coordinator
    from pollinate.protocol.errors import PeerUnavailable
    from pollinate.protocol.v1 import coordinator_pb2

    expected = tiny_reference_model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS,
                                             min_new_tokens=NEW_TOKENS, do_sample=False)[0, len(PROMPT):].tolist()
    with ProcGroup(tmp_path) as group:
        coord, nodes = start_swarm(group, tmp_path, tiny_model_dir, tiny_cache_dir, replicas=2, token=TOKEN,
                                   coordinator_args=("--data-tls", "--data-tls-cert-validity", str(CERT_VALIDITY_S),
                                                     "--quarantine-reporters", "1", "--quarantine-unverified"),
                                   node_args={1: ("--reachability", "relay")})
        assert [n.info["relayed"] for n in nodes] == [False, True]
        address = coord.info["grpc"]
        assert coord.info["data_tls"] is True
        status = asyncio.run(call_coordinator(address, TOKEN, "Status", coordinator_pb2.StatusRequest()))
        assert status.data_tls_ca_pem == (tmp_path / "coord-data" / "swarm-ca.pem").read_text()
        assert "data plane: TLS" in format_status(status, now=0)  # `pollinate status`
        identities = {m.identity for m in status.members}
        assert len(identities) == 2 and "" not in identities  # each node joined with its own key

        generated = subprocess.run(
            [sys.executable, SERVING_CLIENT, "--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir),
             "--token", TOKEN, "--coordinator", address, "--prompt-ids", ",".join(map(str, PROMPT)),
             "--max-new-tokens", str(NEW_TOKENS)], capture_output=True, text=True, timeout=120)
        assert generated.returncode == 0, generated.stderr[-3000:] + group.dump_logs()
        assert json.loads(generated.stdout.strip().splitlines()[-1])["tokens"] == expected

        trained = subprocess.run(
            [sys.executable, ROUNDS_CLIENT, "--coordinator", address, "--token", TOKEN, "--data-tls",
             "--nodes", ",".join(n.info["address"] for n in nodes), "--steps", "2", "--round-steps", "2",
             "--no-overlap", "--expect-round", "1"], capture_output=True, text=True, timeout=120)
        assert trained.returncode == 0, trained.stderr[-3000:] + group.dump_logs()
        result = json.loads(trained.stdout.strip().splitlines()[-1])
        assert result["round"] == 1 and result["replicas_equal_coordinator"] == [True, True], result

        refused = asyncio.run(plaintext_info([n.info["address"] for n in nodes]))  # direct, relayed
        for exc in refused:
            assert isinstance(exc, PeerUnavailable) and "plaintext call to a TLS peer" in str(exc), refused

        shut_out = asyncio.run(renewal_and_quarantine(address, status.data_tls_ca_pem,
                                                      *(n.info["address"] for n in nodes)))
        assert "TLS handshake failed" in shut_out["refused"], shut_out
        assert shut_out["shut_out_s"] <= CERT_VALIDITY_S + 1, shut_out  # within one validity (+ the polling)
        assert shut_out["relayed_end"] == 4  # the other node renews and serves on
        assert all(n.alive() for n in nodes)
        logs = group.dump_logs(400)
    assert logs.count("(TLS, token required)") == 2, logs  # both nodes served TLS, nothing plaintext
    assert logs.count("committed here (attempt 1, group of 2)") == 2, logs  # the exchange ran between them
    assert "renewing the data-TLS certificate failed (NotFound" in logs, logs  # the quarantined node's
