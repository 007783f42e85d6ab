"""Spot checks of a session's hops on other replicas (issue 18: untrusted compute).

A node may answer with wrong activations: bad hardware, a bug, or on purpose. After a share
(`ClientConfig.spot_check_rate`) of a session's hop steps, the client sends that hop's whole
input so far (the history it keeps for failover, and this step's input) as one Forward to a
route of other peers covering the same blocks, and compares the last positions of their
output with what the hop answered. Two answers agree when ||a - b|| / ||b|| is at most
`spot_check_tolerance`: 0.03 by default, far above what honest nodes differ by (fp32 and a
cached step against a whole-sequence pass: ~1e-6; fp16 on the wire: ~1e-3; a bf16 GPU
against an fp32 CPU: ~1e-2) and far below a perturbation that changes tokens.

One disagreement does not say who lied: the checker may be the liar. A second route, avoiding
both, decides: the side the two others agree against is the liar. The liar is excluded from
the client's routes for good (`Swarm.liars`) and the session rebuilds its route from that hop
on, replaying the correct history, so every later step runs on honest caches. With no third
opinion available the disagreement is logged and counted (`unresolved`), and nobody is banned.

Training (issue 18): the trainer checks the same share of its Backward hops
(client/trainer.py). Replicas train their own adapters between DiLoCo rounds, so another
replica's gradient is not comparable as such: the checked hop's Backward returns the adapter
it computed with (BackwardHeader.return_adapter, one fp32 vector copied in the same call, so
no other trainer's step or landing round can come between), and the checkers (other replicas of
exactly the hop's blocks) compute the input gradient for the same input and output gradient
with that adapter in place of their own (BackwardHeader.check_only: nothing accumulated or
stepped, their adapter restored). Honest answers then differ by arithmetic and the wire
codec only; they are compared within `spot_check_grad_tolerance`. A hop found lying is
redone on another replica, as a failed hop is; its adapter gradients stay on the liar.

With a coordinator (`ClientConfig.coordinator`), the liar is reported there (ReportLiar, with
the blocks, the distance, the agreeing replicas and the liar's signed answer: every node signs
what it answers, protocol/answers.py). The coordinator checks the signature and runs the
inputs on other members (coordinator/evidence.py); where they agree against the signed answer
it quarantines the node at once (coordinator/quarantine.py), and every client that reads the
quarantine list (with its DHT records) leaves it out of its routes.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

import torch

from pollinate.client.routing import Hop, NoRouteError, PeerSpan
from pollinate.protocol.answers import Transcript, distance
from pollinate.protocol.errors import PollinateError, translate_rpc_errors
from pollinate.protocol.tensors import ADAPTER_FLAT, GRAD_OUTPUTS, HIDDEN_STATES, encode_tensor, stream_tensors
from pollinate.protocol.v1 import common_pb2, node_pb2

logger = logging.getLogger(__name__)


@dataclass
class SpotCheckStats:
    checks: int = 0  # Forward (inference) checks
    backward_checks: int = 0  # Backward (training) checks
    disagreements: int = 0
    liars: int = 0
    unresolved: int = 0
    # the largest distance between two answers that agreed: what honest nodes differ by here
    max_agreeing_distance: float = 0.0


class AnsweredWrong(PollinateError):
    """A spot check found the hop's answer wrong: the trainer redoes the hop elsewhere."""


class SpotChecker:
    """The client's spot checks: shared by its sessions (one Swarm, one checker)."""

    def __init__(self, swarm, *, rate: float, tolerance: float, grad_tolerance: float | None = None,
                 seed: int | None = None) -> None:
        self.swarm = swarm
        self.rate = rate
        self.tolerance = tolerance
        self.grad_tolerance = tolerance if grad_tolerance is None else grad_tolerance
        self.rng = random.Random(seed)
        self.stats = SpotCheckStats()

    def due(self) -> bool:
        return self.rate > 0 and self.rng.random() < self.rate

    async def check(self, hop: Hop, inputs: torch.Tensor, answer: torch.Tensor, *, job: str = "",
                    transcript: Transcript | None = None) -> PeerSpan | None:
        """Check `answer` (the hop's output for the last answer.shape[1] positions of `inputs`)
        on other replicas; the peer found lying (the hop's or a checker's), or None.
        `transcript`: what the hop signed, shown to the coordinator if it lied."""
        self.stats.checks += 1
        tail = answer.shape[1]

        async def other(avoid: frozenset[str]):
            got = await self._other_answer(hop, inputs, job, avoid=avoid)
            return None if got is None else (got[0], got[1][:, -tail:], got[2])

        return await self._judge(hop, answer, other, tolerance=self.tolerance, what="answer", transcript=transcript)

    async def check_backward(self, hop: Hop, hidden: torch.Tensor, grad_out: torch.Tensor, answer: torch.Tensor,
                             *, job: str, spec, flat: torch.Tensor,
                             transcript: Transcript | None = None) -> PeerSpan | None:
        """Check a training hop's Backward answer (the gradient of its input `hidden` for the
        gradient `grad_out` of its output) on other replicas of exactly its blocks: check_only
        Backwards that compute with `flat`, the adapter the hop's Backward returned with its
        answer (return_adapter), and accumulate nothing. The peer found lying, or None."""
        self.stats.backward_checks += 1

        async def other(avoid: frozenset[str]):
            return await self._other_gradient(hop, hidden, grad_out, job, spec, flat, avoid=avoid)

        return await self._judge(hop, answer, other, tolerance=self.grad_tolerance, what="gradient",
                                 transcript=transcript)

    async def _judge(self, hop: Hop, answer: torch.Tensor, other, *, tolerance: float, what: str,
                     transcript: Transcript | None) -> PeerSpan | None:
        """Compare `answer` with another route's (`other(avoid)`: (route, its answer, what its
        one node signed or None)); on disagreement a third route decides who lied, who is then
        marked (and reported, with what it signed) as a liar."""
        first = await other(frozenset({hop.peer.peer_id}))
        if first is None:
            return None  # no other replica of these blocks: nothing to compare with
        route1, out1, transcript1 = first
        d1 = distance(answer, out1)
        if d1 <= tolerance:
            self.stats.max_agreeing_distance = max(self.stats.max_agreeing_distance, d1)
            return None
        self.stats.disagreements += 1
        avoid = frozenset({hop.peer.peer_id, *(h.peer.peer_id for h in route1)})
        second = await other(avoid)
        if second is None:
            self.stats.unresolved += 1
            logger.warning("spot check: %s and %s disagree on blocks %d:%d (%s distance %.3g) and no third replica "
                           "can tell which is right", hop.peer.address, _names(route1), hop.start, hop.end, what, d1)
            return None
        route2, out2, _ = second
        d2, d12 = distance(answer, out2), distance(out1, out2)
        if d2 > tolerance and d12 <= tolerance:
            liar = hop.peer
            self.stats.max_agreeing_distance = max(self.stats.max_agreeing_distance, d12)
        elif d2 <= tolerance and len(route1) == 1:
            liar = route1[0].peer  # the first checker disagreed with two others
            self.stats.max_agreeing_distance = max(self.stats.max_agreeing_distance, d2)
        else:
            self.stats.unresolved += 1
            logger.warning("spot check of blocks %d:%d inconclusive: %s distances %.3g (hop vs %s), %.3g (hop vs %s), "
                           "%.3g (between them)", hop.start, hop.end, what, d1, _names(route1), d2, _names(route2), d12)
            return None
        self.stats.liars += 1
        agreeing = [h.peer.address for h in route2] + ([h.peer.address for h in route1] if liar is hop.peer
                                                      else [hop.peer.address])
        signed = transcript if liar is hop.peer else transcript1
        self.swarm.mark_liar(liar, f"its {what} for blocks {hop.start}:{hop.end} differs from two other replicas' "
                                   f"(distances {d1:.3g} and {d2:.3g}, tolerance {tolerance:g})",
                             evidence={"blocks": (hop.start, hop.end), "distance": min(d1, d2) if liar is hop.peer
                                       else d1, "tolerance": tolerance, "checkers": agreeing,
                                       "signed": signed.evidence() if signed is not None else None})
        return liar

    async def _other_gradient(self, hop: Hop, hidden: torch.Tensor, grad_out: torch.Tensor, job: str, spec,
                              flat: torch.Tensor, *, avoid: frozenset[str]):
        """(route, input gradient, what it signed) of one peer other than `avoid` that serves
        exactly the hop's blocks (the adapter `flat` is the hop's: it fits no other split);
        None if none answers."""
        try:
            route = await self.swarm.route(hop.start, hop.end, exclude=avoid)
        except NoRouteError:
            return None
        if len(route) != 1:
            logger.info("Backward spot check of blocks %d:%d: no other single replica of them (%s)", hop.start,
                        hop.end, _names(route))
            return None
        (checker,) = route
        header = node_pb2.BackwardHeader(job=job, blocks=common_pb2.Span(start=hop.start, end=hop.end), spec=spec,
                                         check_only=True)
        tensors = [await asyncio.to_thread(encode_tensor, t, codec="none", name=name)
                   for t, name in ((flat, ADAPTER_FLAT), (hidden, HIDDEN_STATES), (grad_out, GRAD_OUTPUTS))]
        requests = [node_pb2.BackwardRequest(header=header)] + [
            node_pb2.BackwardRequest(tensor=c) for enc in tensors for c in enc.chunks()]
        raw: list = []
        try:
            with translate_rpc_errors(peer=checker.peer.address):
                outs = await stream_tensors(self.swarm.stub(checker.peer.address).Backward, requests,
                                            self.swarm.config.step_timeout_s, raw=raw)
            if len(outs) != 1:
                raise PollinateError(f"{checker.peer.address} answered the check with {len(outs)} tensors")
        except (PollinateError, asyncio.TimeoutError, OSError) as e:
            logger.info("Backward spot check of blocks %d:%d could not run on %s: %s", hop.start, hop.end,
                        checker.peer.address, e)
            return None
        signed = Transcript("backward", job=job, start=hop.start, end=hop.end, spec=spec)
        signed.record(0, [*tensors, raw[0][0]], raw[0][1])
        return route, outs[0], signed

    async def _other_answer(self, hop: Hop, inputs: torch.Tensor, job: str, *, avoid: frozenset[str]):
        """(route, output, what its node signed where the route is one node) of a Forward of
        `inputs` through peers other than `avoid`, or None."""
        try:
            route = await self.swarm.route(hop.start, hop.end, exclude=avoid)
        except NoRouteError:
            return None
        x, signed = inputs, None
        try:
            for h in route:
                x, signed = await self._forward(h, x, job)
        except (PollinateError, asyncio.TimeoutError, OSError) as e:
            logger.info("spot check of blocks %d:%d could not run on %s: %s", hop.start, hop.end, _names(route), e)
            return None
        return route, x, signed if len(route) == 1 else None

    async def _forward(self, hop: Hop, hidden: torch.Tensor, job: str) -> tuple[torch.Tensor, Transcript]:
        cfg = self.swarm.config
        header = node_pb2.ForwardHeader(job=job, blocks=common_pb2.Span(start=hop.start, end=hop.end),
                                        reply_codec=cfg.wire_codec)
        encoded = await asyncio.to_thread(encode_tensor, hidden, codec=cfg.wire_codec, name=HIDDEN_STATES)
        requests = [node_pb2.ForwardRequest(header=header)] + [node_pb2.ForwardRequest(tensor=c) for c in encoded.chunks()]
        raw: list = []
        with translate_rpc_errors(peer=hop.peer.address):
            outs = await stream_tensors(self.swarm.stub(hop.peer.address).Forward, requests, cfg.step_timeout_s,
                                        raw=raw)
        if len(outs) != 1:
            raise PollinateError(f"{hop.peer.address} answered the spot check's Forward with {len(outs)} tensors")
        signed = Transcript("forward", job=job, start=hop.start, end=hop.end)
        signed.record(0, [encoded, raw[0][0]], raw[0][1])
        return outs[0], signed


def _names(route: list[Hop]) -> str:
    return " -> ".join(h.peer.address for h in route)
