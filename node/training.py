"""A node's training jobs: per job, the span's adapters, an inner AdamW and its counters.

Backward recomputes the forward: the node runs the span forward with the job's adapter
under autograd from the micro-batch's input and back-propagates the gradient of the
span's output; no activations are stored between the calls. The input is either sent
again with the Backward, or named by the keep_id under which this node kept it at
Forward time (node/kept_inputs.py: bounded bytes, a ttl), which saves one hidden-state
transfer per hop and micro-batch. Any replica of the span can still take a Backward: one
that does not hold the input answers InputNotKept and the trainer sends it again, so the
result depends only on the input and the adapter.

Jobs are defined by the trainer: the first Forward/Backward that names a job with a
JobSpec creates it here; a later spec under the same name must be equal, or the call is
refused with FAILED_PRECONDITION (a job clash). The coordinator's job registry
(coordinator/jobs.py) is checked by trainers before they train; nodes never look a job up
there (docs/architecture.md says why).

Step rule: gradients of `micro_batches` Backward calls are averaged, clipped (this span's
adapter norm; 0 = off), checked (any NaN/Inf: the step is skipped, the adapter and the
optimizer state stay untouched) and applied by AdamW.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from pollinate.node.adapters import AdapterHost, build_adapter
from pollinate.node.kept_inputs import KeptInputs
from pollinate.node.span import SpanError
from pollinate.protocol.errors import FailedPrecondition, InvalidRequest, NotFound, ResourceExhausted
from pollinate.protocol.shared import JobSpec

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Job:
    name: str
    spec: JobSpec
    adapter: torch.nn.Module
    optimizer: torch.optim.Optimizer
    pending: int = 0  # Backward calls accumulated since the last step
    inner_steps: int = 0  # optimizer steps applied
    skipped_steps: int = 0  # steps skipped for NaN/Inf gradients
    tokens: int = 0  # tokens back-propagated through this span for this job
    last_grad_norm: float = field(default=0.0)

    @property
    def numel(self) -> int:
        """Values in the job's adapter on this span (what a check_only Backward's adapter.flat holds)."""
        return sum(p.numel() for p in self.adapter.parameters())


def make_job(name: str, spec: JobSpec, span, host: AdapterHost) -> Job:
    """A job's adapter on `span` and its AdamW (torch's, same arguments as a local run)."""
    host.attach(span)
    adapter = build_adapter(spec, span)
    # AdamW, or the method's own (GaLore); None where the job has nothing on this span
    # (LLaMA-Adapter's blocks below its top L): the span then runs as the base model for it
    optimizer = adapter.make_optimizer(spec) if any(True for _ in adapter.parameters()) else None
    return Job(name=name, spec=spec, adapter=adapter, optimizer=optimizer)


def backward_step(job: Job | None, span, host: AdapterHost, hidden: torch.Tensor, grad_out: torch.Tensor,
                  *, input_grad: bool = True) -> torch.Tensor | None:
    """Recompute the span's forward with the job's adapter, back-propagate `grad_out`,
    accumulate the adapter's gradients, and step when `micro_batches` have accumulated.
    Returns the gradient with respect to `hidden`, or None with input_grad=False (then
    autograd does not compute it). job None: the base span, input gradient only
    (client-side methods such as prompt tuning train nothing on the node)."""
    trains = job is not None and job.optimizer is not None
    x = hidden.detach().to(span.device, span.dtype).requires_grad_(input_grad or not trains)
    with torch.enable_grad(), host.use(job.adapter if trains else None):
        out = span(x)
        torch.autograd.backward(out, grad_out.to(out.device, out.dtype), inputs=None if trains else [x])
    if job is None:
        return x.grad.to(hidden.device, hidden.dtype)
    job.pending += 1
    job.tokens += hidden.shape[0] * hidden.shape[1]
    if job.pending >= job.spec.micro_batches:
        optimizer_step(job)
    return x.grad.to(hidden.device, hidden.dtype) if input_grad else None


def check_backward(job: Job, span, host: AdapterHost, hidden: torch.Tensor, grad_out: torch.Tensor,
                   *, flat: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient with respect to `hidden` with the job's adapter as it stands, or with
    `flat` written into it for the call (then restored); autograd computes nothing for the
    adapter, so nothing accumulates, and nothing is counted. Torch thread only."""
    from pollinate.node.diloco import assign_flat, flatten_params

    params = list(job.adapter.parameters())
    own = flatten_params(params) if flat is not None else None
    if flat is not None:
        assign_flat(params, flat)
    try:
        x = hidden.detach().to(span.device, span.dtype).requires_grad_(True)
        with torch.enable_grad(), host.use(job.adapter if job.optimizer is not None else None):
            out = span(x)
            torch.autograd.backward(out, grad_out.to(out.device, out.dtype), inputs=[x])
        return x.grad.to(hidden.device, hidden.dtype)
    finally:
        if own is not None:
            assign_flat(params, own)


def optimizer_step(job: Job) -> bool:
    """Average, clip, check and apply the accumulated gradients; False if the step was skipped."""
    params = [p for p in job.adapter.parameters() if p.grad is not None]
    n, job.pending = job.pending, 0
    if job.optimizer is None:  # nothing of the job's here: the step is counted, as on the other spans
        job.inner_steps += 1
        return True
    try:
        if not params:
            return False
        grads = [p.grad for p in params]
        if n > 1:
            torch._foreach_div_(grads, float(n))
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        job.last_grad_norm = norm
        if not math.isfinite(norm):
            job.skipped_steps += 1
            logger.warning("job %s: non-finite adapter gradient (norm %s): step skipped, adapter unchanged",
                           job.name, norm)
            return False
        if job.spec.grad_clip > 0 and norm > job.spec.grad_clip:
            torch._foreach_mul_(grads, job.spec.grad_clip / (norm + 1e-6))  # as clip_grad_norm_
        job.optimizer.step()
        job.inner_steps += 1
        return True
    finally:
        job.optimizer.zero_grad(set_to_none=True)


def job_memory(job: Job) -> int:
    """Bytes a job's training takes on this node: its adapter's parameters x 4 (weights,
    gradients, AdamW's two moments)."""
    return 4 * sum(p.numel() * p.element_size() for p in job.adapter.parameters())


class JobManager:
    """The jobs a node trains. Plain async domain functions; torch work on the span's executor."""

    def __init__(self, server) -> None:
        self.server = server  # SpanServer: the span, its checks and its single torch thread
        self.host = AdapterHost()
        self.jobs: dict[str, Job] = {}
        self.rounds = None  # node/rounds.py RoundDriver when the node has a coordinator
        # called (event loop) after a job's first optimizer step here (its inner_steps leaves 0):
        # the node's heartbeat then reports it at once, not a period later (CoordinatorClient.beat_soon)
        self.on_first_step: Callable[[], None] | None = None
        # Forward inputs kept for their Backward (ForwardHeader.keep_id)
        self.kept = KeptInputs(server.serving.kept_inputs)

    def job(self, name: str, spec_msg=None) -> Job:
        """The job `name`, created from `spec_msg` on first sight; clash -> FAILED_PRECONDITION."""
        spec = JobSpec.from_proto(spec_msg) if spec_msg is not None else None
        job = self.jobs.get(name)
        if job is None:
            if spec is None:
                raise NotFound(f"job {name!r} is unknown on this node (send its spec to create it)")
            limits = self.server.serving
            if len(self.jobs) >= limits.max_jobs:
                raise ResourceExhausted(f"job {name!r}: this node holds {len(self.jobs)} jobs, its limit (--max-jobs)")
            try:
                job = make_job(name, spec, self.server.span, self.host)
            except ValueError as e:
                raise InvalidRequest(f"job {name!r}: {e}") from e
            need, held = job_memory(job), sum(job_memory(j) for j in self.jobs.values())
            if held + need > limits.jobs_memory_bytes:  # dropped before it holds any optimizer state
                raise ResourceExhausted(
                    f"job {name!r} needs {need / 2**20:.0f} MiB for its adapter and optimizer, this node's jobs "
                    f"hold {held / 2**20:.0f} of {limits.jobs_memory_bytes / 2**20:.0f} MiB (--jobs-memory-mb)")
            self.jobs[name] = job
            logger.info("job %s created on blocks %d:%d: %s", name, self.server.start, self.server.end, spec)
            if self.rounds is not None and job.optimizer is not None:  # nothing here: no rounds
                self.rounds.track(job)
        elif spec is not None and spec != job.spec:
            raise FailedPrecondition(f"job {name!r} exists on this node with different settings: {job.spec} (asked: {spec})")
        return job

    def scope(self, job: Job):
        """A factory of contexts in which the span runs with `job`'s adapter (inference steps)."""
        return lambda: self.host.use(job.adapter)

    def existing(self, name: str, *, what: str) -> Job:
        """A job that must already exist here (no spec to create it): NotFound says so clearly."""
        job = self.jobs.get(name)
        if job is None:
            known = ", ".join(sorted(self.jobs)) or "none"
            raise NotFound(f"{what}: job {name!r} is unknown on the node serving blocks "
                           f"{self.server.start}:{self.server.end} (jobs here: {known}); train it first")
        return job

    async def forward(self, job: Job, hidden: torch.Tensor) -> torch.Tensor:
        self.server.check_hidden(hidden)
        if self.rounds is not None:  # first use here: adopt the last committed round (node/rounds.py)
            await self.rounds.before_step(self, job)
            await self.rounds.land_if_ready(self, job)  # a round done lands before a step begins
        return await self.server.run_torch(self._forward_sync, job, hidden)

    def _forward_sync(self, job: Job, hidden: torch.Tensor) -> torch.Tensor:
        try:
            with torch.inference_mode(), self.host.use(job.adapter):
                out = self.server.span(self.server.to_span(hidden))
        except SpanError as e:
            raise InvalidRequest(str(e)) from e
        return out.to(hidden.device, hidden.dtype)

    def trained_steps(self) -> dict[str, int]:
        """Optimizer steps so far of each job this span trains (the heartbeat reports them to
        the coordinator, HeartbeatRequest.trained_steps); jobs with nothing here are left out."""
        return {name: job.inner_steps for name, job in self.jobs.items()
                if job.optimizer is not None and job.inner_steps}

    async def backward(self, job: Job | None, hidden: torch.Tensor, grad_out: torch.Tensor, *,
                       input_grad: bool = True, with_adapter: bool = False):
        """job None: the base span's input gradient, nothing trained or counted.
        input_grad False: only the adapter's gradients (returns None); needs a job.
        with_adapter: (the job's trainable tensors as one flat fp32 tensor, copied on the torch
        thread in the same call as the Backward, so before any step it takes; the input
        gradient), for a spot check (BackwardHeader.return_adapter)."""
        self.server.check_hidden(hidden)
        if grad_out.shape != hidden.shape:
            raise InvalidRequest(f"grad_outputs have shape {list(grad_out.shape)}, hidden_states {list(hidden.shape)}")
        if job is None and not input_grad:
            raise InvalidRequest("skip_grad_inputs without a job leaves nothing to compute")
        if with_adapter and (job is None or not input_grad):
            raise InvalidRequest("return_adapter needs a job and the input gradient (no skip_grad_inputs)")
        if self.rounds is not None and job is not None:  # first use here: adopt the last committed round
            await self.rounds.before_step(self, job)
        steps_before = job.inner_steps if job is not None else 0
        result = await self.server.run_torch(self._backward_sync, job, hidden, grad_out, input_grad, with_adapter)
        if job is not None and not steps_before and job.inner_steps and self.on_first_step is not None:
            self.on_first_step()  # a voter on the job's rounds from now (coordinator/rounds.py)
        if self.rounds is not None and job is not None:  # after every H inner steps: a DiLoCo round (node/rounds.py)
            await self.rounds.after_backward(self, job)
        return result

    async def check_backward(self, job: Job, hidden: torch.Tensor, grad_out: torch.Tensor,
                             flat: torch.Tensor | None = None) -> torch.Tensor:
        """A spot check of another replica's Backward (issue 18): the input gradient with the
        job's adapter, or with `flat` (that replica's trainable tensors) in its place for the
        call; nothing accumulated, counted or stepped, no round."""
        self.server.check_hidden(hidden)
        if grad_out.shape != hidden.shape:
            raise InvalidRequest(f"grad_outputs have shape {list(grad_out.shape)}, hidden_states {list(hidden.shape)}")
        numel = job.numel
        if flat is not None and (flat.dim() != 1 or flat.numel() != numel or not torch.isfinite(flat).all()):
            raise InvalidRequest(f"adapter.flat: {list(flat.shape)} values (finite: {bool(torch.isfinite(flat).all())}), "
                                 f"the job's adapter here has {numel}")
        return await self.server.run_torch(self._check_sync, job, hidden, grad_out, flat)

    def _check_sync(self, job: Job, hidden: torch.Tensor, grad_out: torch.Tensor,
                    flat: torch.Tensor | None) -> torch.Tensor:
        try:
            return check_backward(job, self.server.span, self.host, hidden, grad_out, flat=flat)
        except SpanError as e:
            raise InvalidRequest(str(e)) from e

    def _backward_sync(self, job: Job | None, hidden: torch.Tensor, grad_out: torch.Tensor,
                       input_grad: bool = True, with_adapter: bool = False):
        from pollinate.node.diloco import flatten_params

        flat = flatten_params(list(job.adapter.parameters())) if with_adapter else None
        try:
            grad_in = backward_step(job, self.server.span, self.host, hidden, grad_out, input_grad=input_grad)
        except SpanError as e:
            raise InvalidRequest(str(e)) from e
        return (flat, grad_in) if with_adapter else grad_in

    async def state(self, name: str) -> tuple[JobSpec, dict[str, torch.Tensor]]:
        """The job's spec, and its adapter under PEFT names plus its counters as 0-d tensors (`counter.*`)."""
        job = self.job(name)
        if self.rounds is not None:  # a round still out lands first: the state is the job's as it stands
            await self.rounds.settled(self, job)
        state = await self.server.run_torch(job.adapter.peft_state)
        for key in ("inner_steps", "skipped_steps", "tokens"):
            state[f"counter.{key}"] = torch.tensor(getattr(job, key), dtype=torch.int64)
        return job.spec, state
