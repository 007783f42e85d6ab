"""The swarm CA (protocol/data_tls.py) with real gRPC servers in-process: a node certified for
its address and key serves TLS; a dialler that trusts the swarm CA reaches it, one dialling
another address with that certificate, trusting another CA, or speaking plaintext does not."""

from __future__ import annotations

import pytest
from cryptography import x509

from pollinate.protocol.channels import ChannelConfig, RpcServer, ServerConfig, open_channel, peer_channel_config
from pollinate.protocol.data_tls import SwarmCA, certificate_seconds_left, swarm_ca_pem, tls_name, use_swarm_ca
from pollinate.protocol.errors import PeerUnavailable, translate_rpc_errors
from pollinate.protocol.identity import NodeIdentity
from pollinate.protocol.v1 import common_pb2, node_pb2_grpc


class _Health(node_pb2_grpc.NodeServicer):
    async def Health(self, request, context):
        return common_pb2.HealthReply(status=common_pb2.HealthReply.SERVING, version="test")


@pytest.fixture
def swarm_ca_in_process():
    before = swarm_ca_pem()
    yield use_swarm_ca
    use_swarm_ca(before)


def test_the_ca_is_kept_in_its_directory_and_certifies_key_and_address(tmp_path):
    ca = SwarmCA.load_or_create(tmp_path)
    assert SwarmCA.load_or_create(tmp_path).cert_pem == ca.cert_pem  # a restart keeps it
    node = NodeIdentity.generate()
    pem = ca.issue(node.public_key, "10.0.0.7:7100", valid_s=86400)
    cert = x509.load_pem_x509_certificate(pem.encode())
    assert 86300 < certificate_seconds_left(pem) <= 86400  # what a node reads from an older coordinator's
    assert cert.issuer == ca.cert.subject
    assert cert.public_key().public_numbers() == node.private_key.public_key().public_numbers()
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == [tls_name("10.0.0.7:7100")]
    assert tls_name("10.0.0.7:7100") != tls_name("10.0.0.7:7101")  # a port is its own name
    relayed = "/ip4/1.2.3.4/tcp/5/p2p/QmRelay/p2p-circuit/p2p/QmNodeAbC"
    both = relayed + "+/ip4/5.6.7.8/tcp/5/p2p/QmOther/p2p-circuit/p2p/QmNodeAbC"
    assert tls_name(relayed) == tls_name(both) == "qmnodeabc.relayed.pollinate-swarm"  # its relays may change


async def _health(address: str, config: ChannelConfig) -> str:
    channel = open_channel(address, config)
    try:
        with translate_rpc_errors(peer=address):
            return (await node_pb2_grpc.NodeStub(channel).Health(common_pb2.HealthRequest(), timeout=5)).version
    finally:
        await channel.close()


async def test_a_certified_node_serves_tls_to_diallers_that_trust_the_swarm_ca(tmp_path, swarm_ca_in_process):
    ca, stranger = SwarmCA.load_or_create(tmp_path / "ca"), SwarmCA.load_or_create(tmp_path / "other")
    node = NodeIdentity.generate()
    probe = RpcServer(ServerConfig())  # the port first: a certificate names host:port
    await probe.start()
    address = probe.address
    await probe.stop(0)
    port = int(address.rsplit(":", 1)[1])
    swarm_ca_in_process(ca.cert_pem)

    async def serving(certified_for: str) -> RpcServer:
        chain = ca.issue(node.public_key, certified_for, valid_s=86400) + ca.cert_pem
        server = RpcServer(ServerConfig(port=port, tls_cert_pem=chain.encode(), tls_key_pem=node.private_pem()))
        server.add(node_pb2_grpc.add_NodeServicer_to_server, _Health())
        await server.start()
        return server

    server = await serving(address)
    try:
        assert await _health(address, peer_channel_config(None)) == "test"
        with pytest.raises(PeerUnavailable, match="plaintext call to a TLS peer"):  # plaintext to a TLS node
            await _health(address, ChannelConfig())
        with pytest.raises(PeerUnavailable, match="TLS handshake failed"):  # trusting another swarm's CA
            await _health(address, ChannelConfig(tls=True, tls_root_pem=stranger.cert_pem.encode(), swarm_peer=True))
    finally:
        await server.stop(0)
    # a certificate for another address (another node's port on this host) does not pass here
    server = await serving(address.rsplit(":", 1)[0] + ":1")
    try:
        with pytest.raises(PeerUnavailable, match="TLS handshake failed"):
            await _health(address, peer_channel_config(None))
    finally:
        await server.stop(0)
    swarm_ca_in_process(None)
    assert not peer_channel_config(None).tls  # no swarm CA told: plaintext


async def test_a_serving_node_swaps_its_certificate_without_dropping_open_calls(tmp_path, swarm_ca_in_process):
    """RpcServer.replace_certificate: new handshakes get the new certificate, a connection
    opened before keeps working; an expired certificate fails new handshakes."""
    import asyncio
    import ssl

    ca = SwarmCA.load_or_create(tmp_path / "ca")
    node = NodeIdentity.generate()
    probe = RpcServer(ServerConfig())
    await probe.start()
    address = probe.address
    await probe.stop(0)
    host, port = address.rsplit(":", 1)
    swarm_ca_in_process(ca.cert_pem)

    def served_expiry():  # the leaf certificate a new TLS handshake is shown
        pem = ssl.get_server_certificate((host, int(port)), timeout=5)
        return x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc

    short = ca.issue(node.public_key, address, valid_s=2) + ca.cert_pem
    server = RpcServer(ServerConfig(port=int(port), tls_cert_pem=short.encode(), tls_key_pem=node.private_pem()))
    server.add(node_pb2_grpc.add_NodeServicer_to_server, _Health())
    await server.start()
    old = open_channel(address, peer_channel_config(None))  # connected before the swap
    try:
        stub = node_pb2_grpc.NodeStub(old)
        assert (await stub.Health(common_pb2.HealthRequest(), timeout=5)).version == "test"
        first = await asyncio.to_thread(served_expiry)
        renewed = ca.issue(node.public_key, address, valid_s=3600) + ca.cert_pem
        server.replace_certificate(renewed.encode())
        assert (await asyncio.to_thread(served_expiry) - first).total_seconds() > 3000
        await asyncio.sleep(2.5)  # the first certificate has expired
        assert await _health(address, peer_channel_config(None)) == "test"  # a new connection: the renewed one
        assert (await stub.Health(common_pb2.HealthRequest(), timeout=5)).version == "test"  # the old one goes on
    finally:
        await old.close()
        await server.stop(0)

    expired = RpcServer(ServerConfig(port=int(port), tls_cert_pem=short.encode(), tls_key_pem=node.private_pem()))
    expired.add(node_pb2_grpc.add_NodeServicer_to_server, _Health())
    await expired.start()
    try:  # what a node that was not renewed serves: refused by every dialler
        with pytest.raises(PeerUnavailable, match="TLS handshake failed"):
            await _health(address, peer_channel_config(None))
    finally:
        await expired.stop(0)

    # renewed before the server started (a node whose span loads for longer than half the lifetime)
    late = RpcServer(ServerConfig(port=int(port), tls_cert_pem=short.encode(), tls_key_pem=node.private_pem()))
    late.add(node_pb2_grpc.add_NodeServicer_to_server, _Health())
    late.replace_certificate(renewed.encode())
    await late.start()
    try:
        assert await _health(address, peer_channel_config(None)) == "test"
    finally:
        await late.stop(0)


def test_a_swarm_ca_file_is_checked_and_must_match_the_coordinators(tmp_path, swarm_ca_in_process):
    """--swarm-ca (client/remote_model.pin_swarm_ca): the coordinator's swarm-ca.pem is taken; its
    key, a node's certificate, a missing file, or another swarm's CA is refused with the reason,
    and the CA this process verifies nodes against stays what it was."""
    from pollinate.client.remote_model import pin_swarm_ca
    from pollinate.protocol.data_tls import CA_CERT_FILE, CA_KEY_FILE, read_swarm_ca

    before = swarm_ca_pem()  # whatever an earlier test in this process left
    ca = SwarmCA.load_or_create(tmp_path / "swarm")
    other = SwarmCA.load_or_create(tmp_path / "other")
    node_cert = tmp_path / "node.pem"
    node_cert.write_text(ca.issue(NodeIdentity.generate().public_key, "10.0.0.7:7100", valid_s=60))
    assert read_swarm_ca(tmp_path / "swarm" / CA_CERT_FILE) == ca.cert_pem.encode()
    for path, why in ((tmp_path / "swarm" / CA_KEY_FILE, "not a PEM certificate"), (node_cert, "not a CA's"),
                      (tmp_path / "absent.pem", "No such file")):
        with pytest.raises(ValueError, match=why):
            pin_swarm_ca(path, None)
    assert swarm_ca_pem() == before  # nothing taken

    swarm_ca_in_process(other.cert_pem)  # as _coordinator_peers leaves it after asking a coordinator
    with pytest.raises(ValueError, match="is not coordinator c:1's"):
        pin_swarm_ca(tmp_path / "swarm" / CA_CERT_FILE, "c:1")
    assert swarm_ca_pem() == other.cert_pem.encode()
    swarm_ca_in_process(None)  # a plaintext coordinator
    with pytest.raises(ValueError, match="plaintext data plane"):
        pin_swarm_ca(tmp_path / "swarm" / CA_CERT_FILE, "c:1")
    pin_swarm_ca(tmp_path / "swarm" / CA_CERT_FILE, None)  # --initial-peers alone
    assert swarm_ca_pem() == ca.cert_pem.encode()
