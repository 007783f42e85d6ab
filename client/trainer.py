"""The trainer's side of fine-tuning: batches through the swarm forward, the loss here,
the gradient back through the swarm; the nodes hold and step the job's adapters.

One training step = `spec.micro_batches` micro-batches. Per micro-batch: embed locally,
Forward through each hop of a route with the job's name and spec (the hop's input is kept
here), logits and loss locally, then Backward through the hops in reverse, each hop
getting its own input again plus the gradient of its output (the node recomputes its
forward, see node/training.py) and returning the gradient of its input. The embeddings
are frozen, so the first hop's input gradient is dropped.

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
from dataclasses import dataclass, field

import torch

from pollinate.client.routing import Hop
from pollinate.client.training_data import causal_lm_loss, collate
from pollinate.node.training import JobSpec
from pollinate.protocol.errors import PollinateError, translate_rpc_errors
from pollinate.protocol.tensors import TensorAssembler, encode_tensor
from pollinate.protocol.v1 import common_pb2, node_pb2

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    job: str  # job name; nodes keep its adapters under this name
    spec: JobSpec = field(default_factory=JobSpec)  # adapter and inner-optimizer settings
    steps: int = 100  # optimizer steps (each spec.micro_batches micro-batches)
    batch_size: int = 8  # sequences per micro-batch
    wire_codec: str = "none"  # hidden states and gradients on the wire; "none" = fp32 (exact)
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


class TrainingStopped(RuntimeError):
    """Training cannot go on (NaN loss, a failed Backward); the message says why."""


async def _stream(call, requests: list, timeout: float) -> list:
    """Send `requests` on a bidi stream, collect the reply tensors (decoded), in order."""
    assembler = TensorAssembler()
    out = []

    async def gen():
        for r in requests:
            yield r

    async def run():
        async for reply in call(gen()):
            encoded = assembler.feed(reply.tensor)
            if encoded is not None:
                out.append(await asyncio.to_thread(encoded.decode))

    await asyncio.wait_for(run(), timeout)
    return out


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

    def _span(self, hop: Hop) -> common_pb2.Span:
        return common_pb2.Span(start=hop.start, end=hop.end)

    async def forward_hop(self, hop: Hop, hidden: torch.Tensor, *, job: str | None = None) -> torch.Tensor:
        header = node_pb2.ForwardHeader(job=job if job is not None else self.job, blocks=self._span(hop),
                                        spec=self.spec_msg if job is None else None)
        enc = await asyncio.to_thread(encode_tensor, hidden, codec=self.config.wire_codec, name="hidden_states")
        reqs = [node_pb2.ForwardRequest(header=header)] + [node_pb2.ForwardRequest(tensor=c) for c in enc.chunks()]
        with translate_rpc_errors(peer=hop.peer.address):
            (out,) = await _stream(self.swarm.stub(hop.peer.address).Forward, reqs, self.timeout_s)
        return out

    async def backward_hop(self, hop: Hop, hidden: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        header = node_pb2.BackwardHeader(job=self.job, blocks=self._span(hop), spec=self.spec_msg)
        reqs = [node_pb2.BackwardRequest(header=header)]
        for name, t in (("hidden_states", hidden), ("grad_outputs", grad)):
            enc = await asyncio.to_thread(encode_tensor, t, codec=self.config.wire_codec, name=name)
            reqs += [node_pb2.BackwardRequest(tensor=c) for c in enc.chunks()]
        with translate_rpc_errors(peer=hop.peer.address):
            (out,) = await _stream(self.swarm.stub(hop.peer.address).Backward, reqs, self.timeout_s)
        return out

    async def forward(self, hidden: torch.Tensor) -> tuple[list[Hop], list[torch.Tensor], torch.Tensor]:
        """(route, each hop's input, the last hop's output); reroutes a failed Forward."""
        for attempt in range(self.config.max_forward_retries + 1):
            route = await self.swarm.route(0, self.swarm.num_blocks)
            inputs, h = [], hidden
            try:
                for hop in route:
                    inputs.append(h)
                    h = await self.forward_hop(hop, h)
                return route, inputs, h
            except (PollinateError, asyncio.TimeoutError) as e:
                if attempt == self.config.max_forward_retries or not _transient(e):
                    raise
                self.swarm.ban(hop.peer, e)
                self.reroutes += 1
        raise AssertionError("unreachable")

    async def backward(self, route: list[Hop], inputs: list[torch.Tensor], grad: torch.Tensor) -> list[Hop]:
        """Backward through the route in reverse; a failed hop moves to another replica.
        Returns the hops that accumulated the micro-batch, in route order."""
        hops = list(zip(route, inputs))
        i, failures = len(hops) - 1, 0
        while i >= 0:
            hop, h = hops[i]
            try:
                grad = await self.backward_hop(hop, h, grad)
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

    async def _replace(self, hop: Hop, hidden: torch.Tensor, error: BaseException) -> list[tuple[Hop, torch.Tensor]]:
        """A new chain for the blocks of a failed hop, with each new hop's input."""
        for attempt in range(self.config.max_forward_retries + 1):
            sub = await self.swarm.route(hop.start, hop.end)
            pairs, h = [], hidden
            try:
                for i, s in enumerate(sub):
                    pairs.append((s, h))
                    if i + 1 < len(sub):  # the last new hop's output is not needed
                        h = await self.forward_hop(s, h)
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


def _transient(e: BaseException) -> bool:
    from pollinate.protocol.errors import PeerUnavailable, RpcTimeout, SpanMoved

    return isinstance(e, (PeerUnavailable, RpcTimeout, SpanMoved, asyncio.TimeoutError))


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
                _, _, out = self._run(self.chain.forward(self.part.embed(ids)))
                losses.append(float(causal_lm_loss(self.part.logits(out.to(self.part.dtype)), labels)))
            weights.append(int((labels[:, 1:] != -100).sum()))
        return sum(l * w for l, w in zip(losses, weights)) / max(1, sum(weights))

    def train(self, batch_iter, *, eval_examples=(), progress: bool = True) -> list[dict]:
        from tqdm import tqdm

        cfg = self.config
        bar = tqdm(total=cfg.steps, disable=not progress, desc=f"job {cfg.job}", unit="step")
        t0 = time.perf_counter()
        for step in range(1, cfg.steps + 1):
            losses = [self.micro_batch(*collate(next(batch_iter), self.pad_id)) for _ in range(cfg.spec.micro_batches)]
            record = {"step": step, "loss": sum(losses) / len(losses), "tokens": self.tokens,
                      "tokens_per_s": self.tokens / max(time.perf_counter() - t0, 1e-9)}
            last = step == cfg.steps
            if eval_examples and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
                record["eval_loss"] = self.evaluate(list(eval_examples))
                logger.info("job %s step %d: eval loss %.4f", cfg.job, step, record["eval_loss"])
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
