"""The committed states on the coordinator's disk as checkpoints (issue 15): retention applied.

Every committed round's state is written by coordinator/rounds.py; after each commit, and
once when the coordinator starts, `Checkpoints.apply` plans what to keep with the pure
policy of coordinator/retention.py (each job's schedule and cap, the coordinator-wide
cap), records the pruned rounds in the store first and then deletes their files. A crash
between the two leaves files of rounds already recorded as pruned: the next `apply`
deletes them (`sweep`). So a restarted coordinator keeps exactly what the schedule and the
caps say, whatever instant it was killed at.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pollinate.coordinator.retention import Checkpoint, RetentionPlan, RetentionPolicy, plan_retention
from pollinate.coordinator.store import Store

logger = logging.getLogger(__name__)


class Checkpoints:
    def __init__(self, store: Store, *, max_bytes: int = 0) -> None:
        self.store = store
        self.max_bytes = max_bytes  # coordinator-wide cap on kept states, bytes; 0 = none

    def policies(self) -> dict[str, RetentionPolicy]:
        """Each job's retention settings over the defaults (a job with a bad stored value gets
        the defaults, logged: retention must not stop commits)."""
        out = {}
        for job in self.store.load_jobs():
            try:
                out[job.name] = RetentionPolicy.from_spec(job.spec)
            except (TypeError, ValueError) as e:
                logger.warning("job %s: retention settings %s unusable (%s); using the defaults", job.name,
                               {k: v for k, v in job.spec.items() if k.startswith("keep_")}, e)
                out[job.name] = RetentionPolicy()
        return out

    def apply(self) -> RetentionPlan:
        """Prune what the policies and caps no longer keep: recorded, then deleted."""
        rows = self.store.kept_checkpoints()
        plan = plan_retention(
            [Checkpoint(key=(j, s, e, r), nbytes=n, committed_at=at) for j, s, e, r, n, at, _ in rows],
            self.policies(), coordinator_max_bytes=self.max_bytes)
        if plan.prune:
            self.store.mark_pruned(plan.prune, time.time())
            by_reason: dict[str, int] = {}
            for why in plan.prune.values():
                by_reason[why] = by_reason.get(why, 0) + 1
            logger.info("pruned %d checkpoint(s) (%s); %d kept", len(plan.prune),
                        ", ".join(f"{n} by {why}" for why, n in sorted(by_reason.items())), len(plan.keep))
        self.sweep()
        return plan

    def sweep(self) -> int:
        """Delete the files of pruned states still on disk; how many were."""
        root = Path(self.store.config.data_dir)
        removed = 0
        for rel in self.store.pruned_paths():
            try:
                (root / rel).unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as e:  # retried at the next apply
                logger.warning("could not delete pruned state %s: %s", rel, e)
        return removed

    def kept_bytes(self, job: str | None = None) -> int:
        return sum(n for j, _, _, _, n, _, _ in self.store.kept_checkpoints() if job is None or j == job)
