"""coordinator/retention.py (the schedule and the caps) and coordinator/checkpoints.py
(pruning recorded in the store, files deleted, the last round kept, the state at or before
a round served), in-process on a real SQLite store."""

from __future__ import annotations

import pytest

from pollinate.coordinator.checkpoints import Checkpoints
from pollinate.coordinator.config import StoreConfig
from pollinate.coordinator.jobs import Jobs
from pollinate.coordinator.retention import Checkpoint, RetentionPolicy, plan_retention, scheduled
from pollinate.coordinator.store import Store
from pollinate.protocol.errors import InvalidRequest, NotFound


def test_schedule_keeps_last_k_log_spaced_and_every_mth():
    policy = RetentionPolicy(keep_last=2, keep_log_spaced=True, keep_every=5)
    assert scheduled(range(1, 21), policy) == {1, 2, 4, 8, 16, 5, 10, 15, 20, 19}
    assert scheduled(range(1, 21), RetentionPolicy(keep_last=1, keep_log_spaced=False, keep_every=0)) == {20}
    # keep_last 0 still keeps the last round (what the next round is rebuilt from)
    assert scheduled([3, 5, 6, 7], RetentionPolicy(keep_last=0, keep_log_spaced=False, keep_every=0)) == {7}
    assert scheduled([], RetentionPolicy()) == set()


def test_defaults_and_spec_fields():
    assert RetentionPolicy.from_spec({}) == RetentionPolicy()
    p = RetentionPolicy.from_spec({"keep_last": 4, "keep_log_spaced": False, "keep_every": 0, "keep_max_bytes": 99})
    assert (p.keep_last, p.keep_log_spaced, p.keep_every, p.max_bytes) == (4, False, 0, 99)
    with pytest.raises(ValueError, match="keep_every"):
        RetentionPolicy(keep_every=-1)


def cps(job, rounds, nbytes=100, span=(0, 4)):
    return [Checkpoint(key=(job, *span, r), nbytes=nbytes, committed_at=float(r)) for r in rounds]


def test_job_cap_prunes_oldest_first_and_never_the_last_round():
    every = RetentionPolicy(keep_last=100, keep_log_spaced=False, keep_every=0, max_bytes=350)
    plan = plan_retention(cps("a", range(1, 9)), {"a": every})
    assert sorted(k[3] for k in plan.keep) == [6, 7, 8]
    assert all(why == "job cap" for why in plan.prune.values()) and len(plan.prune) == 5
    # a cap below one state: the last round stays anyway
    tiny = RetentionPolicy(keep_last=100, keep_log_spaced=False, keep_every=0, max_bytes=1)
    assert sorted(k[3] for k in plan_retention(cps("a", range(1, 5)), {"a": tiny}).keep) == [4]


def test_coordinator_cap_spans_jobs_and_spans():
    keep_all = RetentionPolicy(keep_last=100, keep_log_spaced=False, keep_every=0)
    points = cps("a", range(1, 5)) + cps("b", range(1, 5), span=(4, 8)) + cps("b", range(1, 5), span=(0, 4))
    plan = plan_retention(points, {"a": keep_all, "b": keep_all}, coordinator_max_bytes=600)
    kept = sorted(plan.keep)
    # 12 states of 100 B, 600 allowed: the oldest (by commit time) go, each span's round 4 stays
    assert len(kept) == 6 and {("a", 0, 4, 4), ("b", 4, 8, 4), ("b", 0, 4, 4)} <= set(kept)
    assert set(plan.prune.values()) == {"coordinator cap"}
    assert all(k[3] >= 3 for k in kept)


def commit(store: Store, key, r: int, nbytes: int = 100) -> None:
    path = f"states/{key[0]}-{key[1]}-{key[2]}-r{r}.safetensors"
    (store.path.parent / path).parent.mkdir(parents=True, exist_ok=True)
    (store.path.parent / path).write_bytes(b"x" * nbytes)
    store.form_round(key, r, [("m1", 10 * r)], float(r))
    store.report_checksum(key, r, "m1", attempt=1, checksum=f"c{r}", traffic=(0, 0, 0, 0))
    store.commit_round(key, r, path=path, checksum=f"c{r}", nbytes=nbytes, now=float(r))


def test_checkpoints_prune_record_delete_and_survive_reopen(tmp_path):
    store = Store(StoreConfig(data_dir=tmp_path)).open()
    jobs = Jobs(store, base_model="m")
    jobs.create("j", {"method": "lora", "rank": 4, "alpha": 8.0, "lr": 0.01, "micro_batches": 1, "keep_last": 2,
                      "keep_log_spaced": True, "keep_every": 5})
    key = ("j", 0, 4)
    checkpoints = Checkpoints(store)
    for r in range(1, 13):
        commit(store, key, r)
        checkpoints.apply()
    expected = {1, 2, 4, 5, 8, 10, 11, 12}
    rounds = store.job_rounds("j")
    assert {r["round"] for r in rounds if r["kept"]} == expected
    assert {r["round"]: r["pruned_reason"] for r in rounds if not r["kept"]} == {3: "schedule", 6: "schedule",
                                                                                 7: "schedule", 9: "schedule"}
    files = {p.name for p in (tmp_path / "states").iterdir()}
    assert files == {f"j-0-4-r{r}.safetensors" for r in expected}
    # every round keeps its row, checksum and members for the record
    assert [r["checksum"] for r in rounds] == [f"c{r}" for r in range(1, 13)]
    assert rounds[2]["members"] == [{"member_id": "m1", "shard_index": 0, "tokens": 30, "committed": True}]
    # the latest kept state at or before a round
    assert store.kept_state_at_or_before(key, 7)[0] == 5
    assert store.kept_state_at_or_before(key, 12)[0] == 12
    assert store.committed_state_file(key, 9) is None  # pruned
    store.close()
    # reopened with a coordinator cap of 500 B: the oldest kept go, round 12 stays
    store = Store(StoreConfig(data_dir=tmp_path)).open()
    Checkpoints(store, max_bytes=500).apply()
    kept = [r["round"] for r in store.job_rounds("j") if r["kept"]]
    assert kept == [5, 8, 10, 11, 12]
    assert {p.name for p in (tmp_path / "states").iterdir()} == {f"j-0-4-r{r}.safetensors" for r in kept}
    assert {r["round"]: r["pruned_reason"] for r in store.job_rounds("j")}[1] == "coordinator cap"
    store.close()


def test_a_file_left_by_a_kill_between_record_and_delete_is_swept(tmp_path):
    store = Store(StoreConfig(data_dir=tmp_path)).open()
    key = ("k", 0, 4)
    for r in (1, 2, 3):
        commit(store, key, r)
    store.mark_pruned({("k", 0, 4, 1): "schedule"}, 5.0)  # recorded; the kill came before the unlink
    assert (tmp_path / "states" / "k-0-4-r1.safetensors").exists()
    assert Checkpoints(store).sweep() == 1
    assert not (tmp_path / "states" / "k-0-4-r1.safetensors").exists()
    store.close()


def test_losses_are_stored_with_the_last_committed_round_and_reach_the_history(tmp_path):
    store = Store(StoreConfig(data_dir=tmp_path)).open()
    jobs = Jobs(store, base_model="m")
    jobs.create("j", {"method": "lora", "rank": 4, "alpha": 8.0, "lr": 0.01, "micro_batches": 1})
    sha = "ab" * 32
    files = [{"role": "train", "name": "d.jsonl", "size_bytes": 10, "sha256": sha, "examples": 3}]
    assert jobs.report_training("j", "t1", data_files=files, step=0, tokens=0, train_loss=None,
                                heldout_loss=None, version="0.1.0", git_commit="abc") == 0
    commit(store, ("j", 0, 2), 1)
    commit(store, ("j", 2, 4), 1)
    commit(store, ("j", 0, 2), 2)
    assert jobs.report_training("j", "t1", data_files=[], step=5, tokens=50, train_loss=2.0,
                                heldout_loss=3.0) == 2
    jobs.report_training("j", "t2", data_files=[], step=5, tokens=50, train_loss=4.0, heldout_loss=None)
    history = store.round_history("j")
    at2 = [h for h in history if h["round"] == 2]
    assert at2[0]["train_loss"] == 3.0 and at2[0]["heldout_loss"] == 3.0
    assert "train_loss" not in [h for h in history if h["round"] == 1][0]
    assert store.trainers("j") == [{"trainer_id": "t1", "data_files": files, "version": "0.1.0",
                                    "git_commit": "abc", "joined_at": store.trainers("j")[0]["joined_at"]}]
    with pytest.raises(InvalidRequest, match="sha256"):
        jobs.report_training("j", "t3", data_files=[{**files[0], "sha256": "nothex"}], step=0, tokens=0,
                             train_loss=None, heldout_loss=None)
    with pytest.raises(InvalidRequest, match="finite"):
        jobs.report_training("j", "t3", data_files=[], step=0, tokens=0, train_loss=float("nan"), heldout_loss=None)
    with pytest.raises(NotFound):
        jobs.report_training("nope", "t3", data_files=[], step=0, tokens=0, train_loss=1.0, heldout_loss=None)
    store.close()


async def test_trainer_reports_reach_the_record_over_grpc(tmp_path):
    """client/training_report.py against a real coordinator on loopback: the data file's size
    and SHA-256, the losses, and `pollinate job record` / `job show` built from GetJobHistory."""
    import asyncio
    import hashlib

    from pollinate.client.checkpoints import job_history
    from pollinate.client.cli_job import checkpoint_summary, job_record
    from pollinate.client.training_report import TrainingReporter, data_file
    from pollinate.client.worker import LoopThread
    from pollinate.coordinator.client import call_coordinator
    from pollinate.coordinator.server import CoordinatorServer
    from pollinate.protocol.v1 import coordinator_pb2, node_pb2
    from test_coordinator_service import TOKEN, config

    srv = CoordinatorServer(config(tmp_path / "data"))
    await srv.start()
    worker = LoopThread()
    try:
        address = srv.grpc_address
        spec = node_pb2.JobSpec(method="lora", rank=4, alpha=8.0, lr=0.01, micro_batches=1, keep_last=5,
                                keep_every=0)
        await call_coordinator(address, TOKEN, "CreateJob", coordinator_pb2.CreateJobRequest(name="j", spec=spec))
        data = tmp_path / "train.jsonl"
        data.write_bytes(b'{"text": "a b c"}\n' * 3)
        reporter = TrainingReporter(address, TOKEN, "j", worker=worker)
        await asyncio.to_thread(reporter.joined, [data_file(data, "train", 3)])
        await asyncio.to_thread(reporter, {"step": 4, "tokens": 40, "train_loss": 1.5, "eval_loss": 2.5})
        assert reporter.rounds == [0]  # no round committed yet
        history = await job_history(address, TOKEN, "j")
        record = job_record(history)
        assert record["data"] == [{"trainer_id": reporter.trainer_id, "joined_at": record["data"][0]["joined_at"],
                                   "files": [{"role": "train", "name": "train.jsonl", "size_bytes": data.stat().st_size,
                                              "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
                                              "examples": 3}]}]
        assert [(x["step"], x["train_loss"], x["heldout_loss"]) for x in record["losses"]] == [(4, 1.5, 2.5)]
        assert record["settings"]["keep_last"] == 5 and record["rounds"] == []
        summary = checkpoint_summary(history)
        assert summary["retention"] == {"keep_last": 5, "keep_log_spaced": True, "keep_every": 0, "keep_max_bytes": 0,
                                        "coordinator_max_bytes": 0}
        assert record["code"]["trainers"][0]["version"] and record["code"]["coordinator"]
    finally:
        worker.stop()
        await srv.stop(0)
