"""Judging a liar report by its evidence (issue 18: untrusted compute).

A report used to be only a claim: the coordinator holds no model, so it counted reporters,
and two Sybil addresses could quarantine any honest node. Now a report carries what the node
answered, signed with its member key (protocol/answers.py), and the coordinator judges it:

1. The evidence is read within bounds (protocol/answers.read_evidence: step count, bytes,
   activation codecs only) and its signature checked against the key the member joined with.
   An answer the node did not sign is refused (INVALID_ARGUMENT): nobody can put words in a
   node's mouth.
2. Up to two other members that serve the blocks compute the same thing: a Forward of the
   whole input (an Inference call's every step, as its KV cache saw them, after the prefix a
   session resumed from a recompute handoff was prefilled with; a Forward's one input) or a
   check_only Backward with the adapter the node signed. Members at the reporter's address
   are left out where the reporter is not on the coordinator's machine (a reporter does not
   get to be its own witness); the accused's address always is.
3. The verdict, comparing each answer with the signed one as the clients do
   (||signed - theirs|| / ||theirs|| against `tolerance`):
   - "verified": two members agree with each other and against the signed answer: the node
     is quarantined at once, on this one report;
   - "refuted": every member that answered agrees with the signed answer: the report is
     refused (FAILED_PRECONDITION) and nothing is recorded;
   - "unverified": nobody else could run it, or the members disagree among themselves: the
     report counts as one reporter's word, as before (`--quarantine-reporters`).

The work a report costs the swarm is bounded: one judgement at a time per reporter address
(RESOURCE_EXHAUSTED past it), MAX_RUNNING in all, each member's call within
`--quarantine-verify-timeout`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import torch

from pollinate.protocol.answers import distance, read_evidence, read_prefix, signed_by
from pollinate.protocol.errors import InvalidRequest, ResourceExhausted, one_line
from pollinate.protocol.tensors import (ADAPTER_FLAT, GRAD_INPUTS, GRAD_OUTPUTS, HIDDEN_STATES, EncodedTensor,
                                        encode_tensor, stream_tensors)
from pollinate.protocol.v1 import common_pb2, node_pb2

logger = logging.getLogger(__name__)

# Each kind's tensors per step, by name: inputs, then the answer (protocol/answers.py).
STEP_TENSORS = {
    "inference": (HIDDEN_STATES, HIDDEN_STATES),
    "forward": (HIDDEN_STATES, HIDDEN_STATES),
    "backward": (ADAPTER_FLAT, HIDDEN_STATES, GRAD_OUTPUTS, GRAD_INPUTS),
}


@dataclass(frozen=True)
class Verdict:
    verdict: str  # "verified", "refuted" or "unverified"
    detail: str  # one line: who computed what


# Judgements running at once, all reporters together.
MAX_RUNNING = 2


class EvidenceJudge:
    """`config`: a QuarantineConfig (its tolerance and verify_timeout_s)."""

    def __init__(self, config, membership, *, token: str | None, is_local=lambda host: False) -> None:
        self.config = config
        self.membership = membership
        self.token = token
        self.is_local = is_local  # host -> on the coordinator's machine (coordinator/address_check.py)
        self._running = asyncio.Semaphore(MAX_RUNNING)
        self._reporters: set[str] = set()  # reporter hosts with a judgement in progress

    async def judge(self, address: str, public_key: str, evidence: node_pb2.AnswerEvidence, *,
                    reporter_host: str) -> Verdict:
        """The verdict on `evidence` against the member at `address` (whose key is `public_key`).
        InvalidRequest: malformed, or not signed by that key."""
        steps = read_evidence(evidence)
        prefix = read_prefix(evidence)
        blocks = (evidence.blocks.start, evidence.blocks.end)
        if not 0 <= blocks[0] < blocks[1] <= self.membership.config.num_blocks:
            raise InvalidRequest(f"evidence: blocks {blocks[0]}:{blocks[1]} are not within the model's "
                                 f"{self.membership.config.num_blocks}")
        want = STEP_TENSORS[evidence.kind]
        for _, tensors in steps:
            if tuple(t.name for t in tensors) != want:
                raise InvalidRequest(f"evidence: a {evidence.kind} step carries {[t.name for t in tensors]}, "
                                     f"want {list(want)}")
        if prefix is not None and prefix.name != HIDDEN_STATES:
            raise InvalidRequest(f"evidence: a prefix named {prefix.name[:40]!r}, want {HIDDEN_STATES!r}")
        if evidence.kind == "backward" and len(steps) != 1:
            raise InvalidRequest(f"evidence: a Backward is one step, got {len(steps)}")
        if not public_key or not signed_by(public_key, evidence, steps, prefix):
            raise InvalidRequest(f"evidence: not signed by the key of the member at {one_line(address, 200)}")
        if reporter_host in self._reporters:
            raise ResourceExhausted("ReportLiar: this address's previous report is still being checked")
        self._reporters.add(reporter_host)
        try:
            async with self._running:
                return await self._rerun(address, evidence, steps, prefix, reporter_host)
        finally:
            self._reporters.discard(reporter_host)

    def _witnesses(self, address: str, start: int, end: int, reporter_host: str) -> list:
        """Up to two members other than the accused serving blocks [start, end), on distinct
        hosts where they can be, none at the reporter's address unless it is this machine's."""
        accused = self.membership.member_at(address)
        accused_host = accused.record.source_host if accused is not None else ""
        members = [m for m in self.membership.members.values()
                   if m.record.address != address and m.record.span.start <= start and end <= m.record.span.end
                   and (self.is_local(reporter_host) or m.record.source_host != reporter_host)]
        # other hosts first, then the accused's own (one machine's lab)
        members.sort(key=lambda m: (m.record.source_host == accused_host, m.record.address))
        chosen, hosts = [], set()
        for m in members:
            if m.record.source_host not in hosts:
                chosen.append(m)
                hosts.add(m.record.source_host)
        for m in members:  # one host only: two members of it still tell more than one
            if len(chosen) < 2 and m not in chosen:
                chosen.append(m)
        return chosen[:2]

    async def _rerun(self, address: str, evidence, steps, prefix, reporter_host: str) -> Verdict:
        start, end = evidence.blocks.start, evidence.blocks.end
        decoded = await asyncio.to_thread(_decode_steps, evidence.kind, steps, prefix)
        signed_answer = decoded["answer"]
        witnesses = [m.record.address for m in self._witnesses(address, start, end, reporter_host)]
        # the inputs as every witness gets them, encoded once
        names = (ADAPTER_FLAT, HIDDEN_STATES, GRAD_OUTPUTS) if evidence.kind == "backward" else (HIDDEN_STATES,)
        encoded = [await asyncio.to_thread(encode_tensor, decoded[n], codec="none", name=n) for n in names]
        chunks = [c for e in encoded for c in e.chunks()]
        got = await asyncio.gather(*(self._ask(w, evidence, chunks, decoded["answer"]) for w in witnesses),
                                   return_exceptions=True)
        answers = []  # (member address, its answer)
        for witness, out in zip(witnesses, got):
            if isinstance(out, BaseException):  # grpc.aio.AioRpcError, a timeout, a malformed reply: no opinion
                logger.info("liar report on %s: %s could not re-run it: %s", one_line(address, 200), witness,
                            one_line(f"{type(out).__name__}: {out}", 200))
            else:
                answers.append((witness, out))
        tol = self.config.tolerance
        against = [(a, distance(signed_answer, out)) for a, out in answers]
        detail = ", ".join(f"{a}: {d:.3g}" for a, d in against) or "no other member could run it"
        wrong = [d > tol for _, d in against]
        if len(answers) >= 2 and all(wrong) and distance(answers[0][1], answers[1][1]) <= tol:
            return Verdict("verified", f"the signed answer differs from {detail} (tolerance {tol:g})")
        if answers and not any(wrong):
            return Verdict("refuted", f"the signed answer agrees with {detail} (tolerance {tol:g})")
        return Verdict("unverified", f"distances {detail} (tolerance {tol:g})")

    async def _ask(self, address: str, evidence, chunks: list, signed_answer: torch.Tensor) -> torch.Tensor:
        """The witness at `address`'s answer to the evidence's inputs (`chunks`), cut to the
        positions `signed_answer` covers."""
        from pollinate.protocol.channels import open_channel, peer_channel_config
        from pollinate.protocol.v1 import node_pb2_grpc

        blocks = common_pb2.Span(start=evidence.blocks.start, end=evidence.blocks.end)
        spec = evidence.spec if evidence.HasField("spec") else None
        channel = open_channel(address, peer_channel_config(self.token))
        try:
            stub = node_pb2_grpc.NodeStub(channel)
            if evidence.kind == "backward":
                header = node_pb2.BackwardHeader(job=evidence.job, blocks=blocks, spec=spec, check_only=True)
                requests = [node_pb2.BackwardRequest(header=header)] + [node_pb2.BackwardRequest(tensor=c) for c in chunks]
                outs = await stream_tensors(stub.Backward, requests, self.config.verify_timeout_s)
            else:
                header = node_pb2.ForwardHeader(job=evidence.job, blocks=blocks, reply_codec="none")
                requests = [node_pb2.ForwardRequest(header=header)] + [node_pb2.ForwardRequest(tensor=c) for c in chunks]
                outs = await stream_tensors(stub.Forward, requests, self.config.verify_timeout_s)
        finally:
            await channel.close()
        if len(outs) != 1:
            raise InvalidRequest(f"{address} answered {len(outs)} tensors")
        out = outs[0]
        if evidence.kind != "backward" and out.dim() == 3:  # the positions the signed answer covers
            out = out[:, -signed_answer.shape[1]:]
        if out.shape != signed_answer.shape:
            raise InvalidRequest(f"{address} answered shape {list(out.shape)}, the signed answer has "
                                 f"{list(signed_answer.shape)}")
        return out


def _decode_steps(kind: str, steps: list[tuple[int, list[EncodedTensor]]],
                  prefix: EncodedTensor | None = None) -> dict[str, torch.Tensor]:
    """The inputs to re-run (a resumed session's `prefix`, then its steps') and the signed
    answer to compare, decoded (InvalidRequest if they do not fit together). Torch work: run
    in a thread."""
    if kind == "backward":
        (_, tensors), = steps
        flat, hidden, grad_out, answer = (t.decode() for t in tensors)
        if flat.dim() != 1 or hidden.dim() != 3 or grad_out.shape != hidden.shape or answer.shape != hidden.shape:
            raise InvalidRequest("evidence: a Backward's tensors do not fit together")
        return {ADAPTER_FLAT: flat, HIDDEN_STATES: hidden, GRAD_OUTPUTS: grad_out, "answer": answer}
    if kind == "forward":  # stateless: the last input alone gave the last answer
        steps = steps[-1:]
    inputs, position = [], 0
    if prefix is not None:
        x = prefix.decode()
        if x.dim() != 3:
            raise InvalidRequest(f"evidence: a prefix of shape {list(x.shape)}, want [batch, tokens, hidden]")
        inputs.append(x)
        position = x.shape[1]
    for step_position, (given, answer) in steps:
        if kind == "inference" and step_position != position:
            raise InvalidRequest(f"evidence: a step at position {step_position}, want {position} (an Inference "
                                 f"call's steps from position 0 or its prefix's end, none left out)")
        x, answer = given.decode(), answer.decode()
        if x.dim() != 3 or answer.shape != x.shape or (inputs and x.shape[::2] != inputs[0].shape[::2]):
            raise InvalidRequest("evidence: a step's input and answer do not fit together")
        inputs.append(x)
        position += x.shape[1]
    return {HIDDEN_STATES: torch.cat(inputs, dim=1), "answer": answer}
