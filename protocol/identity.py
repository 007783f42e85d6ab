"""A member's long-term identity: an ECDSA P-256 key pair, and the signatures made with it.

Issue 18 ("identity, not only a shared token"): the coordinator binds a membership to the
public key that joined, and a call in a member's name (Heartbeat, Leave, BeginRound,
CommitRound, the data-TLS certificate request) must carry a fresh signature by that key:

    identity = NodeIdentity.load_or_create(path)       # PEM, mode 0600; a restart keeps it
    stub.Join(request, metadata=token_metadata(t) + identity.call_metadata(JOIN_METHOD, request))

A call's signature covers its full method name, its request (SHA-256 of the deterministic
serialization; a stream's signature covers no message), a timestamp and a random nonce; the
server (`CallSignatures`) accepts it within MAX_SKEW_S of its clock and only once, so a
signature read off a plaintext link opens no other call, no second one, and no other request. The coordinator proves a
holder alive by a challenge its Health signs (`address_proof`). The same key is the node's
TLS key: with --data-tls the swarm CA certifies it for the node's address (data_tls.py).

P-256 rather than Ed25519: every TLS stack gRPC may link against serves ECDSA P-256
certificates; Ed25519 certificates are not accepted by all of them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

logger = logging.getLogger(__name__)

# Metadata keys of a signed call (lowercase ASCII, as gRPC requires).
PUBLIC_KEY_METADATA_KEY = "x-pollinate-member-public-key"
SIGNATURE_METADATA_KEY = "x-pollinate-member-signature"
# How far a signed call's timestamp may lie from the verifier's clock, seconds. 300 s, as
# Kerberos allows: volunteers' clocks are NTP-synchronised, not exact.
MAX_SKEW_S = 300.0
# Signatures remembered against replay (each for 2 x MAX_SKEW_S); past this many the server
# refuses signed calls until old ones expire, rather than grow without bound. A member signs
# about one call per heartbeat period: 100,000 covers thousands of members.
MAX_REMEMBERED_SIGNATURES = 100_000
_CALL_CONTEXT = b"pollinate-member-call\n"
_PROOF_CONTEXT = b"pollinate-address-proof\n"


class NodeIdentity:
    """An ECDSA P-256 private key and its public key's text form (`public_key`: the hex of
    the compressed point, 66 characters), the member's identity in the swarm."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError(f"a node identity is a P-256 key, not {private_key.curve.name}")
        self._key = private_key
        self.public_key = private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint).hex()

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> NodeIdentity:
        """The identity in `path` (a PEM private key); a new one written there (mode 0600,
        atomically, so two processes racing for one file end with the same key) if none."""
        path = Path(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fresh = cls.generate()
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(fresh.private_pem())
            try:
                os.link(tmp, path)  # fails if another process created it first: keep theirs
                logger.info("new key pair %s written to %s", fresh.fingerprint, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"identity file {path}: not an unencrypted PEM private key ({e})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"identity file {path}: not an ECDSA key")
        return cls(key)

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        return self._key

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def private_pem(self) -> bytes:
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    def sign(self, data: bytes) -> str:
        return self._key.sign(data, ec.ECDSA(hashes.SHA256())).hex()

    def call_metadata(self, method: str, request=None) -> tuple[tuple[str, str], ...]:
        """Metadata that signs one call of `method` ("/pollinate.v1.Coordinator/Heartbeat")
        with `request` (a protobuf message; None for a stream)."""
        stamp = f"{int(time.time() * 1000)}.{secrets.token_hex(8)}"
        signature = self.sign(_call_message(method, stamp, request))
        return ((PUBLIC_KEY_METADATA_KEY, self.public_key), (SIGNATURE_METADATA_KEY, f"{stamp}.{signature}"))


def fingerprint(public_key: str) -> str:
    """A short name of a public key for logs and status: 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_key.encode()).hexdigest()[:16]


def public_key_object(public_key: str) -> ec.EllipticCurvePublicKey:
    """ValueError unless `public_key` is a compressed P-256 point in hex."""
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes.fromhex(public_key))
    except (ValueError, TypeError):
        raise ValueError("not a compressed P-256 public key in hex") from None


def verify(public_key: str, signature: str, data: bytes) -> bool:
    """Does `signature` (hex DER) sign `data` by `public_key`? False for anything malformed."""
    try:
        public_key_object(public_key).verify(bytes.fromhex(signature), data, ec.ECDSA(hashes.SHA256()))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _call_message(method: str, stamp: str, request) -> bytes:
    digest = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest() if request is not None else ""
    return _CALL_CONTEXT + method.encode() + b"\n" + stamp.encode() + b"\n" + digest.encode()


def _metadata_value(metadata: Iterable | None, key: str) -> str | None:
    for item in metadata or ():
        if item[0] == key:
            value = item[1]
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return None


class CallSignatures:
    """The server's check of signed calls: `verified_key(metadata, method, request)` is the
    public key that signed this call of `method` with `request` (None: a stream), or None (no
    signature, a bad one, a stale timestamp, or one already used)."""

    def __init__(self, *, max_skew_s: float = MAX_SKEW_S, capacity: int = MAX_REMEMBERED_SIGNATURES,
                 clock=time.time) -> None:
        self.max_skew_s = max_skew_s
        self.capacity = capacity
        self._clock = clock
        self._seen: dict[str, float] = {}  # "key.millis.nonce" -> when it may be forgotten

    def verified_key(self, metadata: Iterable | None, method: str, request=None) -> str | None:
        public_key = _metadata_value(metadata, PUBLIC_KEY_METADATA_KEY)
        signed = _metadata_value(metadata, SIGNATURE_METADATA_KEY)
        if not public_key or not signed or len(public_key) > 200 or len(signed) > 400:
            return None
        millis, _, rest = signed.partition(".")
        nonce, _, signature = rest.partition(".")
        if not millis.isdigit() or not nonce or not signature:
            return None
        now = self._clock()
        if abs(int(millis) / 1000 - now) > self.max_skew_s:
            return None
        # Remembered by key and stamp, not by signature: an ECDSA signature (r, s) has a twin
        # (r, n - s) that verifies too, so a replay could otherwise pass as new.
        seen = f"{public_key}.{millis}.{nonce}"
        if seen in self._seen:
            return None  # a replay
        if not verify(public_key, signature, _call_message(method, f"{millis}.{nonce}", request)):
            return None
        if not self._remember(seen, now):
            return None
        return public_key

    def _remember(self, seen: str, now: float) -> bool:
        if len(self._seen) >= self.capacity:
            self._seen = {s: t for s, t in self._seen.items() if t > now}
            if len(self._seen) >= self.capacity:
                logger.warning("%d signed calls within %.0f s: refusing more until some expire",
                               len(self._seen), 2 * self.max_skew_s)
                return False
        self._seen[seen] = now + 2 * self.max_skew_s
        return True


def address_proof(identity: NodeIdentity, challenge: str) -> str:
    """A node's Health answer to the coordinator's challenge: its signature of it."""
    return identity.sign(_PROOF_CONTEXT + challenge.encode())


def proves_address(public_key: str, challenge: str, proof: str) -> bool:
    return bool(proof) and verify(public_key, proof, _PROOF_CONTEXT + challenge.encode())
