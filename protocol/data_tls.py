"""TLS on the data plane (`pollinate coordinator --data-tls`): the coordinator as the swarm's CA.

With the flag the coordinator keeps a CA key and certificate in its data directory (made
once, kept across restarts) and tells everyone its certificate in Status and JoinReply. A
node, once joined, asks for a certificate (IssueDataTlsCertificate, signed by its member
key): the coordinator issues one for the member's address, bound to the node's public key
(protocol/identity.py), and the node serves gRPC with it and its identity key. Whoever
dials a node (clients, trainers, round members' ExchangeShard, session handoff, the
coordinator's address challenge) verifies the certificate against the swarm CA, for the
address it dialled:

    use_swarm_ca(status.data_tls_ca_pem)                      # once per process, from Status
    channel = open_channel(address, peer_channel_config(token))  # in protocol/channels.py

A certificate names the address it is for as a DNS name derived from it (`tls_name`), not
as the host: two nodes on one host (different ports) must not pass for each other, and a
relayed address (protocol/relay.py, dialled through a loopback port) has no host to name.
A relayed node is named by its libp2p peer id, which stays the same when its relays change.
The dialler overrides the TLS target name with the same derivation.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pollinate.protocol.identity import NodeIdentity, fingerprint, public_key_object
from pollinate.protocol.relay import is_relayed, parse_relayed

logger = logging.getLogger(__name__)

CA_KEY_FILE = "swarm-ca-key.pem"
CA_CERT_FILE = "swarm-ca.pem"
# A CA lives as long as the swarm; ten years, as a private CA's root commonly does.
CA_VALID_DAYS = 3650
# The suffix of every name the swarm CA certifies; never a real domain.
NAME_SUFFIX = ".pollinate-swarm"


def tls_name(address: str) -> str:
    """The DNS name a node's certificate carries for `address`: a direct "host:port" by a
    hash of it, a relayed address by the node's peer id (lowercased: DNS names compare
    case-insensitively)."""
    if is_relayed(address):
        peer_id, _ = parse_relayed(address)
        return f"{peer_id.lower()}.relayed{NAME_SUFFIX}"
    return f"{hashlib.sha256(address.encode()).hexdigest()[:40]}.direct{NAME_SUFFIX}"


class SwarmCA:
    """The coordinator's CA: `issue(public_key, address)` is a node's certificate (PEM)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self._key = key
        self.cert = cert
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()

    @classmethod
    def load_or_create(cls, data_dir: str | os.PathLike) -> SwarmCA:
        """The CA in `data_dir` (swarm-ca-key.pem, mode 0600, and swarm-ca.pem), made there if
        absent. A restarted coordinator keeps it, so the nodes' certificates stay valid."""
        data_dir = Path(data_dir)
        key_path, cert_path = data_dir / CA_KEY_FILE, data_dir / CA_CERT_FILE
        if key_path.exists() and cert_path.exists():
            key = NodeIdentity.load_or_create(key_path).private_key
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if cert.public_key().public_numbers() != key.public_key().public_numbers():
                raise ValueError(f"{cert_path} does not belong to the key in {key_path}")
            return cls(key, cert)
        data_dir.mkdir(parents=True, exist_ok=True)
        key = NodeIdentity.load_or_create(key_path).private_key
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pollinate swarm CA {os.urandom(4).hex()}")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_VALID_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True, crl_sign=True,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        tmp = cert_path.with_name(cert_path.name + ".tmp")
        tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp, cert_path)
        logger.info("new swarm CA written to %s", cert_path)
        return cls(key, cert)

    def issue(self, public_key: str, address: str, *, valid_s: float) -> str:
        """A server certificate (PEM) for the node with `public_key` serving at `address`,
        valid for `valid_s` seconds from now. Short (an hour by default) and renewed by the
        node: nothing revokes a certificate, so one outlives its member by at most that."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pollinate node {fingerprint(public_key)}")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
                .public_key(public_key_object(public_key))
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))  # other machines' clocks
                .not_valid_after(now + datetime.timedelta(seconds=valid_s))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(tls_name(address))]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                               critical=False)
                .sign(self._key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM).decode()


def certificate_seconds_left(chain_pem: str) -> float:
    """Seconds until the first certificate of `chain_pem` expires, by this machine's clock."""
    cert = x509.load_pem_x509_certificate(chain_pem.encode())
    return (cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)).total_seconds()


# The swarm CA this process verifies nodes against (PEM), set once from the coordinator's
# Status or JoinReply; None: the data plane is plaintext. Process-wide, as the relay dialer is
# (protocol/relay.py): every channel to a node goes through protocol/channels.py.
_swarm_ca_pem: bytes | None = None


def use_swarm_ca(pem: str | bytes | None) -> None:
    """Dial nodes over TLS, verified against this CA certificate (None or "": plaintext)."""
    global _swarm_ca_pem
    if isinstance(pem, str):
        pem = pem.encode()
    if pem:
        x509.load_pem_x509_certificate(pem)  # ValueError now rather than a failed handshake later
    _swarm_ca_pem = pem or None


def swarm_ca_pem() -> bytes | None:
    return _swarm_ca_pem


def read_swarm_ca(path: str | os.PathLike) -> bytes:
    """The swarm CA certificate in `path` (the coordinator's DATA_DIR/swarm-ca.pem, copied to
    a client that bootstraps from --initial-peers alone). ValueError says what is wrong with it."""
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"swarm CA {path}: {exc.strerror or exc}") from None
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise ValueError(f"swarm CA {path}: not a PEM certificate (give the coordinator's "
                         f"{CA_CERT_FILE}, never its {CA_KEY_FILE})") from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ValueError(f"swarm CA {path}: a certificate, but not a CA's (a node's certificate? give the "
                         f"coordinator's {CA_CERT_FILE})")
    return pem
