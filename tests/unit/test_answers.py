"""Signed answers (protocol/answers.py, issue 18): what a node signs is what a client can show
the coordinator, and nothing else verifies: not another key, another call's nonce, a changed
tensor, a step left out, moved or added."""

from __future__ import annotations

import pytest
import torch

from pollinate.protocol.answers import AnswerSigner, Transcript, read_evidence, signed_by
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
