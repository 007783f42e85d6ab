"""For test_checkpoints.py: registers job "ckpt" at the coordinator with a retention schedule
(or reuses it), reports a trainer's data file and a loss per round as `pollinate train`
would (client/training_report.py), and trains the one replica with H = 1 (one round per
Backward) for --steps steps, waiting for each round to commit before the next step so that
every round is a separate commit. Prints one JSON line: the rounds the reports were
stored with and the coordinator's last round."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rounds_client import coordinator_state, job_spec, train_steps  # noqa: E402

JOB = "ckpt"
RETENTION = {"keep_last": 2, "keep_log_spaced": True, "keep_every": 5}


def spec():
    s = job_spec(1, overlap=False)
    for k, v in RETENTION.items():
        setattr(s, k, v)
    return s


async def main_async(args) -> dict:
    from pollinate.client.training_report import data_file
    from pollinate.coordinator.client import call_coordinator
    from pollinate.protocol.channels import ChannelConfig
    from pollinate.protocol.v1 import coordinator_pb2

    cfg = ChannelConfig(token=args.token)
    await call_coordinator(args.coordinator, args.token, "CreateJob", coordinator_pb2.CreateJobRequest(name=JOB, spec=spec()))
    trainer = f"trainer-{args.seed}"
    files = [data_file(Path(args.data), "train", 3)]
    await call_coordinator(args.coordinator, args.token, "ReportTraining", coordinator_pb2.ReportTrainingRequest(
        job=JOB, trainer_id=trainer, data_files=[coordinator_pb2.DataFile(**f) for f in files], version="test"))
    stored_with = []
    start, _, _ = await _last_round(cfg, args.coordinator)
    for step in range(1, args.steps + 1):
        await train_steps(cfg, args.node, JOB, spec(), seed=args.seed + step, steps=1, timeout=120)
        while (await _last_round(cfg, args.coordinator))[0] < start + step:  # the round's commit, with a deadline
            await asyncio.sleep(0.05)
        reply = await call_coordinator(args.coordinator, args.token, "ReportTraining", coordinator_pb2.ReportTrainingRequest(
            job=JOB, trainer_id=trainer, step=step, tokens=8 * step, train_loss=10.0 / step, heldout_loss=11.0 / step))
        stored_with.append(reply.round)
    return {"stored_with": stored_with, "round": (await _last_round(cfg, args.coordinator))[0]}


async def _last_round(cfg, coordinator: str):
    from pollinate.protocol.errors import NotFound

    try:
        return await coordinator_state(cfg, coordinator, JOB, 4)
    except Exception as e:  # NOT_FOUND before the first commit, as a gRPC error or translated
        if isinstance(e, NotFound) or "NOT_FOUND" in str(e) or "no committed round" in str(e):
            return 0, None, None
        raise


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--coordinator", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(json.dumps(asyncio.run(asyncio.wait_for(main_async(args), 600))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
