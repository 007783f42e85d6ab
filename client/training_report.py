"""What a trainer tells the coordinator about its run (issue 15): its data and its losses.

When it joins a job, a trainer reports each data file it reads (size, SHA-256, how many
examples it took for training or held-out evaluation) and its code version: the job's open
record (`pollinate job record`) is built from these. At each evaluation (the trainer's
--eval-every) it reports the held-out loss and the mean training loss since its previous
report; the coordinator stores them with the job's last committed round, and the status
page draws them per round. A report that fails is logged and training goes on: the record
then lacks it, the training does not.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

READ_CHUNK = 1 << 20  # bytes per read while hashing a data file


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, hex SHA-256) of the file's bytes."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def data_file(path: Path, role: str, examples: int) -> dict:
    size, sha = file_digest(path)
    return {"role": role, "name": Path(path).name, "size_bytes": size, "sha256": sha, "examples": examples}


class TrainingReporter:
    """Sends ReportTraining calls on the trainer's loop thread (client/worker.py LoopThread)."""

    def __init__(self, coordinator: str, token: str, job: str, *, worker, tls: dict | None = None,
                 timeout_s: float = 10.0) -> None:
        self.coordinator = coordinator
        self.token = token
        self.job = job
        self.worker = worker
        self.tls = tls or {}
        self.timeout_s = timeout_s  # per report; a slow coordinator costs training at most this
        self.trainer_id = uuid.uuid4().hex[:16]
        self.rounds: list[int] = []  # the round each loss report was stored with

    def _send(self, request) -> int | None:
        from pollinate.coordinator.client import call_coordinator
        from pollinate.protocol.errors import PollinateError

        try:
            reply = self.worker.run(call_coordinator(self.coordinator, self.token, "ReportTraining", request,
                                                     timeout_s=self.timeout_s, **self.tls), self.timeout_s + 5)
            return int(reply.round)
        except (PollinateError, TimeoutError) as e:
            logger.warning("job %s: report to the coordinator failed (%s); training goes on", self.job, e)
            return None

    def joined(self, files: list[dict]) -> None:
        """The first report: the data files and the code version."""
        from pollinate.client.checkpoints import code_version
        from pollinate.protocol.v1 import coordinator_pb2

        code = code_version()
        self._send(coordinator_pb2.ReportTrainingRequest(
            job=self.job, trainer_id=self.trainer_id, data_files=[coordinator_pb2.DataFile(**f) for f in files],
            version=code["version"], git_commit=code["git_commit"]))

    def __call__(self, record: dict) -> None:
        """Trainer.train's `report`: a record with train_loss and eval_loss."""
        from pollinate.protocol.v1 import coordinator_pb2

        r = self._send(coordinator_pb2.ReportTrainingRequest(
            job=self.job, trainer_id=self.trainer_id, step=record["step"], tokens=record["tokens"],
            train_loss=record.get("train_loss"), heldout_loss=record.get("eval_loss")))
        if r is not None:
            self.rounds.append(r)
