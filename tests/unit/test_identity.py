"""A member's key pair and its signatures (protocol/identity.py): kept in its file across
restarts, a signed call accepted once, for its method and request, within the clock skew
allowed."""

from __future__ import annotations

import stat

import pytest

from pollinate.protocol.identity import (
    PUBLIC_KEY_METADATA_KEY,
    SIGNATURE_METADATA_KEY,
    CallSignatures,
    NodeIdentity,
    address_proof,
    proves_address,
)

HEARTBEAT = "/pollinate.v1.Coordinator/Heartbeat"


def test_an_identity_file_is_made_once_private_and_kept(tmp_path):
    path = tmp_path / "sub" / "node.pem"
    first = NodeIdentity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = NodeIdentity.load_or_create(path)
    assert again.public_key == first.public_key and len(first.public_key) == 66
    assert NodeIdentity.generate().public_key != first.public_key
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(ValueError, match="bad.pem"):
        NodeIdentity.load_or_create(tmp_path / "bad.pem")


def test_a_signed_call_passes_once_for_its_method_by_its_key():
    me, other = NodeIdentity.generate(), NodeIdentity.generate()
    check = CallSignatures()
    metadata = me.call_metadata(HEARTBEAT)
    assert check.verified_key(metadata, "/pollinate.v1.Coordinator/Leave") is None  # another method
    assert check.verified_key(metadata, HEARTBEAT) == me.public_key
    assert check.verified_key(metadata, HEARTBEAT) is None  # a replay
    # someone else's public key with my signature, and no signature at all
    forged = ((PUBLIC_KEY_METADATA_KEY, other.public_key), dict(me.call_metadata(HEARTBEAT)).popitem())
    assert check.verified_key(forged, HEARTBEAT) is None
    assert check.verified_key(((PUBLIC_KEY_METADATA_KEY, me.public_key),), HEARTBEAT) is None
    assert check.verified_key(((SIGNATURE_METADATA_KEY, "1.2.3"), (PUBLIC_KEY_METADATA_KEY, "zz")), HEARTBEAT) is None


def test_a_signature_covers_its_request():
    from pollinate.protocol.v1 import coordinator_pb2

    me = NodeIdentity.generate()
    check = CallSignatures()
    leave = coordinator_pb2.LeaveRequest(member_id="m-1")
    metadata = me.call_metadata("/pollinate.v1.Coordinator/Leave", leave)
    for other in (coordinator_pb2.LeaveRequest(member_id="m-2"), None):  # another request, or none
        assert check.verified_key(metadata, "/pollinate.v1.Coordinator/Leave", other) is None
    assert check.verified_key(metadata, "/pollinate.v1.Coordinator/Leave", leave) == me.public_key


def test_the_malleated_twin_of_a_used_signature_is_a_replay_too():
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256's group order
    me = NodeIdentity.generate()
    check = CallSignatures()
    metadata = dict(me.call_metadata(HEARTBEAT))
    assert check.verified_key(metadata.items(), HEARTBEAT) == me.public_key
    millis, nonce, signature = metadata[SIGNATURE_METADATA_KEY].split(".")
    r, s = decode_dss_signature(bytes.fromhex(signature))
    twin = encode_dss_signature(r, n - s).hex()
    metadata[SIGNATURE_METADATA_KEY] = f"{millis}.{nonce}.{twin}"
    assert check.verified_key(metadata.items(), HEARTBEAT) is None


def test_a_stale_signature_is_refused_and_remembered_ones_are_bounded():
    me = NodeIdentity.generate()
    late = CallSignatures(clock=lambda: 10 ** 10)  # the verifier's clock far ahead
    assert late.verified_key(me.call_metadata(HEARTBEAT), HEARTBEAT) is None
    small = CallSignatures(capacity=2)
    results = [small.verified_key(me.call_metadata(HEARTBEAT), HEARTBEAT) for _ in range(3)]
    assert results == [me.public_key, me.public_key, None]  # full of unexpired ones: refuse, not grow


def test_an_address_proof_names_its_key_and_challenge():
    me, other = NodeIdentity.generate(), NodeIdentity.generate()
    proof = address_proof(me, "c1")
    assert proves_address(me.public_key, "c1", proof)
    assert not proves_address(me.public_key, "c2", proof)
    assert not proves_address(other.public_key, "c1", proof)
    assert not proves_address(me.public_key, "c1", "")
