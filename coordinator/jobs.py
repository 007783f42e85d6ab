"""The job registry (issue 5): training jobs by name, with their settings, in the store.

A job is registered by `pollinate job create` or by the first `pollinate train
--coordinator` that names it. Its settings are the JobSpec nodes get in request headers
(node/training.py), kept here as plain values (node.proto's field names) so the
coordinator needs no torch. Registering the same name again with the same settings is a
no-op; with other settings it is refused, naming each field that differs, before any
trainer sends a batch. Nodes do not ask the registry: they still create a job from the
spec in a request header, so a swarm without a coordinator trains as before.

Reads go to SQLite each time rather than a cache: DiLoCo rounds (coordinator/rounds.py)
insert a placeholder row for a job they see first, and the registry must show it.
"""

from __future__ import annotations

import logging
import math
import re
import time

from pollinate.coordinator.store import JobRecord, Store
from pollinate.protocol.errors import FailedPrecondition, InvalidRequest, NotFound
from pollinate.protocol.job_limits import check_job_fields

logger = logging.getLogger(__name__)

# Adapter methods a job may name: node.adapters.METHODS plus the trainer-side CLIENT_METHODS
# (a test keeps the two lists equal; the coordinator does not import torch to read them).
METHODS = ("bottleneck", "full", "galore", "ia3", "llama-adapter", "ln-tuning", "lora", "prefix-tuning",
           "prompt-tuning", "reft")
# Names end up in file paths on nodes and in URLs: letters, digits, '.', '_', '-'.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def spec_to_dict(spec) -> dict:
    """Every field of a node.proto JobSpec (defaults included) as plain values; an unset
    `optional` field is left out, so that unset (the node's default) is not stored as 0."""
    return {f.name: (v if isinstance(v, (str, int, float)) else list(v))
            for f in spec.DESCRIPTOR.fields for v in [getattr(spec, f.name)]
            if not (f.has_presence and not spec.HasField(f.name))}


def check_spec(spec: dict) -> None:
    """The checks that do not need the model; nodes check targets against their blocks."""
    if spec.get("method") not in METHODS:
        raise InvalidRequest(f"unknown adapter method {spec.get('method')!r}; known: {', '.join(METHODS)}")
    for key in ("rank", "lr", "micro_batches"):
        if not spec.get(key, 0) > 0:
            raise InvalidRequest(f"job spec: {key} must be > 0, got {spec.get(key)!r}")
    for key, value in spec.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest(f"job spec: {key} must be finite, got {value!r}")
    try:
        check_job_fields(spec)  # the ranges nodes check too (protocol/job_limits.py)
    except ValueError as e:
        raise InvalidRequest(f"job spec: {e}") from None


def spec_differences(registered: dict, asked: dict) -> list[str]:
    """'field: registered X, asked Y' for each field whose values differ."""
    return [f"{k}: registered {registered.get(k)!r}, asked {asked.get(k)!r}"
            for k in sorted(set(registered) | set(asked)) if registered.get(k) != asked.get(k)]


class Jobs:
    def __init__(self, store: Store, *, base_model: str) -> None:
        self.store = store
        self.base_model = base_model  # the swarm's model: every job fine-tunes it

    def create(self, name: str, spec: dict) -> tuple[JobRecord, bool]:
        """(the job, True if this call registered it); written before returning."""
        if not NAME_RE.fullmatch(name):
            raise InvalidRequest(f"job name {name!r}: 1-64 letters, digits, '.', '_' or '-', "
                                 "starting with a letter or digit")
        check_spec(spec)
        existing = self.store.load_jobs(name)
        if existing and existing[0].spec:
            diff = spec_differences(existing[0].spec, spec)
            if diff:
                raise FailedPrecondition(f"job {name!r} exists with other settings: " + "; ".join(diff))
            return existing[0], False
        now = time.time()
        job = JobRecord(name=name, base_model=self.base_model, spec=dict(spec),
                        state=existing[0].state if existing else "created",
                        created_at=existing[0].created_at if existing else now, updated_at=now)
        self.store.save_job(job)
        logger.info("job %s registered: %s on %s", name, spec["method"], self.base_model)
        return job, True

    def get(self, name: str) -> JobRecord:
        found = self.store.load_jobs(name)
        if not found:
            raise NotFound(f"job {name!r} is not registered at this coordinator")
        return found[0]

    def list(self) -> list[JobRecord]:
        return self.store.load_jobs()
