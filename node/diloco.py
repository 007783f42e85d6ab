"""DiLoCo outer step for one span group: the node-side math of a round, bytes in and bytes out.

A round (DESIGN.md "Training math"; DiLoCo, Douillard et al. 2023):

1. ``contribute``: after H inner steps each member forms its pseudo-gradient
   Δ = θ_global − θ_local in fp32, adds it to its error-feedback residual and compresses the
   result shard by shard (member j owns the j-th 1/N of the flat vector); payload j goes to
   owner j.
2. ``aggregate`` (on each owner): decode the contributions for its shard, reject bad ones
   (undecodable, wrong length, NaN/Inf, norm beyond ``reject_norm_factor`` × the median of the
   others), average the rest weighted by tokens, add the owner's residual, re-compress; the
   bytes go to every member.
3. ``apply``: every member decodes the same result bytes, applies the outer optimizer to
   θ_global in fp32, commits its residuals and returns the checksum of the new global state.
   ``local_start`` then says where the inner optimizer restarts.

Everything here is in-process and deterministic: the network layer (ExchangeShard over gRPC,
coordinator quorum) moves the bytes and compares checksums. The defaults of
``DiLoCoConfig`` come from ``benchmarks/bench_diloco.py`` (see docs/diloco.md).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

# The outer step itself is shared with the coordinator, which rebuilds each committed state
# from the owners' result bytes (issue 12): one piece of code for both sides.
from pollinate.compression.codec import Codec
from pollinate.compression.frame import all_finite
from pollinate.compression.outer import (
    OuterStep,
    OuterStepError,
    apply_results,
    mask_seed,
    shard_bounds,
    state_checksum,
)
from pollinate.protocol.job_limits import DEFAULT_ROUND_CODEC
from pollinate.protocol.shared import JobSpec

DENSE_CODECS = ("none", "fp16", "int8", "int4")  # round codecs that send every element (no mask, no top-k)

logger = logging.getLogger(__name__)


class RoundError(ValueError):
    """A round cannot proceed on this member (bad result bytes, wrong round); nothing changed."""


# (outer lr, outer momentum) for uncompressed rounds: the DiLoCo paper's, the best fp32
# setting bench_diloco measured (1.823 over three seeds, vs 1.953 at 1.2/0.8 and 2.491 at 1.6/0.8)
DENSE_OUTER_OPTIMIZER = (0.7, 0.9)


@dataclass(frozen=True, kw_only=True)
class DiLoCoConfig:
    # inner steps between outer rounds (H); 25 on the toy of benchmarks/bench_diloco.py,
    # DESIGN.md's 100 for real jobs is the DiLoCo paper's setting
    inner_steps: int = 25
    # outer learning rate for the default (cocktail) codec, which damps the step (a 1-bit value
    # is the sign times its bucket's mean magnitude); bench_diloco, momentum 0.8, seeds 0 and 1:
    # lr 1.2 / 1.4 / 1.6 / 2.0 gave val 1.842 / 1.837 / 1.832 / 1.843 with the default codec.
    # Uncompressed rounds want less: fp32 DiLoCo at 1.2/0.8 gave 1.953 (alone: 1.985),
    # its best measured is the DiLoCo paper's 0.7/0.9 (1.825), so a job with a dense codec
    # ("none"/"fp16"/"int8") gets DENSE_OUTER_OPTIMIZER unless it sets its own (job_diloco_config)
    outer_lr: float = 1.6
    # outer momentum coefficient (0 = plain averaging step); DiLoCo paper: 0.9; with the
    # compressed codec bench_diloco measured 0.8 best (1.881 vs 1.888 at 0.9, 1.894 at 0.7)
    outer_momentum: float = 0.8
    # Nesterov (True) or heavy-ball momentum; DiLoCo paper: Nesterov
    nesterov: bool = True
    # codec id in pollinate.compression's registry for compressed rounds
    codec: str = DEFAULT_ROUND_CODEC
    # codec parameters (p: random-mask ratio, k: top-k ratio inside the mask, bits: value
    # bits, bucket: values per fp32 scale). bench_diloco: ~0.77 bit/element, >= 1000x fewer
    # bytes than DDP at H=25; at that budget more coordinates at 1 bit beat top-k (k < 1)
    # every time (p=0.75 with a scale per 1024 beat p=0.7 per 512 by 0.005), and
    # CocktailSGD's p=0.1, k=0.2, bits=4 was worse than training alone
    codec_params: Mapping[str, object] = field(
        default_factory=lambda: {"p": 0.75, "k": 1.0, "bits": 1, "bucket": 1024})
    # first rounds sent uncompressed (codec "none", fp32): lets outer momentum settle
    warmup_rounds: int = 0
    # rounds over which the outer lr ramps up linearly: round r (from 1) steps with
    # outer_lr × min(1, r / outer_lr_warmup_rounds); 0 = the whole lr from round 1 (the
    # default: with adapters' 1.6 / 0.6 it cost the long run 0.4% and did not rescue make
    # demo's two-round job, docs/diloco.md "Adapter jobs' outer optimizer"). A solo round
    # keeps solo_outer_optimizer's lr
    outer_lr_warmup_rounds: int = 0
    # decay of the worker's error-feedback residual per round (1 = classic EF; SparseLoCo
    # uses 0.95 so that stale residuals fade)
    worker_ef_decay: float = 1.0
    # where the unsent residual lives: False = a separate buffer and θ_local ← θ_global
    # (DESIGN.md); True = θ_local ← θ_global − residual, so the inner optimizer does not
    # re-learn progress it has not yet sent. bench_diloco: val 1.911 vs 2.106 (same codec)
    residual_in_local: bool = True
    # owner-side error feedback on the re-compressed average (DESIGN.md; CocktailSGD)
    owner_error_feedback: bool = True
    # A round whose group is this member alone sends nothing, so it runs uncompressed with
    # this outer (lr, momentum) instead of the job's; None: like any other round. bench_diloco's
    # solo arm (one replica, seeds 0-2): see docs/diloco.md; at seed 0 no outer step gave
    # 1.977, the cocktail codec at 1.6/0.8 2.048 (worse than not syncing), fp32 at 0.7/0.9 1.958
    solo_outer_optimizer: tuple[float, float] | None = DENSE_OUTER_OPTIMIZER
    # codec of a solo round's result frame (with solo_outer_optimizer set). The frame travels
    # only to the coordinator, in CommitRound, and the coordinator rebuilds the state by
    # applying the same decoded frame as the member, so any codec keeps the two equal; the
    # worker's error feedback (the residual, residual_in_local) carries what it rounds off
    # into the next round. "int4" (a scale per 128 values, 0.53 B/element) instead of fp32's
    # 4 B: bench_diloco's solo arm, three seeds (docs/diloco.md "Solo rounds' codec"): LoRA r8
    # 2.1110 / 2.1101 / 2.1156 with int4 / int8 / fp32 frames (at 0.7 / 0.9), full weights
    # 1.9859 / 1.9871 with int4 / int8; "none" = fp32
    solo_codec: str = "int4"
    # reject a contribution whose norm exceeds this × the median norm of the others
    # (poisoning guard; honest members differ by well under 10x on the benchmark)
    reject_norm_factor: float = 10.0
    # True: a round runs in the background while the next inner steps proceed, and its outer
    # update lands with the local progress made since the round's snapshot kept
    # (overlap_restart; Streaming DiLoCo's overlap, "DiLoCo with eager updates"); the Backward
    # that reaches the next boundary waits only for a round still running. False: the Backward
    # that ends the H-th step waits for the whole round. Default on: bench_diloco, three seeds,
    # landing overlap_max_steps late vs blocking: 1.8592 vs 1.8570 (full weights, +0.12%) and
    # 2.0014 vs 2.0016 (LoRA r8, -0.01%), within the 0.5% the issue allows (docs/diloco.md)
    overlap_rounds: bool = True
    # Overlapped rounds: the most inner steps a round may stay out after its snapshot; the
    # Backward that makes the step after that waits for it (Streaming DiLoCo's bounded overlap
    # τ). bench_diloco (full weights, three seeds): a round landing 1 step late lost 0.12%
    # (1.8592 vs 1.8570 blocking), 3 steps late 0.32% (1.8630), a whole round (25 steps) late 13% (2.1064),
    # so the staleness is bounded to what was measured to be harmless
    overlap_max_steps: int = 1

    def __post_init__(self) -> None:
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {self.inner_steps}")
        if not self.outer_lr > 0:
            raise ValueError(f"outer_lr must be > 0, got {self.outer_lr}")
        if not 0 <= self.outer_momentum < 1:
            raise ValueError(f"outer_momentum must be in [0, 1), got {self.outer_momentum}")
        if self.warmup_rounds < 0:
            raise ValueError(f"warmup_rounds must be >= 0, got {self.warmup_rounds}")
        if self.outer_lr_warmup_rounds < 0:
            raise ValueError(f"outer_lr_warmup_rounds must be >= 0, got {self.outer_lr_warmup_rounds}")
        if not 0 <= self.worker_ef_decay <= 1:
            raise ValueError(f"worker_ef_decay must be in [0, 1], got {self.worker_ef_decay}")
        if self.solo_outer_optimizer is not None:
            lr, momentum = self.solo_outer_optimizer
            if not (lr > 0 and 0 <= momentum < 1):
                raise ValueError(f"solo_outer_optimizer must be (lr > 0, momentum in [0, 1)), "
                                 f"got {self.solo_outer_optimizer}")
        if self.solo_codec not in DENSE_CODECS:
            raise ValueError(f"solo_codec must be one of {', '.join(DENSE_CODECS)}, got {self.solo_codec!r}")
        if self.overlap_max_steps < 1:
            raise ValueError(f"overlap_max_steps must be >= 1, got {self.overlap_max_steps}")
        if not self.reject_norm_factor > 1:
            raise ValueError(
                f"reject_norm_factor must be > 1, got {self.reject_norm_factor}")


@dataclass(frozen=True, kw_only=True)
class Contribution:
    sender: str  # member id, as the coordinator names it; used in logs and rejections
    tokens: int  # tokens this sender trained on in the round: its weight in the average
    payload: bytes  # the codec frame for the owner's shard


@dataclass(frozen=True, kw_only=True)
class ShardResult:
    payload: bytes  # codec frame of the averaged shard, sent to every member
    accepted: tuple[str, ...]  # senders in the average, sorted
    rejected: Mapping[str, str]  # sender -> reason


# --- pure functions -------------------------------------------------------------------------

def flatten_params(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """One fp32 copy of all trainable tensors, in the given order (empty without any)."""
    if not params:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params])


def assign_flat(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Write a flat fp32 vector back into the tensors (cast to each tensor's dtype)."""
    total = sum(p.numel() for p in params)
    if flat.numel() != total:
        raise ValueError(f"flat vector has {flat.numel()} elements, parameters {total}")
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p))
            offset += n


def overlap_restart(start: torch.Tensor, now: torch.Tensor, snapshot: torch.Tensor) -> torch.Tensor:
    """Where θ_local continues when an overlapped round lands (a new tensor).

    ``start`` is where a blocking round would have restarted the inner steps at the snapshot
    (``local_start()`` after a commit, θ_global after a round given up), ``snapshot`` the
    local vector the round was computed from, ``now`` the local vector when it lands. The
    steps taken since the snapshot are kept: θ_local ← start + (now − snapshot). They are not
    in this round's pseudo-gradient, so the next round's Δ = θ_global − θ_local carries them
    exactly once; a round that lands with no step taken since is the blocking round.
    """
    if not start.numel() == now.numel() == snapshot.numel():
        raise ValueError(f"start, now and snapshot have {start.numel()}, {now.numel()} and "
                         f"{snapshot.numel()} elements")
    return start.reshape(-1) + (now.reshape(-1).to(start.dtype) - snapshot.reshape(-1).to(start.dtype))


def screen(decoded: Mapping[str, torch.Tensor], *, numel: int,
           norm_factor: float) -> tuple[list[str], dict[str, str]]:
    """Split senders into accepted and rejected (with the reason), without side effects."""
    rejected: dict[str, str] = {}
    norms: dict[str, float] = {}
    for sender, x in decoded.items():
        if x.numel() != numel:
            rejected[sender] = f"length {x.numel()} != shard length {numel}"
        elif not all_finite(x):
            rejected[sender] = "NaN/Inf in pseudo-gradient"
        else:
            norms[sender] = float(torch.linalg.vector_norm(x.to(torch.float64)))
    for sender, norm in norms.items():
        others = sorted(v for s, v in norms.items() if s != sender)
        if not others:
            continue
        median = others[len(others) // 2] if len(others) % 2 else \
            0.5 * (others[len(others) // 2 - 1] + others[len(others) // 2])
        if median > 0 and norm > norm_factor * median:
            rejected[sender] = f"norm {norm:.3g} > {norm_factor} x median {median:.3g}"
    accepted = sorted(s for s in norms if s not in rejected)
    return accepted, rejected


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_i x_i / Σ w_i in fp32, summed in the given order (deterministic)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {list(weights)}")
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for x, w in zip(tensors, weights):
        out.add_(x.to(torch.float32), alpha=w / total)
    return out


# --- one member's state ---------------------------------------------------------------------

CodecFactory = Callable[[str, Mapping[str, object]], Codec]


def registry_codec(codec_id: str, params: Mapping[str, object]) -> Codec:
    """The production codec factory: pollinate.compression's registry."""
    from pollinate.compression.codec import get_codec  # compression is a sibling package
    return get_codec(codec_id, **dict(params))


# Outer optimizer and mask share with the cocktail codec for jobs that train adapters (every
# method but "full" and "galore"; DiLoCoConfig's 1.6 / 0.8 / p 0.75 come from training all
# weights). bench_diloco --lora 8, overlapped, three seeds against fp32 DiLoCo's 1.9788
# (benchmarks/results/2026-12-06-diloco-overlap.md): 2.0014 (1.0114) at 1.0 / 0.8 / p 0.75,
# 1.9952 (1.0083, every seed within 1%) here at 1010x fewer bytes than DDP. Larger steps were
# closer on that toy (1.4 / 0.6: 1.0068; 1.6 / 0.6: 1.0056) but `make demo` (two rounds of
# five steps) overshoots with them: 4 of 4 answers in 4 of 5 runs at 1.4, 1 of 3 runs at 1.6,
# 5 of 5 here. Lower momentum with a larger lr: the codec's error feedback already carries
# what a round leaves out, so heavy momentum adds a stale direction on top of the residual
ADAPTER_OUTER_LR = 1.2
ADAPTER_OUTER_MOMENTUM = 0.7
ADAPTER_COCKTAIL_P = 0.73  # 0.75 was 983x fewer bytes than DDP for LoRA r8, under the 1000x bar
# A solo round's outer step for adapter jobs: lr 1, no momentum, so θ_global takes the
# replica's own progress as it is (up to the frame's rounding, which error feedback carries).
# bench_diloco --lora 8, solo arm, three seeds (docs/diloco.md "Solo rounds"): 2.0684 with
# int8 frames against 2.1101 at DENSE_OUTER_OPTIMIZER's 0.7 / 0.9, which had left a lone
# replica 2% behind training with no rounds at all (2.0681). Full weights keep 0.7 / 0.9
ADAPTER_SOLO_OUTER_OPTIMIZER = (1.0, 0.0)


def job_diloco_config(spec: JobSpec) -> DiLoCoConfig:
    """A job's round settings (JobSpec, issue 6) over DiLoCoConfig's defaults: 0 / "" / None
    = the default. Cocktail parameters apply over the default codec's when that is cocktail
    too. The spec checked its settings when it was made (protocol/shared.py); the codec is
    built once more here on the merged parameters, and a ValueError names a bad one."""
    default = DiLoCoConfig()
    given = spec.cocktail_settings()
    key = spec.codec or default.codec
    adapter = key == "cocktail" and spec.method not in ("full", "galore")  # GaLore trains every weight, as full does
    params = dict(default.codec_params) if key == default.codec else {}
    if adapter:
        params["p"] = ADAPTER_COCKTAIL_P
    params.update(given)
    registry_codec(key, params)  # the codec's own checks on the merged parameters
    overrides = {"codec": key, "codec_params": params}
    if key != "cocktail":  # dense rounds: the same optimizer alone or not
        overrides["outer_lr"], overrides["outer_momentum"] = DENSE_OUTER_OPTIMIZER
        overrides["solo_outer_optimizer"] = None
    elif adapter:
        overrides["outer_lr"], overrides["outer_momentum"] = ADAPTER_OUTER_LR, ADAPTER_OUTER_MOMENTUM
        overrides["solo_outer_optimizer"] = ADAPTER_SOLO_OUTER_OPTIMIZER
    if spec.round_steps:
        overrides["inner_steps"] = spec.round_steps
    if spec.warmup_rounds is not None:
        overrides["warmup_rounds"] = spec.warmup_rounds
    if spec.outer_lr:
        overrides["outer_lr"] = spec.outer_lr
    if spec.outer_momentum is not None:
        overrides["outer_momentum"] = spec.outer_momentum
    if spec.overlap_rounds is not None:
        overrides["overlap_rounds"] = spec.overlap_rounds
    return dataclasses.replace(default, **overrides)


class DiLoCoMember:
    """One member of a span group: θ_global, outer momentum and both error-feedback residuals.

    θ_global and the momentum are bit-identical on every member after each ``apply``; the
    residuals are private. ``contribute`` and ``aggregate`` only stage changes; ``apply``
    commits them and ``abort`` drops them, so an aborted round leaves nothing half-applied.
    """

    def __init__(self, initial: torch.Tensor, config: DiLoCoConfig, *,
                 codec_factory: CodecFactory = registry_codec) -> None:
        self.config = config
        # fp32 on the CPU whatever the adapters' device and dtype (issue 7: DiLoCo keeps the
        # outer state in full precision; the codecs work on CPU bytes anyway)
        self.global_flat = initial.detach().reshape(-1).to("cpu", torch.float32).clone()
        self.momentum = torch.zeros_like(self.global_flat)
        self.residual = torch.zeros_like(self.global_flat)  # worker EF, committed
        self.owner_residual = torch.zeros_like(self.global_flat)  # owner EF, committed
        self.rounds_applied = 0
        self._factory = codec_factory
        self._codecs: dict[str, Codec] = {}
        self._staged_residual: torch.Tensor | None = None
        self._staged_owner: dict[int, tuple[int, int, torch.Tensor]] = {}

    @property
    def numel(self) -> int:
        return self.global_flat.numel()

    def solo(self, num_shards: int) -> bool:
        """A group of one with solo settings: nothing is sent, so nothing is compressed."""
        return num_shards == 1 and self.config.solo_outer_optimizer is not None

    def round_codec(self, round_index: int, num_shards: int) -> tuple[str, Mapping[str, object]]:
        """(codec id, params) of a round's frames: fp32 ("none") during warm-up rounds,
        solo_codec in solo rounds, the job's codec otherwise."""
        if self.config.warmup_rounds and round_index <= self.config.warmup_rounds:  # rounds count from 1
            return "none", {}
        if self.solo(num_shards):
            return self.config.solo_codec, {}
        return self.config.codec, self.config.codec_params

    def codec_for(self, round_index: int, num_shards: int) -> Codec:
        key, params = self.round_codec(round_index, num_shards)
        if key not in self._codecs:
            self._codecs[key] = self._factory(key, params)
        return self._codecs[key]

    def local_start(self) -> torch.Tensor:
        """Where the inner optimizer starts the next H steps (a new tensor)."""
        if self.config.residual_in_local:
            return self.global_flat - self.config.worker_ef_decay * self.residual
        return self.global_flat.clone()

    def contribute(self, local_flat: torch.Tensor, *, round_index: int,
                   num_shards: int) -> list[bytes]:
        """Compress this member's pseudo-gradient; payload j is for the owner of shard j."""
        if local_flat.numel() != self.numel:
            raise RoundError(f"local vector has {local_flat.numel()} elements, "
                             f"global {self.numel}")
        delta = self.global_flat - local_flat.detach().reshape(-1).to("cpu", torch.float32)
        if self.config.residual_in_local:
            accum = delta  # θ_local already started at θ_global − decay × residual
        else:
            accum = delta.add_(self.residual, alpha=self.config.worker_ef_decay)
        codec = self.codec_for(round_index, num_shards)
        payloads = []
        for start, stop in shard_bounds(self.numel, num_shards):
            seed = mask_seed(round_index, start)
            payload = codec.encode(accum[start:stop].contiguous(), seed=seed)
            accum[start:stop] -= codec.decode(payload, seed=seed).reshape(-1)
            payloads.append(payload)
        self._staged_residual = accum  # what was not sent
        return payloads

    def aggregate(self, contributions: Sequence[Contribution], *, round_index: int,
                  shard_index: int, num_shards: int) -> ShardResult:
        """Owner of ``shard_index``: screen, average by tokens, re-compress with owner EF."""
        start, stop = shard_bounds(self.numel, num_shards)[shard_index]
        seed = mask_seed(round_index, start)
        codec = self.codec_for(round_index, num_shards)
        decoded: dict[str, torch.Tensor] = {}
        rejected: dict[str, str] = {}
        tokens = {c.sender: c.tokens for c in contributions}
        for c in contributions:
            if c.sender in decoded or c.sender in rejected:
                rejected[c.sender] = "duplicate contribution"
                decoded.pop(c.sender, None)
            elif c.tokens <= 0:
                rejected[c.sender] = f"tokens {c.tokens} <= 0"
            else:
                try:
                    decoded[c.sender] = codec.decode(c.payload, seed=seed).reshape(-1)
                except Exception as exc:  # a malformed frame rejects its sender only
                    rejected[c.sender] = f"undecodable: {exc}"
        accepted, bad = screen(decoded, numel=stop - start,
                               norm_factor=self.config.reject_norm_factor)
        rejected.update(bad)
        for sender, reason in sorted(rejected.items()):
            logger.warning("round %d shard %d: rejected contribution from %s: %s",
                           round_index, shard_index, sender, reason)
        if not accepted:
            raise RoundError(f"round {round_index} shard {shard_index}: no acceptable "
                             f"contribution ({dict(rejected)})")
        average = weighted_average([decoded[s] for s in accepted],
                                   [float(tokens[s]) for s in accepted])
        if self.config.owner_error_feedback:
            average += self.owner_residual[start:stop]
        payload = codec.encode(average.contiguous(), seed=seed)
        leftover = average - codec.decode(payload, seed=seed).reshape(-1)
        if self.config.owner_error_feedback:
            self._staged_owner[shard_index] = (start, stop, leftover)
        return ShardResult(payload=payload, accepted=tuple(accepted), rejected=rejected)

    def outer_settings(self, round_index: int, num_shards: int) -> OuterStep:
        """The codec and outer optimizer of this round: what ``apply`` runs, and what the
        coordinator needs to rebuild the committed state from the result frames."""
        codec, params = self.round_codec(round_index, num_shards)
        params = dict(params)
        if self.solo(num_shards):
            lr, momentum = self.config.solo_outer_optimizer
        else:
            lr, momentum = self.config.outer_lr, self.config.outer_momentum
            if self.config.outer_lr_warmup_rounds:
                lr *= min(1.0, max(1, round_index) / self.config.outer_lr_warmup_rounds)
        return OuterStep(codec=codec, codec_params=params, lr=lr, momentum=momentum,
                         nesterov=self.config.nesterov)

    def apply(self, results: Sequence[bytes], *, round_index: int, num_shards: int) -> str:
        """Decode every shard's result, take the outer step, commit; returns the checksum."""
        if len(results) != num_shards:
            raise RoundError(f"{len(results)} shard results for {num_shards} shards")
        try:  # compression/outer.py: the same code the coordinator rebuilds the state with
            checksum = apply_results(self.global_flat, self.momentum, results,
                          self.outer_settings(round_index, num_shards), round_index=round_index,
                          codec=self.codec_for(round_index, num_shards))
        except OuterStepError as exc:
            raise RoundError(str(exc)) from exc
        if self._staged_residual is not None:
            self.residual = self._staged_residual
        for start, stop, leftover in self._staged_owner.values():
            self.owner_residual[start:stop] = leftover
        self._staged_residual, self._staged_owner = None, {}
        self.rounds_applied += 1
        return checksum

    def abort(self) -> None:
        """Drop what this round staged; θ_global, momentum and residuals stay committed."""
        self._staged_residual, self._staged_owner = None, {}

    def checksum(self) -> str:
        """Checksum of the shared state (θ_global and outer momentum)."""
        return state_checksum(self.global_flat, self.momentum)

    def shared_state(self) -> dict[str, torch.Tensor]:
        """What a late joiner downloads (GetState): θ_global and the outer momentum."""
        return {"global": self.global_flat.clone(), "momentum": self.momentum.clone()}

    def load_shared_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Adopt a committed shared state; private residuals restart at zero."""
        for key in ("global", "momentum"):
            if state[key].numel() != self.numel:
                raise RoundError(f"{key} has {state[key].numel()} elements, want {self.numel}")
        self.global_flat = state["global"].reshape(-1).to("cpu", torch.float32).clone()
        self.momentum = state["momentum"].reshape(-1).to("cpu", torch.float32).clone()
        self.residual.zero_()
        self.owner_residual.zero_()
        self.abort()


@dataclass(frozen=True, kw_only=True)
class RoundReport:
    checksums: tuple[str, ...]  # per member, after apply
    bytes_per_member: tuple[int, ...]  # encoded bytes sent + received by each member
    rejected: Mapping[str, str]  # sender -> reason, over all shards


def exchange_in_process(members: Sequence[DiLoCoMember], local_flats: Sequence[torch.Tensor],
                        tokens: Sequence[int], *, round_index: int,
                        names: Sequence[str] | None = None) -> RoundReport:
    """One whole round among in-process members, the same calls the network layer makes.

    Member j owns shard j. Bytes are counted as they would cross the network: every
    contribution a member sends to another owner (and receives as owner), and every shard
    result an owner sends to the others (and each member receives); nothing a member
    passes to itself.
    """
    n = len(members)
    names = list(names) if names is not None else [f"m{j}" for j in range(n)]
    moved = [0] * n
    payloads = [m.contribute(x, round_index=round_index, num_shards=n)
                for m, x in zip(members, local_flats)]
    results, rejected = [], {}
    for owner in range(n):
        contribs = [Contribution(sender=names[i], tokens=tokens[i], payload=payloads[i][owner])
                    for i in range(n)]
        for i in range(n):
            if i != owner:
                moved[i] += len(payloads[i][owner])
                moved[owner] += len(payloads[i][owner])
        result = members[owner].aggregate(contribs, round_index=round_index,
                                          shard_index=owner, num_shards=n)
        rejected.update(result.rejected)
        for i in range(n):
            if i != owner:
                moved[i] += len(result.payload)
                moved[owner] += len(result.payload)
        results.append(result.payload)
    checksums = tuple(m.apply(results, round_index=round_index, num_shards=n) for m in members)
    return RoundReport(checksums=checksums, bytes_per_member=tuple(moved), rejected=rejected)
