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

import torch

from pollinate.node.adapters import CLIENT_METHODS, METHODS, AdapterHost, build_adapter, known_methods
from pollinate.node.kept_inputs import KeptInputs
from pollinate.node.span import SpanError
from pollinate.protocol.errors import FailedPrecondition, InvalidRequest, NotFound, ResourceExhausted
from pollinate.protocol.job_limits import check_job_fields

logger = logging.getLogger(__name__)


VIRTUAL_TOKEN_METHODS = ("prompt-tuning", "prefix-tuning", "llama-adapter")  # methods sized by num_virtual_tokens


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A training job's settings; equal specs = the same job."""

    method: str = "lora"  # adapter method: a key of node.adapters.METHODS, or "prompt-tuning" (client-side)
    rank: int = 8  # LoRA rank r; bottleneck width, LoReFT rank, GaLore projection rank; LLaMA-Adapter: top blocks L
    alpha: float = 16.0  # LoRA alpha; scaling = alpha / rank (PEFT's convention)
    targets: tuple[str, ...] = ()  # module name suffixes; () = the method's default (PEFT's for Llama)
    feedforward: tuple[str, ...] = ()  # IA3: targets that scale their input; () = PEFT's default (down_proj)
    num_virtual_tokens: int = 0  # prompt / prefix tuning: virtual tokens (> 0 for those methods only)
    lr: float = 4e-4  # inner AdamW lr: DESIGN.md's DiLoCo inner setting
    weight_decay: float = 0.1  # inner AdamW weight decay (DiLoCo inner setting)
    betas: tuple[float, float] = (0.9, 0.95)  # inner AdamW betas (DiLoCo inner setting)
    grad_clip: float = 1.0  # max L2 norm of a span's adapter gradient per step; 0 = off
    micro_batches: int = 1  # Backward calls per optimizer step; their gradients are averaged
    seed: int = 0  # adapter initialisation seed
    round_steps: int = 0  # DiLoCo: inner steps between outer rounds (H); 0 = DiLoCoConfig's default
    # DiLoCo settings recorded with the job (issue 6); ""/0/None = DiLoCoConfig's default
    codec: str = ""  # pseudo-gradient codec: "cocktail", "int8", "fp16", "none"
    codec_p: float = 0.0  # cocktail random-mask ratio
    codec_k: float = 0.0  # cocktail top-k ratio inside the mask
    codec_bits: int = 0  # cocktail bits per kept value
    codec_bucket: int = 0  # cocktail kept values per fp32 scale
    warmup_rounds: int | None = None  # first rounds sent uncompressed
    outer_lr: float = 0.0  # outer Nesterov SGD learning rate
    outer_momentum: float | None = None  # outer momentum (0 = plain averaging step)
    overlap_rounds: bool | None = None  # rounds in the background while training goes on (None: the default)
    # Checkpoint retention at the coordinator (issue 15; coordinator/retention.py has the
    # defaults None stands for); nodes carry these and do nothing with them.
    keep_last: int | None = None  # the last K committed rounds of each span
    keep_log_spaced: bool | None = None  # rounds 1, 2, 4, 8, ...
    keep_every: int | None = None  # every M-th round; 0 = none
    keep_max_bytes: int | None = None  # cap on the job's kept states, bytes; 0 = none

    def __post_init__(self) -> None:
        if self.method not in METHODS and self.method not in CLIENT_METHODS:
            raise ValueError(f"unknown adapter method {self.method!r}; known: {known_methods()}")
        if self.rank <= 0:
            raise ValueError(f"rank must be > 0, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        adapter = METHODS.get(self.method)
        if not self.targets and adapter is not None:  # frozen: resolve defaults once, here
            object.__setattr__(self, "targets", adapter.default_targets)
        if self.method in ("full", "prompt-tuning", "galore", "reft", "prefix-tuning", "llama-adapter") and self.targets:
            raise ValueError(f"{self.method!r} has no target modules (got {list(self.targets)})")
        if self.method in ("lora", "ia3", "ln-tuning", "bottleneck") and not self.targets:
            raise ValueError("targets must name at least one module")
        if self.method == "ia3" and not self.feedforward:
            object.__setattr__(self, "feedforward", tuple(t for t in ("down_proj",) if t in self.targets))
        if self.method != "ia3" and self.feedforward:
            raise ValueError(f"feedforward modules are an IA3 setting, not {self.method!r}'s")
        if not set(self.feedforward) <= set(self.targets):
            raise ValueError(f"feedforward modules {list(self.feedforward)} must be among the targets {list(self.targets)}")
        if self.method in VIRTUAL_TOKEN_METHODS and self.num_virtual_tokens <= 0:
            raise ValueError(f"{self.method} needs num_virtual_tokens > 0, got {self.num_virtual_tokens}")
        if self.method not in VIRTUAL_TOKEN_METHODS and self.num_virtual_tokens:
            raise ValueError(f"num_virtual_tokens is not a setting of {self.method!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if self.micro_batches <= 0:
            raise ValueError(f"micro_batches must be > 0, got {self.micro_batches}")
        if self.round_steps < 0:
            raise ValueError(f"round_steps must be >= 0, got {self.round_steps}")
        self.diloco_config()  # the DiLoCo settings' own checks
        check_job_fields({  # then every field's range, NaN and inf refused (protocol/job_limits.py)
            "rank": self.rank, "alpha": self.alpha, "lr": self.lr, "weight_decay": self.weight_decay,
            "beta1": self.betas[0], "beta2": self.betas[1], "grad_clip": self.grad_clip,
            "micro_batches": self.micro_batches, "round_steps": self.round_steps,
            "num_virtual_tokens": self.num_virtual_tokens, "codec": self.codec, "codec_p": self.codec_p,
            "codec_k": self.codec_k, "codec_bits": self.codec_bits, "codec_bucket": self.codec_bucket,
            "warmup_rounds": self.warmup_rounds, "outer_lr": self.outer_lr, "outer_momentum": self.outer_momentum,
            "targets": self.targets, "feedforward_modules": self.feedforward, "keep_last": self.keep_last,
            "keep_every": self.keep_every, "keep_max_bytes": self.keep_max_bytes})

    def diloco_config(self):
        """The job's DiLoCoConfig: its settings over DiLoCoConfig's defaults (node/diloco.py)."""
        from pollinate.node.diloco import job_diloco_config

        return job_diloco_config(
            method=self.method, round_steps=self.round_steps, codec=self.codec, p=self.codec_p, k=self.codec_k,
            bits=self.codec_bits, bucket=self.codec_bucket, warmup_rounds=self.warmup_rounds,
            outer_lr=self.outer_lr, outer_momentum=self.outer_momentum, overlap_rounds=self.overlap_rounds)

    def to_proto(self, pb):
        return pb.JobSpec(
            method=self.method, rank=self.rank, alpha=self.alpha, targets=list(self.targets), lr=self.lr,
            weight_decay=self.weight_decay, beta1=self.betas[0], beta2=self.betas[1], grad_clip=self.grad_clip,
            micro_batches=self.micro_batches, seed=self.seed, round_steps=self.round_steps,
            feedforward_modules=list(self.feedforward), num_virtual_tokens=self.num_virtual_tokens,
            codec=self.codec, codec_p=self.codec_p, codec_k=self.codec_k, codec_bits=self.codec_bits,
            codec_bucket=self.codec_bucket, warmup_rounds=self.warmup_rounds, outer_lr=self.outer_lr,
            outer_momentum=self.outer_momentum, overlap_rounds=self.overlap_rounds,
            keep_last=self.keep_last, keep_log_spaced=self.keep_log_spaced, keep_every=self.keep_every,
            keep_max_bytes=self.keep_max_bytes,
        )

    @classmethod
    def from_proto(cls, msg) -> JobSpec:
        try:
            return cls(
                method=msg.method, rank=msg.rank, alpha=msg.alpha, targets=tuple(msg.targets), lr=msg.lr,
                weight_decay=msg.weight_decay, betas=(msg.beta1, msg.beta2), grad_clip=msg.grad_clip,
                micro_batches=msg.micro_batches, seed=msg.seed, round_steps=msg.round_steps,
                feedforward=tuple(msg.feedforward_modules), num_virtual_tokens=msg.num_virtual_tokens,
                codec=msg.codec, codec_p=msg.codec_p, codec_k=msg.codec_k, codec_bits=msg.codec_bits,
                codec_bucket=msg.codec_bucket, outer_lr=msg.outer_lr,
                warmup_rounds=msg.warmup_rounds if msg.HasField("warmup_rounds") else None,
                outer_momentum=msg.outer_momentum if msg.HasField("outer_momentum") else None,
                overlap_rounds=msg.overlap_rounds if msg.HasField("overlap_rounds") else None,
                **{f: getattr(msg, f) if msg.HasField(f) else None
                   for f in ("keep_last", "keep_log_spaced", "keep_every", "keep_max_bytes")},
            )
        except ValueError as e:
            raise InvalidRequest(f"job spec: {e}") from e


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

    async def backward(self, job: Job | None, hidden: torch.Tensor, grad_out: torch.Tensor, *,
                       input_grad: bool = True) -> torch.Tensor | None:
        """job None: the base span's input gradient, nothing trained or counted.
        input_grad False: only the adapter's gradients (returns None); needs a job."""
        self.server.check_hidden(hidden)
        if grad_out.shape != hidden.shape:
            raise InvalidRequest(f"grad_outputs have shape {list(grad_out.shape)}, hidden_states {list(hidden.shape)}")
        if job is None and not input_grad:
            raise InvalidRequest("skip_grad_inputs without a job leaves nothing to compute")
        if self.rounds is not None and job is not None:  # first use here: adopt the last committed round
            await self.rounds.before_step(self, job)
        grad_in = await self.server.run_torch(self._backward_sync, job, hidden, grad_out, input_grad)
        if self.rounds is not None and job is not None:  # after every H inner steps: a DiLoCo round (node/rounds.py)
            await self.rounds.after_backward(self, job)
        return grad_in

    async def check_backward(self, job: Job, hidden: torch.Tensor, grad_out: torch.Tensor,
                             flat: torch.Tensor | None = None) -> torch.Tensor:
        """A spot check of another replica's Backward (issue 18): the input gradient with the
        job's adapter, or with `flat` (that replica's trainable tensors) in its place for the
        call; nothing accumulated, counted or stepped, no round."""
        self.server.check_hidden(hidden)
        if grad_out.shape != hidden.shape:
            raise InvalidRequest(f"grad_outputs have shape {list(grad_out.shape)}, hidden_states {list(hidden.shape)}")
        numel = sum(p.numel() for p in job.adapter.parameters())
        if flat is not None and (flat.dim() != 1 or flat.numel() != numel or not torch.isfinite(flat).all()):
            raise InvalidRequest(f"adapter.flat: {list(flat.shape)} values (finite: {bool(torch.isfinite(flat).all())}), "
                                 f"the job's adapter here has {numel}")
        return await self.server.run_torch(self._check_sync, job, hidden, grad_out, flat)

    async def flat(self, name: str) -> torch.Tensor:
        """The job's trainable tensors as they stand, one flat fp32 tensor (GetState flat)."""
        from pollinate.node.diloco import flatten_params

        job = self.job(name)
        return await self.server.run_torch(lambda: flatten_params(list(job.adapter.parameters())))

    def _check_sync(self, job: Job, hidden: torch.Tensor, grad_out: torch.Tensor,
                    flat: torch.Tensor | None) -> torch.Tensor:
        try:
            return check_backward(job, self.server.span, self.host, hidden, grad_out, flat=flat)
        except SpanError as e:
            raise InvalidRequest(str(e)) from e

    def _backward_sync(self, job: Job | None, hidden: torch.Tensor, grad_out: torch.Tensor,
                       input_grad: bool = True) -> torch.Tensor | None:
        try:
            return backward_step(job, self.server.span, self.host, hidden, grad_out, input_grad=input_grad)
        except SpanError as e:
            raise InvalidRequest(str(e)) from e

    async def state(self, name: str) -> tuple[JobSpec, dict[str, torch.Tensor]]:
        """The job's spec, and its adapter under PEFT names plus its counters as 0-d tensors (`counter.*`)."""
        job = self.job(name)
        if self.rounds is not None:  # a round still out lands first: the state is the job's as it stands
            await self.rounds.settled(self, job)
        state = await self.server.run_torch(job.adapter.peft_state)
        for key in ("inner_steps", "skipped_steps", "tokens"):
            state[f"counter.{key}"] = torch.tensor(getattr(job, key), dtype=torch.int64)
        return job.spec, state
