"""Which committed rounds the coordinator keeps on disk (issue 15): pure policy.

Every committed round of a (job, span) is an intermediate checkpoint. Keeping all of them
forever fills the disk (a full-span job stores its span's weights each round), so the
coordinator keeps them as Pythia spaces its checkpoints: the last K rounds, the rounds on a
log-spaced schedule (1, 2, 4, 8, ...: early training changes fastest) and every M-th round.
Beyond that a per-job byte cap and a coordinator-wide one prune the oldest kept rounds
first. The last committed round of each span is never pruned: it is what a late joiner
restores from and what the next round is rebuilt from (coordinator/rounds.py).

    plan = plan_retention(checkpoints, policies, coordinator_max_bytes=10**9)
    plan.prune  # {(job, start, end, round): "schedule" | "job cap" | "coordinator cap"}

The store records what was pruned (committed_states.pruned_at / pruned_reason) and keeps the
row, so the round's checksum, members and tokens stay in the job's record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

# Defaults for a job that sets none (JobSpec.keep_*): the last 3 rounds, so a bad last
# round can be rolled past; log-spaced rounds, which cost log2(rounds) states; every 10th
# round, an even sample of the whole run.
DEFAULT_KEEP_LAST = 3
DEFAULT_KEEP_LOG_SPACED = True
DEFAULT_KEEP_EVERY = 10
DEFAULT_KEEP_MAX_BYTES = 0  # no per-job cap unless the job sets one

CheckpointKey = tuple[str, int, int, int]  # job, span start, span end, round


@dataclass(frozen=True, kw_only=True)
class RetentionPolicy:
    """One job's retention settings, resolved over the defaults."""

    keep_last: int = DEFAULT_KEEP_LAST  # the last K committed rounds of each span (>= 1 in effect)
    keep_log_spaced: bool = DEFAULT_KEEP_LOG_SPACED  # rounds 1, 2, 4, 8, ...
    keep_every: int = DEFAULT_KEEP_EVERY  # rounds M, 2M, ...; 0 = none
    max_bytes: int = DEFAULT_KEEP_MAX_BYTES  # the job's kept states at most this many bytes; 0 = no cap

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every", "max_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"retention: {name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_spec(cls, spec: Mapping) -> RetentionPolicy:
        """From a stored job spec (node.proto JobSpec field names; a field left out = the default)."""
        def pick(field: str, default):
            value = spec.get(field)
            return default if value is None else value

        return cls(keep_last=int(pick("keep_last", DEFAULT_KEEP_LAST)),
                   keep_log_spaced=bool(pick("keep_log_spaced", DEFAULT_KEEP_LOG_SPACED)),
                   keep_every=int(pick("keep_every", DEFAULT_KEEP_EVERY)),
                   max_bytes=int(pick("keep_max_bytes", DEFAULT_KEEP_MAX_BYTES)))


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def scheduled(rounds: Iterable[int], policy: RetentionPolicy) -> set[int]:
    """The rounds of one span's committed `rounds` the schedule keeps (its last one always)."""
    ordered = sorted(set(rounds))
    if not ordered:
        return set()
    keep = set(ordered[-max(1, policy.keep_last):])
    for r in ordered:
        if (policy.keep_log_spaced and is_power_of_two(r)) or (policy.keep_every and r % policy.keep_every == 0):
            keep.add(r)
    return keep


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    key: CheckpointKey
    nbytes: int
    committed_at: float


@dataclass(frozen=True, kw_only=True)
class RetentionPlan:
    keep: frozenset[CheckpointKey]
    prune: dict[CheckpointKey, str]  # checkpoint -> why


def plan_retention(checkpoints: Iterable[Checkpoint], policies: Mapping[str, RetentionPolicy], *,
                   coordinator_max_bytes: int = 0) -> RetentionPlan:
    """What to keep of the `checkpoints` still stored: per span the schedule, then the
    job's cap, then the coordinator's, each cap pruning the oldest kept rounds (by commit
    time, then round) first. A span's last round is kept whatever the caps say, so a cap
    smaller than the last rounds' states is exceeded by them alone."""
    checkpoints = list(checkpoints)
    by_span: dict[tuple[str, int, int], list[Checkpoint]] = {}
    for c in checkpoints:
        by_span.setdefault(c.key[:3], []).append(c)
    last = {max(cs, key=lambda c: c.key[3]).key for cs in by_span.values()}
    prune: dict[CheckpointKey, str] = {}
    for span, cs in by_span.items():
        policy = policies.get(span[0], RetentionPolicy())
        keep = scheduled([c.key[3] for c in cs], policy)
        prune.update({c.key: "schedule" for c in cs if c.key[3] not in keep})
    kept = [c for c in checkpoints if c.key not in prune]
    oldest_first = sorted(kept, key=lambda c: (c.committed_at, c.key[3], c.key))

    def cap(cands: list[Checkpoint], limit: int, why: str) -> None:
        total = sum(c.nbytes for c in cands if c.key not in prune)
        for c in cands:
            if total <= limit:
                return
            if c.key in last or c.key in prune:
                continue
            prune[c.key] = why
            total -= c.nbytes

    for job, policy in sorted(policies.items()):
        if policy.max_bytes:
            cap([c for c in oldest_first if c.key[0] == job], policy.max_bytes, "job cap")
    if coordinator_max_bytes:
        cap(oldest_first, coordinator_max_bytes, "coordinator cap")
    return RetentionPlan(keep=frozenset(c.key for c in checkpoints if c.key not in prune), prune=prune)
