"""The job registry (issue 5): training jobs by name, with their settings, in the store.

A job is registered by `pollinate job create` or by the first `pollinate train
--coordinator` that names it. Its settings are the JobSpec nodes get in request headers
(protocol/shared.py), kept here as plain values (node.proto's field names); CreateJob
checks a spec with that same JobSpec, so the coordinator refuses what nodes would. Registering the same name again with the same settings is a
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
from pollinate.protocol.shared import JobSpec
from pollinate.protocol.v1 import node_pb2

logger = logging.getLogger(__name__)

# Names end up in file paths on nodes and in URLs: letters, digits, '.', '_', '-'.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def spec_to_dict(spec) -> dict:
    """Every field of a node.proto JobSpec (defaults included) as plain values; an unset
    `optional` field is left out, so that unset (the node's default) is not stored as 0."""
    return {f.name: (v if isinstance(v, (str, int, float)) else list(v))
            for f in spec.DESCRIPTOR.fields for v in [getattr(spec, f.name)]
            if not (f.has_presence and not spec.HasField(f.name))}


def check_spec(spec: dict) -> None:
    """Every check a node makes on a spec, except its targets against the node's blocks: the
    stored form is read back into the shared JobSpec (protocol/shared.py), whose construction
    checks each field's range and the method's and codec's rules."""
    try:
        msg = node_pb2.JobSpec(**spec)
    except (ValueError, TypeError) as e:  # a field the message lacks, or of the wrong type
        raise InvalidRequest(f"job spec: {e}") from None
    JobSpec.from_proto(msg)  # InvalidRequest "job spec: ..." naming the field


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

    # ---- what trainers report, and the job's whole record (issue 15) -------------------

    def report_training(self, name: str, trainer_id: str, *, data_files: list[dict], step: int, tokens: int,
                        train_loss: float | None, heldout_loss: float | None, version: str = "",
                        git_commit: str = "") -> int:
        """Store a trainer's data files (its first report) and its losses, the latter with the
        job's last committed round (the highest over its spans: the adapters the losses were
        measured with include it); that round is returned."""
        self.get(name)  # NotFound for a job never registered nor seen in a round
        if not trainer_id or len(trainer_id) > 64:
            raise InvalidRequest("ReportTraining: trainer_id must be 1-64 characters")
        for loss in (train_loss, heldout_loss):
            if loss is not None and not math.isfinite(loss):
                raise InvalidRequest(f"ReportTraining: loss must be finite, got {loss!r}")
        if len(data_files) > MAX_DATA_FILES:
            raise InvalidRequest(f"ReportTraining: {len(data_files)} data files, at most {MAX_DATA_FILES}")
        for f in data_files:
            if f["role"] not in ("train", "heldout") or not SHA256_RE.fullmatch(f["sha256"]):
                raise InvalidRequest(f"ReportTraining: data file {f['name'][:64]!r}: role must be train or "
                                     f"heldout and sha256 64 hex digits")
        now = time.time()
        if data_files:
            self.store.add_trainer(name, trainer_id, data_files=data_files, version=version[:64],
                                   git_commit=git_commit[:64], now=now)
        round_index = self.store.last_job_round(name)
        if train_loss is not None or heldout_loss is not None:
            self.store.add_loss_report(name, trainer_id, round_index=round_index, step=step, tokens=tokens,
                                       train_loss=train_loss, heldout_loss=heldout_loss, now=now)
            logger.info("job %s round %d: trainer %s step %d%s%s", name, round_index, trainer_id, step,
                        "" if train_loss is None else f" train loss {train_loss:.4f}",
                        "" if heldout_loss is None else f" held-out loss {heldout_loss:.4f}")
        return round_index

    def history(self, name: str) -> dict:
        """The job, every committed round of it (kept or pruned), the losses and the trainers."""
        job = self.get(name)
        return {"job": job, "rounds": self.store.job_rounds(name), "losses": self.store.loss_reports(name),
                "trainers": self.store.trainers(name), "analysis": self.store.analyses(name)}

    def report_analysis(self, name: str, rows: list[dict], *, data_sha256: str = "", heldout_sha256: str = "") -> int:
        """Store `pollinate analyze` results (client/analysis.py) for the job's status page."""
        self.get(name)
        if len(rows) > MAX_ANALYSIS_ROUNDS:
            raise InvalidRequest(f"ReportAnalysis: {len(rows)} rounds, at most {MAX_ANALYSIS_ROUNDS}")
        for r in rows:
            values = [r[k] for k in ("train_loss", "heldout_loss", "verbatim_train", "verbatim_heldout")]
            if not r["round"] >= 1 or not all(math.isfinite(v) for v in values) or not (
                    0 <= r["verbatim_train"] <= 1 and 0 <= r["verbatim_heldout"] <= 1):
                raise InvalidRequest(f"ReportAnalysis: round {r['round']}: round >= 1, finite losses and "
                                     f"verbatim rates in [0, 1] expected")
        for sha in (data_sha256, heldout_sha256):
            if sha and not SHA256_RE.fullmatch(sha):
                raise InvalidRequest("ReportAnalysis: sha256 must be 64 hex digits")
        self.store.save_analysis(name, rows, data_sha256=data_sha256, heldout_sha256=heldout_sha256, now=time.time())
        logger.info("job %s: analysis of %d round(s) stored", name, len(rows))
        return len(rows)


MAX_ANALYSIS_ROUNDS = 100_000  # per ReportAnalysis: more rounds than any job keeps
MAX_DATA_FILES = 16  # per trainer report: a train and a held-out file, with room to spare
SHA256_RE = re.compile(r"[0-9a-f]{64}")
