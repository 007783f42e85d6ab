"""The trainer's side of fine-tuning: batches through the swarm forward, the loss here,
the gradient back through the swarm; the nodes hold and step the job's adapters.

One training step = `spec.micro_batches` micro-batches. Per micro-batch: embed locally,
Forward through each hop of a route with the job's name and spec (the hop's input is kept
here, and, under a fresh keep_id, on the node too), logits and loss locally, then Backward
through the hops in reverse, each hop getting the gradient of its output and the keep_id
of its input (the node recomputes its forward from the input it kept, see
node/training.py) and returning the gradient of its input. A node that no longer holds the
input (evicted, expired, or a replacement replica) answers InputNotKept and gets the input
again, as every Backward did before keep ids. The embeddings are frozen, so the first
hop's Backward asks for no input gradient (skip_grad_inputs).

Wire codecs (issue 12): `wire_codec` for the hidden states (Forward in and out),
`grad_codec` for the gradients (Backward in and out); docs/compression.md compares them.

Failures (a peer unreachable, timed out, or killed): a hop that fails during Forward bans
the peer and the micro-batch's Forward is retried on a new route. A hop that fails during
Backward is replaced by another replica of its blocks (a new route for [start, end), run
forward from the hop's kept input to get each new hop's input) and only that hop's Backward
is redone there: the hops after it already accumulated this micro-batch and are not asked
again, so no node counts it twice. Replicas train independently (issue 5; DiLoCo rounds
synchronise them, issue 6): the replacement applies its own adapter for the job and the
trainer copies nothing between replicas. The gradient of the failed hop's output was
computed downstream from the failed replica's output, so that one micro-batch's gradient
on the replacement is taken at the other replica's activations; every later micro-batch
routes through the replacement alone. Errors that are the caller's own (a bad request, a
job clash) stop the trainer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass, field

import torch

from pollinate.client.routing import Hop
from pollinate.client.training_data import causal_lm_loss, collate
from pollinate.protocol.shared import JobSpec
from pollinate.protocol.errors import InputNotKept, InvalidRequest, PollinateError, translate_rpc_errors
from pollinate.protocol.answers import Transcript
from pollinate.protocol.tensors import (ADAPTER_FLAT, GRAD_INPUTS, GRAD_OUTPUTS, HIDDEN_STATES, EncodedTensor,
                                        TensorAssembler, encode_tensor, stream_tensors)
from pollinate.protocol.v1 import common_pb2, node_pb2

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    job: str  # job name; nodes keep its adapters under this name
    spec: JobSpec = field(default_factory=JobSpec)  # adapter and inner-optimizer settings
    steps: int = 100  # optimizer steps (each spec.micro_batches micro-batches)
    batch_size: int = 8  # sequences per micro-batch
    wire_codec: str = "none"  # hidden states on the wire (Forward in and out); "none" = fp32 (exact)
    grad_codec: str = ""  # gradients on the wire (Backward in and out); "" = wire_codec
    # Nodes keep each micro-batch's Forward input for its Backward (ForwardHeader.keep_id),
    # so the input crosses the wire once instead of twice; False = re-send it (as before).
    keep_inputs: bool = True
    eval_every: int = 0  # evaluate on the held-out split every this many steps; 0 = at the end only
    seed: int = 0  # data order
    max_forward_retries: int = 3  # reroutes of one micro-batch's Forward before giving up

    def __post_init__(self) -> None:
        if not self.job:
            raise ValueError("job must be a non-empty name")
        for name in ("steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        from pollinate.compression import CompressionError, get_codec

        for name in ("wire_codec", "grad_codec"):
            codec = getattr(self, name)
            if codec or name == "wire_codec":
                try:
                    get_codec(codec)
                except CompressionError as e:
                    raise ValueError(f"{name}: {e}") from None

    @property
    def gradient_codec(self) -> str:
        return self.grad_codec or self.wire_codec


class TrainingStopped(RuntimeError):
    """Training cannot go on (NaN loss, a failed Backward); the message says why."""


# the reply tensors bytes_by_kind counts by name (a node's other names count as "other": bounded)
REPLY_NAMES = (HIDDEN_STATES, GRAD_INPUTS, ADAPTER_FLAT)


class SwarmChain:
    """Forward and Backward of one job through a route of hops (async, on the client loop)."""

    def __init__(self, swarm, config: TrainConfig, *, timeout_s: float):
        self.swarm = swarm
        self.config = config
        self.timeout_s = timeout_s
        self.job = config.job  # the job named to the nodes; "" = the base model (client/prompt_tuning.py)
        self.spec_msg = config.spec.to_proto(node_pb2)
        self.failovers = 0  # Backward hops moved to another replica after a failure
        self.reroutes = 0  # Forwards retried on a new route after a failure
        self.resends = 0  # Backwards whose node had not kept the input, sent again in full
        self.bytes_sent = 0  # encoded tensor bytes sent to nodes (Forward and Backward)
        self.bytes_received = 0  # encoded tensor bytes received from nodes
        # the same bytes by what they carry: "<RPC> <tensor name> sent|received"
        # (e.g. "Backward hidden_states sent" counts inputs re-sent for Backward)
        self.bytes_by_kind: dict[str, int] = {}
        self._keep_prefix = uuid.uuid4().hex[:12]  # keep ids are unique per trainer
        self._keep_count = 0

    def new_keep_id(self) -> str | None:
        """A fresh keep_id for one hop's Forward, or None when inputs are not kept (no job:
        the base model, as client/prompt_tuning.py trains; or keep_inputs off)."""
        if not self.job or not self.config.keep_inputs:
            return None
        self._keep_count += 1
        return f"{self._keep_prefix}-{self._keep_count}"

    def _count(self, key: str, size: int) -> None:
        self.bytes_by_kind[key] = self.bytes_by_kind.get(key, 0) + size

    async def _call(self, hop: Hop, method: str, reqs: list, raw: list | None = None) -> list[torch.Tensor]:
        for r in reqs:
            if r.HasField("tensor"):
                self.bytes_sent += len(r.tensor.data)
                self._count(f"{method} {r.tensor.name} sent", len(r.tensor.data))
        received: list[tuple[str, int]] = []
        try:
            with translate_rpc_errors(peer=hop.peer.address):
                return await stream_tensors(getattr(self.swarm.stub(hop.peer.address), method), reqs, self.timeout_s,
                                            received, raw)
        finally:
            for name, size in received:  # a spot check's adapter under its own name, not as gradient bytes
                self.bytes_received += size
                self._count(f"{method} {name if name in REPLY_NAMES else 'other'} received", size)

    def _span(self, hop: Hop) -> common_pb2.Span:
        return common_pb2.Span(start=hop.start, end=hop.end)

    async def forward_hop(self, hop: Hop, hidden: torch.Tensor, *, job: str | None = None,
                          keep_id: str | None = None, sent: list | None = None) -> torch.Tensor:
        """The hop's output; `sent`, if given, gets the input as encoded for the wire."""
        header = node_pb2.ForwardHeader(job=job if job is not None else self.job, blocks=self._span(hop),
                                        spec=self.spec_msg if job is None else None, keep_id=keep_id or "")
        enc = await asyncio.to_thread(encode_tensor, hidden, codec=self.config.wire_codec, name=HIDDEN_STATES)
        if sent is not None:
            sent.append(enc)
        reqs = [node_pb2.ForwardRequest(header=header)] + [node_pb2.ForwardRequest(tensor=c) for c in enc.chunks()]
        (out,) = await self._call(hop, "Forward", reqs)
        return out

    async def backward_hop(self, hop: Hop, hidden: torch.Tensor, grad: torch.Tensor, *, keep_id: str | None = None,
                           input_grad: bool = True, return_adapter: bool = False,
                           transcript: Transcript | None = None, kept_encoded: EncodedTensor | None = None):
        """The gradient of the hop's input (None with input_grad=False). With `keep_id` the
        node recomputes from the input it kept; if it has not kept it, `hidden` is sent.
        return_adapter: (the hop's trainable tensors as its Backward used them, the gradient),
        for a spot check; `transcript` then gets what the node signed, with `kept_encoded`
        (the kept input as its Forward sent it) where the node used the kept input."""
        codec = self.config.gradient_codec
        enc_grad = await asyncio.to_thread(encode_tensor, grad, codec=codec, name=GRAD_OUTPUTS)
        grad_reqs = [node_pb2.BackwardRequest(tensor=c) for c in enc_grad.chunks()]
        header = node_pb2.BackwardHeader(job=self.job, blocks=self._span(hop), spec=self.spec_msg, reply_codec=codec,
                                         skip_grad_inputs=not input_grad, return_adapter=return_adapter)
        expected = 1 + int(return_adapter) if input_grad else 0

        raw: list | None = [] if transcript is not None else None

        def answer(outputs: list[torch.Tensor], sent_input=None):
            if transcript is not None and sent_input is not None and len(raw) == 2:
                (adapter, _), (grad_in, signature) = raw
                transcript.record(0, [adapter, sent_input, enc_grad, grad_in], signature)
            if return_adapter and len(outputs) == expected - 1:
                from pollinate.client.spot_check import AnsweredWrong  # spot_check.py imports this module

                # transient: backward() bans the hop and moves it to another replica; a node
                # that could dodge checks this way would never be checked
                raise AnsweredWrong(f"{hop.peer.address} answered a checked Backward without its adapter (a node "
                                    f"older than this client, or one avoiding the check): not used for a while")
            return _only(outputs, expected)

        if keep_id is not None:
            keyed = node_pb2.BackwardHeader()
            keyed.CopyFrom(header)
            keyed.keep_id = keep_id
            try:
                return answer(await self._call(hop, "Backward", [node_pb2.BackwardRequest(header=keyed)] + grad_reqs,
                                               raw), kept_encoded)
            except InputNotKept as e:
                self.resends += 1
                logger.info("job %s: %s did not keep input %s, sending it again: %s", self.job, hop.peer.address,
                            keep_id, e)
        enc = await asyncio.to_thread(encode_tensor, hidden, codec=self.config.wire_codec, name=HIDDEN_STATES)
        reqs = [node_pb2.BackwardRequest(header=header)] + [node_pb2.BackwardRequest(tensor=c) for c in enc.chunks()]
        if raw:
            raw.clear()  # the keep_id attempt's, if any
        return answer(await self._call(hop, "Backward", reqs + grad_reqs, raw), enc)

    async def forward(self, hidden: torch.Tensor, *, keep: bool = True
                      ) -> tuple[list[Hop], list[KeptInput], torch.Tensor]:
        """(route, each hop's input, the last hop's output); reroutes a failed Forward.
        Each input is a KeptInput: the tensor, and the keep_id the hop's node holds it under
        (keep=False: a Forward without Backward, such as evaluation, keeps nothing)."""
        for attempt in range(self.config.max_forward_retries + 1):
            route = await self.swarm.route(0, self.swarm.num_blocks)
            inputs, h = [], hidden
            try:
                for hop in route:
                    keep_id = self.new_keep_id() if keep else None
                    sent = [] if keep and self.swarm.keeps_evidence else None  # for a liar report
                    out = await self.forward_hop(hop, h, keep_id=keep_id, sent=sent)
                    inputs.append(KeptInput(h, keep_id, sent[0] if sent else None))
                    h = out
                return route, inputs, h
            except (PollinateError, asyncio.TimeoutError) as e:
                if attempt == self.config.max_forward_retries or not _transient(e):
                    raise
                self.swarm.ban(hop.peer, e)
                self.reroutes += 1
        raise AssertionError("unreachable")

    async def backward(self, route: list[Hop], inputs: list[KeptInput], grad: torch.Tensor) -> list[Hop]:
        """Backward through the route in reverse; a failed hop moves to another replica.
        Returns the hops that accumulated the micro-batch, in route order."""
        hops = list(zip(route, inputs))
        i, failures = len(hops) - 1, 0
        while i >= 0:
            hop, h = hops[i]
            try:
                # the model's first blocks take the frozen embeddings: their input gradient is
                # of no use to a job trained on the nodes (prompt tuning, job "", needs it)
                input_grad = not (self.job and hop.start == 0)
                check = bool(self.job) and input_grad and self.swarm.spot_checks.due()
                transcript = Transcript("backward", job=self.job, start=hop.start, end=hop.end, spec=self.spec_msg) \
                    if check and self.swarm.keeps_evidence else None
                new = await self.backward_hop(hop, h.tensor, grad, keep_id=h.keep_id, input_grad=input_grad,
                                              return_adapter=check, transcript=transcript, kept_encoded=h.encoded)
                if check:
                    flat, new = new
                    await self._spot_check(hop, h.tensor, grad, new, flat, transcript)
                grad = new
                i -= 1
                continue
            except (PollinateError, asyncio.TimeoutError) as e:
                failures += 1
                if failures > self.config.max_forward_retries or not _transient(e):
                    raise
                self.swarm.ban(hop.peer, e)
                error = e
            replacement = await self._replace(hop, h, error)
            hops[i:i + 1] = replacement
            i += len(replacement) - 1
        return [hop for hop, _ in hops]

    async def _spot_check(self, hop: Hop, hidden: torch.Tensor, grad_out: torch.Tensor, answer: torch.Tensor,
                          flat: torch.Tensor, transcript: Transcript | None) -> None:
        """Check the hop's Backward answer on other replicas (client/spot_check.py); a hop
        found lying raises AnsweredWrong, and backward() redoes it on another replica."""
        liar = await self.swarm.spot_checks.check_backward(hop, hidden, grad_out, answer, job=self.job,
                                                           spec=self.spec_msg, flat=flat, transcript=transcript)
        if liar is hop.peer:
            from pollinate.client.spot_check import AnsweredWrong  # spot_check.py imports this module

            raise AnsweredWrong(f"{hop.peer.address} answered a wrong gradient for blocks {hop.start}:{hop.end}")

    async def _replace(self, hop: Hop, hidden: KeptInput, error: BaseException) -> list[tuple[Hop, KeptInput]]:
        """A new chain for the blocks of a failed hop, with each new hop's input (the first
        one is the failed hop's, held by no node of the new chain: sent again in full)."""
        for attempt in range(self.config.max_forward_retries + 1):
            sub = await self.swarm.route(hop.start, hop.end)
            pairs, h = [], KeptInput(hidden.tensor, None)
            try:
                for i, s in enumerate(sub):
                    if i + 1 < len(sub):  # the last new hop's output is not needed
                        keep_id = self.new_keep_id()
                        pairs.append((s, KeptInput(h.tensor, keep_id)))
                        h = KeptInput(await self.forward_hop(s, h.tensor, keep_id=keep_id), None)
                    else:
                        pairs.append((s, h))
            except (PollinateError, asyncio.TimeoutError) as e:
                if attempt == self.config.max_forward_retries or not _transient(e):
                    raise
                self.swarm.ban(s.peer, e)
                continue
            self.failovers += 1
            logger.warning("job %s: Backward of blocks %d:%d moved from %s to %s after: %s", self.job, hop.start,
                           hop.end, hop.peer.address, " -> ".join(str(s) for s in sub), error)
            return pairs
        raise AssertionError("unreachable")

    async def fetch_state(self, hop: Hop) -> dict[str, torch.Tensor]:
        req = node_pb2.GetStateRequest(job=self.config.job, span=self._span(hop), round=0)
        assembler, state = TensorAssembler(), {}
        with translate_rpc_errors(peer=hop.peer.address):
            async for reply in self.swarm.stub(hop.peer.address).GetState(req, timeout=self.timeout_s):
                enc = assembler.feed(reply.tensor)
                if enc is not None:
                    state[enc.name] = enc.decode()
        return state


@dataclass(frozen=True)
class KeptInput:
    """A hop's input as the trainer keeps it: the tensor, and the keep_id under which the
    hop's node kept it too (None: the node holds nothing, Backward sends the tensor)."""

    tensor: torch.Tensor
    keep_id: str | None
    encoded: EncodedTensor | None = None  # as its Forward sent it, for a liar report (protocol/answers.py)


def _only(outputs: list[torch.Tensor], expected: int):
    """A Backward's reply tensors: None when none was asked for, the one tensor, or a
    tuple (the adapter, the input gradient) of two."""
    if len(outputs) != expected:
        raise InvalidRequest(f"Backward answered {len(outputs)} tensors, expected {expected}")
    return None if not expected else outputs[0] if expected == 1 else tuple(outputs)


def _transient(e: BaseException) -> bool:
    from pollinate.client.spot_check import AnsweredWrong
    from pollinate.protocol.errors import PeerUnavailable, RpcTimeout, SpanMoved

    return isinstance(e, (PeerUnavailable, RpcTimeout, SpanMoved, AnsweredWrong, asyncio.TimeoutError))


class Trainer:
    """Runs `config.steps` steps of a job through the swarm (sync API over the client loop)."""

    def __init__(self, *, swarm, worker, client_part, pad_id: int, config: TrainConfig, timeout_s: float = 60.0):
        self.swarm, self.worker, self.part = swarm, worker, client_part
        self.pad_id = pad_id
        self.config = config
        self.chain = SwarmChain(swarm, config, timeout_s=timeout_s)
        self.timeout_s = timeout_s
        self.tokens = 0
        self.history: list[dict] = []

    def _run(self, coro):
        return self.worker.run(coro, self.timeout_s * 4 * (self.swarm.num_blocks + 1))

    def micro_batch(self, ids: torch.Tensor, labels: torch.Tensor) -> float:
        with torch.no_grad():
            hidden = self.part.embed(ids)
        route, inputs, out = self._run(self.chain.forward(hidden))
        out = out.detach().to(self.part.dtype).requires_grad_(True)
        loss = causal_lm_loss(self.part.logits(out), labels)
        if not torch.isfinite(loss):
            raise TrainingStopped(f"loss is {loss.item()}: stopping before any gradient reaches the nodes")
        loss.backward()
        self._run(self.chain.backward(route, inputs, out.grad))
        self.tokens += int((labels != -100).sum())
        return float(loss.detach())

    def evaluate(self, examples) -> float:
        """Mean loss over `examples` with the job's adapter (Forward only, no training)."""
        losses, weights = [], []
        for i in range(0, len(examples), self.config.batch_size):
            ids, labels = collate(examples[i:i + self.config.batch_size], self.pad_id)
            with torch.no_grad():
                _, _, out = self._run(self.chain.forward(self.part.embed(ids), keep=False))
                losses.append(float(causal_lm_loss(self.part.logits(out.to(self.part.dtype)), labels)))
            weights.append(int((labels[:, 1:] != -100).sum()))
        return sum(l * w for l, w in zip(losses, weights)) / max(1, sum(weights))

    def train(self, batch_iter, *, eval_examples=(), progress: bool = True, report=None) -> list[dict]:
        """`report`, if given, is called with each record that has an eval_loss, its
        train_loss set to the mean training loss since the previous report (issue 15: the
        coordinator stores them per round; client/training_report.py)."""
        from tqdm import tqdm

        cfg = self.config
        since_report: list[float] = []
        bar = tqdm(total=cfg.steps, disable=not progress, desc=f"job {cfg.job}", unit="step")
        t0 = time.perf_counter()
        for step in range(1, cfg.steps + 1):
            losses = [self.micro_batch(*collate(next(batch_iter), self.pad_id)) for _ in range(cfg.spec.micro_batches)]
            record = {"step": step, "loss": sum(losses) / len(losses), "tokens": self.tokens,
                      "tokens_per_s": self.tokens / max(time.perf_counter() - t0, 1e-9),
                      # encoded tensor bytes to and from the nodes so far (training and evaluation)
                      "wire_bytes_sent": self.chain.bytes_sent, "wire_bytes_received": self.chain.bytes_received,
                      "input_resends": self.chain.resends}
            last = step == cfg.steps
            since_report.append(record["loss"])
            if eval_examples and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
                record["eval_loss"] = self.evaluate(list(eval_examples))
                logger.info("job %s step %d: eval loss %.4f", cfg.job, step, record["eval_loss"])
                if report is not None:
                    report({**record, "train_loss": sum(since_report) / len(since_report)})
                    since_report = []
            self.history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
        bar.close()
        if not all(math.isfinite(r["loss"]) for r in self.history):
            raise TrainingStopped("a loss was not finite")
        return self.history

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The job's adapter gathered from the spans of one route (PEFT names)."""
        async def gather():
            route = await self.swarm.route(0, self.swarm.num_blocks)
            state = {}
            for hop in route:
                part = await self.chain.fetch_state(hop)
                state.update({k: v for k, v in part.items() if not k.startswith("counter.")})
            return state

        return self._run(gather())

    def forward_logits(self, ids: torch.Tensor, *, job: str | None = None) -> torch.Tensor:
        """Logits of `ids` through the swarm with the job's adapter (job="" for the base model)."""
        async def run():
            route = await self.swarm.route(0, self.swarm.num_blocks)
            h = self.part.embed(ids)
            for hop in route:
                h = await self.chain.forward_hop(hop, h, job=self.chain.job if job is None else job)
            return h

        with torch.no_grad():
            return self.part.logits(self._run(run()).to(self.part.dtype))
