"""Types that client, node and coordinator share, owned by none of them (Petals keeps its
shared types in data_structures.py the same way).

- `Span`: blocks [start, end) of the model. `common.proto`'s Span is the same range on the
  wire; `node.span.SpanModule` is the torch module that runs those blocks on a node.
- `JobSpec`: a training job's settings, as a trainer sends them in Forward/Backward headers
  and registers them with the coordinator (`node.proto` JobSpec on the wire). Equal specs
  are the same job. Construction checks every field (the ranges in protocol/job_limits.py
  and the method's own rules), so a spec that exists is one every side accepts.
- `JOB_METHODS`: the adapter methods a job may name and what each needs in its spec. The
  node's adapters (node/adapters METHODS) and the trainer's prompt tuning implement them; a
  unit test keeps the lists equal.

Nothing here imports node/, client/ or coordinator/, nor torch (codec settings are checked by
pollinate.compression, imported only for a spec that sets them).
"""

from __future__ import annotations

from dataclasses import dataclass

from pollinate.protocol.errors import InvalidRequest
from pollinate.protocol.job_limits import COCKTAIL_SETTINGS, check_job_fields, check_round_codec


@dataclass(frozen=True, slots=True, order=True)
class Span:
    """Blocks [start, end) of the model; ordered by start, then end."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"span [{self.start}, {self.end}) must satisfy 0 <= start < end")

    @property
    def length(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


@dataclass(frozen=True, slots=True)
class MethodTraits:
    """What a job of one adapter method needs in its spec."""

    # module name suffixes when the spec names none (PEFT's defaults for Llama);
    # None: the method has no target modules, and a spec may name none
    default_targets: tuple[str, ...] | None = None
    virtual_tokens: bool = False  # sized by num_virtual_tokens (> 0), which no other method takes
    trainer_side: bool = False  # the trainer owns the trainable state; nodes run the base span


JOB_METHODS: dict[str, MethodTraits] = {
    "lora": MethodTraits(default_targets=("q_proj", "v_proj")),  # PEFT's default for Llama
    # PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES["llama"]
    "ia3": MethodTraits(default_targets=("k_proj", "v_proj", "down_proj")),
    "ln-tuning": MethodTraits(default_targets=("input_layernorm", "post_attention_layernorm")),
    "bottleneck": MethodTraits(default_targets=("o_proj", "down_proj")),  # Houlsby: after attention and the MLP
    "full": MethodTraits(),
    "galore": MethodTraits(),
    "reft": MethodTraits(),
    "prefix-tuning": MethodTraits(virtual_tokens=True),
    "llama-adapter": MethodTraits(virtual_tokens=True),
    "prompt-tuning": MethodTraits(virtual_tokens=True, trainer_side=True),  # client/prompt_tuning.py
}
IA3_FEEDFORWARD = ("down_proj",)  # IA3 targets that scale their input: PEFT's ..._IA3_FEEDFORWARD_MODULES["llama"]


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A training job's settings; equal specs = the same job."""

    method: str = "lora"  # adapter method: a key of JOB_METHODS
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
        traits = JOB_METHODS.get(self.method)
        if traits is None:
            raise ValueError(f"unknown adapter method {self.method!r}; known: {', '.join(sorted(JOB_METHODS))}")
        if self.rank <= 0:
            raise ValueError(f"rank must be > 0, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if traits.default_targets is None and self.targets:
            raise ValueError(f"{self.method!r} has no target modules (got {list(self.targets)})")
        if not self.targets and traits.default_targets:  # frozen: resolve defaults once, here
            object.__setattr__(self, "targets", traits.default_targets)
        if traits.default_targets is not None and not self.targets:
            raise ValueError("targets must name at least one module")
        if self.method == "ia3" and not self.feedforward:
            object.__setattr__(self, "feedforward", tuple(t for t in IA3_FEEDFORWARD if t in self.targets))
        if self.method != "ia3" and self.feedforward:
            raise ValueError(f"feedforward modules are an IA3 setting, not {self.method!r}'s")
        if not set(self.feedforward) <= set(self.targets):
            raise ValueError(f"feedforward modules {list(self.feedforward)} must be among the targets {list(self.targets)}")
        if traits.virtual_tokens and self.num_virtual_tokens <= 0:
            raise ValueError(f"{self.method} needs num_virtual_tokens > 0, got {self.num_virtual_tokens}")
        if not traits.virtual_tokens and self.num_virtual_tokens:
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
        if self.outer_lr < 0:
            raise ValueError(f"outer_lr must be > 0, got {self.outer_lr}")
        if self.outer_momentum is not None and not 0 <= self.outer_momentum < 1:
            raise ValueError(f"outer_momentum must be in [0, 1), got {self.outer_momentum}")
        if self.warmup_rounds is not None and self.warmup_rounds < 0:
            raise ValueError(f"warmup_rounds must be >= 0, got {self.warmup_rounds}")
        check_round_codec(self.codec, self.cocktail_settings())  # the codec takes these settings
        check_job_fields({  # then every field's range, NaN and inf refused (protocol/job_limits.py)
            "rank": self.rank, "alpha": self.alpha, "lr": self.lr, "weight_decay": self.weight_decay,
            "beta1": self.betas[0], "beta2": self.betas[1], "grad_clip": self.grad_clip,
            "micro_batches": self.micro_batches, "round_steps": self.round_steps,
            "num_virtual_tokens": self.num_virtual_tokens, "codec": self.codec, "codec_p": self.codec_p,
            "codec_k": self.codec_k, "codec_bits": self.codec_bits, "codec_bucket": self.codec_bucket,
            "warmup_rounds": self.warmup_rounds, "outer_lr": self.outer_lr, "outer_momentum": self.outer_momentum,
            "targets": self.targets, "feedforward_modules": self.feedforward, "keep_last": self.keep_last,
            "keep_every": self.keep_every, "keep_max_bytes": self.keep_max_bytes})

    def cocktail_settings(self) -> dict[str, float | int]:
        """The cocktail codec parameters this job sets, by the codec's names (unset: the default's)."""
        values = (self.codec_p, self.codec_k, self.codec_bits, self.codec_bucket)
        return {name: v for name, v in zip(COCKTAIL_SETTINGS, values) if v}

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
