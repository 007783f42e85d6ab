"""The coordinator's job registry (issue 5): the store, the RPCs over real gRPC on loopback,
status (RPC, JSON, HTML, `pollinate status`), and the `pollinate job` CLI with the same
flags as `pollinate train`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request

import grpc
import pytest

from pollinate.client import cli_job
from pollinate.client.cli_status import format_status
from pollinate.coordinator.config import StoreConfig
from pollinate.coordinator.jobs import Jobs
from pollinate.coordinator.server import CoordinatorServer
from pollinate.coordinator.store import Store
from pollinate.protocol.errors import FailedPrecondition, InvalidRequest, NotFound
from pollinate.protocol.v1 import coordinator_pb2, node_pb2
from test_coordinator_service import TOKEN, config, raw_call

LORA = {"method": "lora", "rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"], "lr": 4e-4,
        "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0, "micro_batches": 1, "seed": 0,
        "round_steps": 0, "feedforward_modules": [], "num_virtual_tokens": 0}


def open_jobs(path) -> Jobs:
    return Jobs(Store(StoreConfig(data_dir=path)).open(), base_model="tiny")


def test_registry_is_idempotent_names_clashing_fields_and_survives_reopening(tmp_path):
    jobs = open_jobs(tmp_path)
    job, created = jobs.create("sums", LORA)
    assert created and job.state == "created" and job.base_model == "tiny" and job.spec == LORA
    again, created = jobs.create("sums", dict(LORA))
    assert not created and again == job
    with pytest.raises(FailedPrecondition) as e:
        jobs.create("sums", {**LORA, "rank": 16, "lr": 1e-3})
    assert str(e.value) == ("job 'sums' exists with other settings: lr: registered 0.0004, asked 0.001; "
                            "rank: registered 8, asked 16")
    jobs.store.close()

    reopened = open_jobs(tmp_path)  # a restarted coordinator reads the same rows back
    assert reopened.list() == [job]
    assert reopened.get("sums").spec == LORA
    with pytest.raises(NotFound, match="job 'other' is not registered"):
        reopened.get("other")


@pytest.mark.parametrize("name, spec, message", [
    ("", LORA, "job name ''"),
    ("a/b", LORA, "job name 'a/b'"),
    ("x" * 65, LORA, "1-64 letters"),
    ("ok", {**LORA, "method": "bogus"}, "unknown adapter method 'bogus'; known: bottleneck, full, galore, ia3, llama-adapter, ln-tuning, lora, prefix-tuning"),
    ("ok", {**LORA, "rank": 0}, "rank must be > 0, got 0"),
    ("ok", {**LORA, "lr": float("nan")}, "lr must be > 0"),
    ("ok", {**LORA, "alpha": float("inf")}, "alpha must be finite"),
])
def test_bad_jobs_are_refused_and_record_nothing(tmp_path, name, spec, message):
    jobs = open_jobs(tmp_path)
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(")):
        jobs.create(name, spec)
    assert jobs.list() == []


def test_a_job_first_seen_in_a_round_is_filled_in_when_registered(tmp_path):
    jobs = open_jobs(tmp_path)
    # what coordinator/rounds.py writes for a job it meets before anyone registered it
    jobs.store.db.execute("INSERT INTO jobs VALUES ('early','','','{}','{}','training',1.0,1.0)")
    assert jobs.get("early").spec == {}
    job, created = jobs.create("early", LORA)
    assert created and job.spec == LORA and job.state == "training" and job.created_at == 1.0
    assert jobs.get("early") == job


def test_job_methods_are_what_nodes_and_trainers_implement():
    from pollinate.node.adapters import CLIENT_METHODS, METHODS
    from pollinate.protocol.shared import JOB_METHODS

    assert set(METHODS) | CLIENT_METHODS == set(JOB_METHODS) and not set(METHODS) & CLIENT_METHODS
    assert CLIENT_METHODS == {"prompt-tuning"}


@pytest.fixture
async def server(tmp_path):
    srv = CoordinatorServer(config(tmp_path / "data"))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(0)


async def test_job_rpcs_status_and_restart(tmp_path):
    srv = CoordinatorServer(config(tmp_path / "data"))
    await srv.start()
    try:
        spec = node_pb2.JobSpec(**LORA)
        reply = await raw_call(srv, "CreateJob", coordinator_pb2.CreateJobRequest(name="sums", spec=spec))
        assert reply.created and reply.job.spec == spec and reply.job.state == "created"
        assert reply.job.base_model == srv.config.membership.model_id
        again = await raw_call(srv, "CreateJob", coordinator_pb2.CreateJobRequest(name="sums", spec=spec))
        assert not again.created and again.job == reply.job
        clash = node_pb2.JobSpec(**{**LORA, "method": "ia3", "targets": ["k_proj", "down_proj"]})
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await raw_call(srv, "CreateJob", coordinator_pb2.CreateJobRequest(name="sums", spec=clash))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "method: registered 'lora', asked 'ia3'" in e.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as e:  # wrong token: refused, nothing recorded
            await raw_call(srv, "CreateJob", coordinator_pb2.CreateJobRequest(name="other", spec=spec), token="bad")
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await raw_call(srv, "GetJob", coordinator_pb2.GetJobRequest(name="other"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert await raw_call(srv, "GetJob", coordinator_pb2.GetJobRequest(name="sums")) == reply.job
        listed = await raw_call(srv, "ListJobs", coordinator_pb2.ListJobsRequest())
        assert [j.name for j in listed.jobs] == ["sums"]

        status = await raw_call(srv, "Status", coordinator_pb2.StatusRequest())
        assert list(status.jobs) == [reply.job]
        text = format_status(status, now=time.time())
        assert "JOB" in text and "sums  lora r=8 alpha=16 lr=0.0004  created" in text, text

        def get(path):
            with urllib.request.urlopen(f"http://{srv.http_address}{path}", timeout=5) as r:
                return r.read().decode()
        body = json.loads(await asyncio.to_thread(get, "/api/v1/status"))
        assert [(j["name"], j["spec"]["rank"], j["state"]) for j in body["jobs"]] == [("sums", 8, "created")]
        page = await asyncio.to_thread(get, "/")
        assert ('<td><a href="/jobs/sums">sums</a></td><td>lora r=8 alpha=16 lr=0.0004</td>'
                '<td><span class="activity created">created</span></td>') in page
    finally:
        await srv.stop(0)

    srv = CoordinatorServer(config(tmp_path / "data"))  # restarted on the same data directory
    await srv.start()
    try:
        assert await raw_call(srv, "GetJob", coordinator_pb2.GetJobRequest(name="sums")) == reply.job
    finally:
        await srv.stop(0)


def job_args(**flags) -> argparse.Namespace:
    return argparse.Namespace(**{k: flags.get(k) for k in cli_job.SPEC_DEFAULTS})


async def test_train_flags_left_out_take_the_registered_settings_and_given_ones_must_match(server):
    from pollinate.protocol.shared import JobSpec

    addr = server.grpc_address
    info, created = await cli_job.register_job(addr, TOKEN, "sums", job_args(rank=16, lr=1e-3))
    assert created and (info.spec.rank, info.spec.lr, info.spec.alpha) == (16, 1e-3, 16.0)
    # `train --job sums` alone trains with the registered settings
    info2, created = await cli_job.register_job(addr, TOKEN, "sums", job_args())
    assert not created and info2 == info
    # flags equal to the registration are fine; the rest still come from it
    info3, created = await cli_job.register_job(addr, TOKEN, "sums", job_args(rank=16))
    assert not created and JobSpec.from_proto(info3.spec) == JobSpec.from_proto(info.spec)
    with pytest.raises(FailedPrecondition, match="job 'sums' exists with other settings: rank: registered 16, asked 4"):
        await cli_job.register_job(addr, TOKEN, "sums", job_args(rank=4))
    # a new job takes the defaults for what is not given
    info4, created = await cli_job.register_job(addr, TOKEN, "plain", job_args())
    assert created and JobSpec.from_proto(info4.spec) == JobSpec()


async def test_job_cli_create_list_show(server, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    env = {**os.environ, "POLLINATE_TOKEN": ""}

    async def job(*args):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pollinate", "job", *args, "--coordinator", server.grpc_address,
            "--token-file", str(token_file), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode(), err.decode()

    rc, out, err = await job("create", "sums", "--rank", "4", "--json")
    assert rc == 0 and "registered" in err, err
    assert json.loads(out)["spec"]["rank"] == 4
    rc, out, err = await job("create", "sums", "--rank", "4")
    assert rc == 0 and "already registered with these settings" in err, err
    rc, out, err = await job("create", "sums", "--method", "ia3")
    assert rc == 1 and "method: registered 'lora', asked 'ia3'" in err, err
    rc, out, err = await job("create", "bad", "--method", "bogus")
    assert rc == 2 and "unknown adapter method 'bogus'" in err, err
    rc, out, err = await job("list")
    assert rc == 0 and out.splitlines()[1].startswith("sums  lora r=4 alpha=16 lr=0.0004  created"), out
    rc, out, err = await job("show", "sums")
    assert rc == 0 and json.loads(out)["spec"]["rank"] == 4
    rc, out, err = await job("show", "nope")
    assert rc == 1 and "job 'nope' is not registered" in err, err
