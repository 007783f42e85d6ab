"""Signed answers (protocol/answers.py, issue 18): what a node signs is what a client can show
the coordinator, and nothing else verifies: not another key, another call's nonce, a changed
tensor, a step left out, moved or added."""

from __future__ import annotations

import pytest
import torch

from pollinate.protocol import answers
from pollinate.protocol.answers import (AnswerSigner, Transcript, prefix_of, read_evidence, read_prefix,
                                          signed_by)
from pollinate.protocol.errors import InvalidRequest
from pollinate.protocol.identity import NodeIdentity
from pollinate.protocol.tensors import HIDDEN_STATES, encode_tensor
from pollinate.protocol.v1 import node_pb2


def _session(identity, steps=3):
    """A node's signer and a client's transcript of the same Inference call."""
    signer = AnswerSigner(identity, "inference", job="j", start=1, end=3)
    transcript = Transcript("inference", job="j", start=1, end=3)
    position = 0
    for n in range(steps):
        x = encode_tensor(torch.randn(1, 2 if n else 5, 8), codec="fp16", name=HIDDEN_STATES)
        y = encode_tensor(torch.randn(1, 2 if n else 5, 8), codec="fp16", name=HIDDEN_STATES)
        transcript.record(position, [x, y], signer.sign(position, [x, y]))
        position += x.shape[1]
    return transcript


def _verifies(identity, ev) -> bool:
    return signed_by(identity.public_key, ev, read_evidence(ev))


def test_the_nodes_signature_verifies_and_nothing_changed_does():
    node = NodeIdentity.generate()
    ev = _session(node).evidence()
    assert ev is not None and len(ev.steps) == 3 and _verifies(node, ev)
    assert not _verifies(NodeIdentity.generate(), ev)  # another key

    def changed(edit) -> bool:
        copy = node_pb2.AnswerEvidence()
        copy.CopyFrom(ev)
        edit(copy)
        return _verifies(node, copy)

    def flip(copy):
        data = bytearray(copy.steps[1].tensors[1].data)
        data[3] ^= 1
        copy.steps[1].tensors[1].data = bytes(data)

    assert not changed(flip)  # one bit of an answer
    assert not changed(lambda c: c.steps.pop(0))  # a step left out
    assert not changed(lambda c: setattr(c.steps[2], "position", 9))  # moved
    assert not changed(lambda c: c.steps.add().CopyFrom(c.steps[0]))  # added
    assert not changed(lambda c: setattr(c, "job", "other"))
    assert not changed(lambda c: setattr(c.blocks, "end", 4))
    assert not changed(lambda c: setattr(c, "kind", "forward"))
    other = _session(node).evidence()  # the same node's other call: its own nonce
    assert not changed(lambda c: setattr(c, "nonce", other.nonce))


def test_a_call_the_node_did_not_sign_every_step_of_gives_no_evidence():
    node = NodeIdentity.generate()
    signer = AnswerSigner(node, "forward", job="", start=0, end=2)
    t = Transcript("forward", job="", start=0, end=2)
    x = encode_tensor(torch.randn(1, 3, 8), codec="none", name=HIDDEN_STATES)
    t.record(0, [x, x], signer.sign(0, [x, x]))
    t.record(1, [x, x], None)  # an unsigned answer (a node without a key, or an old one)
    assert t.evidence() is None
    assert AnswerSigner.maybe(None, "forward", job="", start=0, end=2) is None


def test_evidence_out_of_bounds_is_refused_before_anything_is_decoded():
    ev = _session(NodeIdentity.generate(), steps=1).evidence()
    for edit, words in ((lambda c: setattr(c, "kind", "bogus"), "kind"),
                        (lambda c: setattr(c, "nonce", b"short"), "nonce"),
                        (lambda c: c.steps[0].tensors.pop(), "tensors"),
                        (lambda c: setattr(c.steps[0].tensors[0], "codec", "cocktail"), "activation codec"),
                        (lambda c: setattr(c.steps[0].tensors[0], "num_chunks", 2), "whole")):
        copy = node_pb2.AnswerEvidence()
        copy.CopyFrom(ev)
        edit(copy)
        with pytest.raises(InvalidRequest, match=words):
            read_evidence(copy)


def _resumed(identity, prefix_steps, *, signed_prefix=None, steps=2):
    """A node that resumed a handed-off session prefilled with `signed_prefix` (the inputs it
    was handed, prefix_of) and a client that rebuilt the prefix from `prefix_steps`, the
    inputs it had sent to the node that left."""
    client_prefix = prefix_of(prefix_steps)
    signer = AnswerSigner(identity, "inference", job="j", start=1, end=3,
                          prefix=client_prefix if signed_prefix is None else prefix_of(signed_prefix))
    transcript = Transcript("inference", job="j", start=1, end=3, prefix=client_prefix)
    position = sum(t.shape[1] for t in prefix_steps)
    for _ in range(steps):
        x = encode_tensor(torch.randn(1, 1, 8), codec="fp16", name=HIDDEN_STATES)
        y = encode_tensor(torch.randn(1, 1, 8), codec="fp16", name=HIDDEN_STATES)
        transcript.record(position, [x, y], signer.sign(position, [x, y]))
        position += 1
    return transcript


def _verifies_with_prefix(identity, ev) -> bool:
    steps = read_evidence(ev)
    return signed_by(identity.public_key, ev, steps, read_prefix(ev))


def test_a_resumed_session_commits_to_the_inputs_it_was_prefilled_with():
    """The client rebuilds the prefix from the steps it sent, decoded from the wire (fp16 here,
    in fp32 tensors); the node from the frame it was handed (the same values kept in fp16):
    the same digest. The evidence carries the prefix, and nothing else verifies: another value,
    a step left out or two swapped, no prefix at all."""
    node = NodeIdentity.generate()
    sent = [encode_tensor(torch.randn(1, n, 8), codec="fp16", name=HIDDEN_STATES).decode() for n in (5, 1, 1)]
    assert all(t.dtype == torch.float32 for t in sent)
    kept = [t.half() for t in sent]  # node/handoff.py kept_input: fp16 holds them exactly
    ev = _resumed(node, sent, signed_prefix=kept).evidence()
    assert ev is not None and ev.HasField("prefix") and [s.position for s in ev.steps] == [7, 8]
    assert _verifies_with_prefix(node, ev)
    assert not signed_by(node.public_key, ev, read_evidence(ev))  # the prefix left out
    ev.ClearField("prefix")
    assert not _verifies_with_prefix(node, ev)

    changed = [sent[0].clone(), *sent[1:]]
    changed[0][0, 2, 3] += 0.5
    for other in (changed, sent[:2], [sent[0], sent[2], sent[1]]):
        # the node signed `other`: the client's prefix is not what it signed...
        assert _resumed(node, sent, signed_prefix=[t.clone() for t in other]).evidence() is None
        # ... and evidence made with `other` where the node signed `sent` does not verify
        forged = _resumed(node, sent, signed_prefix=kept).evidence()
        forged.prefix.CopyFrom(next(iter(prefix_of(other).chunks())))
        assert not _verifies_with_prefix(node, forged)


def test_a_resumed_session_the_node_signed_without_a_prefix_gives_no_evidence():
    """After a KV handoff the node has no inputs and signs no prefix: the client, which built
    one, holds nothing it could prove (and says so rather than sending a report that fails)."""
    node = NodeIdentity.generate()
    sent = [torch.randn(1, 4, 8)]
    signer = AnswerSigner(node, "inference", job="", start=0, end=2)
    t = Transcript("inference", job="", start=0, end=2, prefix=prefix_of(sent))
    x = encode_tensor(torch.randn(1, 1, 8), codec="none", name=HIDDEN_STATES)
    t.record(4, [x, x], signer.sign(4, [x, x]))
    assert t.evidence() is None


def test_a_prefix_counts_towards_the_evidence_bounds(monkeypatch):
    node = NodeIdentity.generate()
    ev = _resumed(node, [torch.randn(1, 3, 8)]).evidence()
    assert len(read_evidence(ev)) == 2
    # room for the steps' bytes, not for the prefix's too
    monkeypatch.setattr(answers, "MAX_EVIDENCE_BYTES", sum(len(t.data) for s in ev.steps for t in s.tensors) + 10)
    with pytest.raises(InvalidRequest, match="MiB"):
        read_evidence(ev)
    monkeypatch.undo()
    for edit, words in ((lambda c: setattr(c, "kind", "forward"), "no prefix"),
                        (lambda c: setattr(c.prefix, "codec", "cocktail"), "activation codec"),
                        (lambda c: setattr(c.prefix, "num_chunks", 2), "whole")):
        copy = node_pb2.AnswerEvidence()
        copy.CopyFrom(ev)
        edit(copy)
        with pytest.raises(InvalidRequest, match=words):
            read_prefix(copy) if words != "no prefix" else read_evidence(copy)
