"""Signed answers: a node's word for what it computed, which a liar report carries (issue 18).

A client's spot check (client/spot_check.py) can tell that a node answered wrong, but the
coordinator, which quarantines nodes for every client, could only count who said so: two
Sybil addresses could frame any honest node. So a node signs its answers with its member key
(protocol/identity.py), and a report carries the signed call (`AnswerEvidence`); the
coordinator checks the signature against the member's key and runs the inputs on other
members (coordinator/evidence.py). Nobody can show it an answer the node did not give.

What is signed is a call's transcript, chained so that no step can be taken out, replaced or
moved to another call:

    d0 = SHA-256(context, kind, nonce, job, blocks, SHA-256(header's JobSpec))
    dk = SHA-256(d(k-1), position of step k, digest of each tensor of step k)

where a step's tensors are its inputs then its answer, each as it crossed the wire (name,
dtype, shape, codec and encoded payload: what both sides hold), and the nonce is the node's,
fresh per call. After each answer the node sends `AnswerSignature(nonce, sig(dk))` with its
last chunk. An Inference answer depends on the whole session (the KV cache), so the evidence
is every step of the call up to the one in question; a Forward's answer on its own input
only; a checked Backward's (return_adapter or check_only) on the adapter it used, its input
and the output gradient.

A session a leaving node handed to this one by recompute (node/handoff_inbox.py) was
prefilled here with its span inputs so far, which the client had sent to the node that left.
The call that resumes it starts mid-session, so its d0 also commits to those inputs:

    d0 = SHA-256(..., SHA-256(header's JobSpec), "prefix", digest of prefix_of(inputs))

in one canonical form both sides build byte for byte (`prefix_of`), the node from the frame
it prefilled, the client from the inputs it sent; the node names that digest in every
signature of the call (`AnswerSignature.prefix`), so a client that cannot rebuild it knows
it holds no evidence. The evidence then carries the prefix, and the whole input is the
prefix followed by the steps. A session handed off as a KV cache (lossless or lossy) comes
with no inputs: the call that resumes it signs no prefix and proves nothing.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Sequence

import torch

from pollinate.protocol.errors import InvalidRequest
from pollinate.protocol.framing import MiB, FramingConfig
from pollinate.protocol.tensors import HIDDEN_STATES, EncodedTensor, TensorAssembler, encode_tensor
from pollinate.protocol.v1 import node_pb2

KINDS = ("inference", "forward", "backward")
NONCE_BYTES = 16
# Bounds of one report's evidence: a session of a few thousand tokens of SmolLM2's fp16 hidden
# states (2.3 kB per token for input and answer) fits, as does a LoRA adapter of a few million
# elements (a Backward's). Checked before anything is decoded (coordinator/evidence.py).
MAX_EVIDENCE_STEPS = 4096
MAX_EVIDENCE_BYTES = 48 * MiB
# One whole tensor per message field: evidence carries tensors unchunked.
EVIDENCE_FRAMING = FramingConfig(max_message_bytes=MAX_EVIDENCE_BYTES, min_chunk_bytes=1,
                                 max_tensor_bytes=MAX_EVIDENCE_BYTES, max_decoded_bytes=4 * MAX_EVIDENCE_BYTES)
_CONTEXT = b"pollinate-signed-answer\n"


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in fp32: how far an answer lies from a reference one."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def tensor_digest(t: EncodedTensor) -> bytes:
    h = hashlib.sha256(f"{t.name}\n{t.dtype}\n{','.join(map(str, t.shape))}\n{t.codec}\n".encode())
    h.update(t.payload)
    return h.digest()


def prefix_digest(prefix: EncodedTensor | None) -> bytes:
    """What a transcript's start commits to of its prefix (prefix_of): b"" for none."""
    return tensor_digest(prefix) if prefix is not None else b""


def prefix_of(inputs: Sequence[torch.Tensor]) -> EncodedTensor:
    """The canonical form of a resumed session's span inputs so far (its transcript's prefix):
    concatenated along the tokens, in fp32 (which holds the fp16 and bf16 values a node keeps
    exactly), uncompressed. Both sides start from the same values: what the client's wire codec
    decodes its steps to is what the node that left kept and sent (node/handoff.py kept_input)."""
    return encode_tensor(torch.cat([t.float() for t in inputs], dim=1), codec="none", name=HIDDEN_STATES)


def _start(kind: str, nonce: bytes, job: str, start: int, end: int, spec: node_pb2.JobSpec | None,
           prefix: bytes = b"") -> bytes:
    spec_digest = hashlib.sha256(spec.SerializeToString(deterministic=True)).digest() if spec is not None else b""
    # the label keeps a prefix apart from a spec digest (both 32 bytes)
    return hashlib.sha256(_CONTEXT + kind.encode() + b"\n" + nonce + job.encode() + b"\n"
                          + struct.pack(">II", start, end) + spec_digest
                          + (b"prefix" + prefix if prefix else b"")).digest()


def _step(prev: bytes, position: int, tensors: Sequence[EncodedTensor]) -> bytes:
    h = hashlib.sha256(prev + struct.pack(">Q", position))
    for t in tensors:
        h.update(tensor_digest(t))
    return h.digest()


class AnswerSigner:
    """The node's side, one per call: `sign(position, tensors)` after each answer."""

    def __init__(self, identity, kind: str, *, job: str, start: int, end: int,
                 spec: node_pb2.JobSpec | None = None, prefix: EncodedTensor | None = None) -> None:
        self.identity = identity
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        # `prefix`: a resumed session's inputs so far (prefix_of), which its cache holds
        self.prefix_digest = prefix_digest(prefix)
        self.digest = _start(kind, self.nonce, job, start, end, spec, self.prefix_digest)

    @classmethod
    def maybe(cls, identity, kind: str, **kwargs) -> AnswerSigner | None:
        """A signer, or None for a node without a member key (it signs nothing)."""
        return cls(identity, kind, **kwargs) if identity is not None else None

    def sign(self, position: int, tensors: Sequence[EncodedTensor]) -> node_pb2.AnswerSignature:
        self.digest = _step(self.digest, position, tensors)
        return node_pb2.AnswerSignature(nonce=self.nonce, signature=bytes.fromhex(self.identity.sign(self.digest)),
                                        prefix=self.prefix_digest)


class Transcript:
    """The client's side, one per call it may have to prove: every step's tensors as they
    crossed the wire and the node's last signature. `evidence()` is None when the node did
    not sign every step (a node without a key, or older than signed answers), or signed
    another prefix than `prefix` (a resumed session's inputs so far, prefix_of: the node
    resumed it from a KV cache and signs none, or it prefilled other inputs)."""

    def __init__(self, kind: str, *, job: str, start: int, end: int, spec: node_pb2.JobSpec | None = None,
                 prefix: EncodedTensor | None = None) -> None:
        self.kind, self.job, self.start, self.end, self.spec = kind, job, start, end, spec
        self.prefix = prefix
        self.prefix_digest = prefix_digest(prefix)
        self.steps: list[tuple[int, list[EncodedTensor]]] = []
        self.nonce: bytes | None = None
        self.signature = b""
        self.complete = True

    def record(self, position: int, tensors: Sequence[EncodedTensor], signed: node_pb2.AnswerSignature | None) -> None:
        if signed is None or not signed.signature or (self.nonce is not None and signed.nonce != self.nonce) \
                or signed.prefix != self.prefix_digest:
            self.complete = False
        else:
            self.nonce, self.signature = bytes(signed.nonce), bytes(signed.signature)
        self.steps.append((position, list(tensors)))

    def evidence(self) -> node_pb2.AnswerEvidence | None:
        if not self.complete or not self.steps:
            return None
        ev = node_pb2.AnswerEvidence(kind=self.kind, nonce=self.nonce, job=self.job, signature=self.signature)
        ev.blocks.start, ev.blocks.end = self.start, self.end
        if self.spec is not None:
            ev.spec.CopyFrom(self.spec)
        if self.prefix is not None:
            ev.prefix.CopyFrom(next(iter(self.prefix.chunks(EVIDENCE_FRAMING))))
        for position, tensors in self.steps:
            ev.steps.add(position=position, tensors=[next(iter(t.chunks(EVIDENCE_FRAMING))) for t in tensors])
        return ev


def read_evidence(ev: node_pb2.AnswerEvidence) -> list[tuple[int, list[EncodedTensor]]]:
    """The evidence's steps as EncodedTensors, its bounds checked (InvalidRequest), nothing
    decoded; the prefix's bytes count towards them (read it with read_prefix)."""
    if ev.kind not in KINDS:
        raise InvalidRequest(f"evidence: kind {ev.kind[:40]!r} is not one of {', '.join(KINDS)}")
    if len(ev.nonce) != NONCE_BYTES or not ev.signature or len(ev.signature) > 80:
        raise InvalidRequest("evidence: a nonce of 16 bytes and a signature are needed")
    if not ev.steps or len(ev.steps) > MAX_EVIDENCE_STEPS:
        raise InvalidRequest(f"evidence: {len(ev.steps)} steps, want 1 to {MAX_EVIDENCE_STEPS}")
    if ev.HasField("prefix") and ev.kind != "inference":
        raise InvalidRequest(f"evidence: a {ev.kind} call has no prefix (only a resumed Inference session)")
    if sum(len(t.data) for s in ev.steps for t in s.tensors) + len(ev.prefix.data) > MAX_EVIDENCE_BYTES:
        raise InvalidRequest(f"evidence: over {MAX_EVIDENCE_BYTES // MiB} MiB of tensors")
    steps = []
    for s in ev.steps:
        if not 2 <= len(s.tensors) <= 4:
            raise InvalidRequest(f"evidence: a step of {len(s.tensors)} tensors")
        steps.append((s.position, [_read_tensor(t) for t in s.tensors]))
    return steps


def read_prefix(ev: node_pb2.AnswerEvidence) -> EncodedTensor | None:
    """The evidence's prefix (a resumed session's inputs so far) as an EncodedTensor, nothing
    decoded, or None when it has none. Call read_evidence first: it bounds the prefix's bytes."""
    return _read_tensor(ev.prefix) if ev.HasField("prefix") else None


def _read_tensor(t) -> EncodedTensor:
    from pollinate.compression.codec import get_activation_codec

    if t.num_chunks != 1:
        raise InvalidRequest("evidence: tensors travel whole (one chunk each)")
    # activation codecs only (an adapter travels as "none"): no pseudo-gradient codec
    # expands a small report into gigabytes
    return TensorAssembler(EVIDENCE_FRAMING, lookup=get_activation_codec).feed(t)


def signed_by(public_key: str, ev: node_pb2.AnswerEvidence, steps: list[tuple[int, list[EncodedTensor]]],
              prefix: EncodedTensor | None = None) -> bool:
    """Does the evidence's signature sign its transcript (`prefix`, read_prefix's, then
    `steps`) by `public_key`?"""
    from pollinate.protocol.identity import verify

    digest = _start(ev.kind, bytes(ev.nonce), ev.job, ev.blocks.start, ev.blocks.end,
                    ev.spec if ev.HasField("spec") else None, prefix_digest(prefix))
    for position, tensors in steps:
        digest = _step(digest, position, tensors)
    return verify(public_key, bytes(ev.signature).hex(), digest)


def signed(messages: list, signature: node_pb2.AnswerSignature | None) -> list:
    """`messages` (an answer's reply chunks) with `signature` on the last one."""
    if signature is not None:
        messages[-1].signature.CopyFrom(signature)
    return messages
