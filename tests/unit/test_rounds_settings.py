"""Per-job DiLoCo settings (JobSpec fields 20-27) and bytes per round at the coordinator
(issue 6): the settings override DiLoCoConfig's defaults (read from it, never copied), bad
values are refused with the setting named, unset stays distinct from 0 through the proto
and the coordinator's job registry; the bytes a member reports with CommitRound are stored
with the round and shown by status (JSON, StatusReply, `pollinate status`)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses

import pytest

from pollinate.client.cli_job import add_job_arguments, job_spec
from pollinate.client.cli_status import format_rounds
from pollinate.coordinator.config import RoundsConfig, StoreConfig
from pollinate.coordinator.jobs import spec_to_dict
from pollinate.coordinator.rounds import Rounds
from pollinate.coordinator.service import status_to_proto
from pollinate.coordinator.store import Store
from pollinate.node.diloco import (ADAPTER_COCKTAIL_P, ADAPTER_OUTER_LR, ADAPTER_OUTER_MOMENTUM,
                                   ADAPTER_SOLO_OUTER_OPTIMIZER, DENSE_OUTER_OPTIMIZER, DiLoCoConfig,
                                   job_diloco_config)
from pollinate.protocol.errors import InvalidRequest
from pollinate.protocol.shared import JobSpec
from pollinate.protocol.v1 import node_pb2
from test_coordinator_rounds import SPAN, STEP, Job, membership


def test_unset_settings_are_the_diloco_defaults_and_set_ones_override_them():
    # full-weight jobs get DiLoCoConfig's defaults; adapter jobs (LoRA by default) their outer
    # optimizer, mask share and solo step
    assert job_diloco_config(JobSpec(method="full")) == DiLoCoConfig()
    assert job_diloco_config(JobSpec()) == dataclasses.replace(
        DiLoCoConfig(), outer_lr=ADAPTER_OUTER_LR, outer_momentum=ADAPTER_OUTER_MOMENTUM,
        codec_params=dict(DiLoCoConfig().codec_params, p=ADAPTER_COCKTAIL_P),
        solo_outer_optimizer=ADAPTER_SOLO_OUTER_OPTIMIZER)
    ia3 = job_diloco_config(JobSpec(method="ia3", outer_lr=2.0, outer_momentum=0.0, codec_p=0.5))
    assert (ia3.outer_lr, ia3.outer_momentum, ia3.codec_params["p"]) == (2.0, 0.0, 0.5)  # set ones win
    default = DiLoCoConfig()
    cfg = job_diloco_config(JobSpec(method="full", round_steps=7, codec_p=0.5, warmup_rounds=0, outer_lr=0.3,
                                    outer_momentum=0.0))
    expected_params = dict(default.codec_params, p=0.5) if default.codec == "cocktail" else {"p": 0.5}
    assert cfg == dataclasses.replace(default, inner_steps=7, codec="cocktail", codec_params=expected_params,
                                      warmup_rounds=0, outer_lr=0.3, outer_momentum=0.0)
    cfg = job_diloco_config(JobSpec(codec="int8"))
    assert (cfg.codec, dict(cfg.codec_params)) == ("int8", {})
    # a dense codec gets the DiLoCo paper's outer optimizer, not the cocktail default ...
    assert (cfg.outer_lr, cfg.outer_momentum) == DENSE_OUTER_OPTIMIZER != (default.outer_lr, default.outer_momentum)
    # ... unless the job sets its own
    cfg = job_diloco_config(JobSpec(codec="none", outer_lr=0.5, outer_momentum=0.0))
    assert (cfg.outer_lr, cfg.outer_momentum) == (0.5, 0.0)
    # a lone replica's rounds: uncompressed at the dense optimizer for the cocktail codec; a
    # dense job's rounds are the same alone or not
    assert default.solo_outer_optimizer == DENSE_OUTER_OPTIMIZER and cfg.solo_outer_optimizer is None
    cfg = job_diloco_config(JobSpec(codec="cocktail", codec_bits=4, codec_bucket=128, codec_k=0.25))
    assert {k: cfg.codec_params[k] for k in ("bits", "bucket", "k")} == {"bits": 4, "bucket": 128, "k": 0.25}


@pytest.mark.parametrize("bad, words", [
    (dict(codec="zstd"), "codec must be one of cocktail, int8, fp16, none"),
    (dict(codec_p=1.5), "p must be in (0, 1]"),
    (dict(codec_k=-0.1), "k must be in (0, 1]"),
    (dict(codec_bits=9), "bits must be an int in [1, 8]"),
    (dict(codec="fp16", codec_p=0.5), "p are cocktail settings; codec 'fp16' takes none"),
    (dict(outer_momentum=1.0), "outer_momentum must be in [0, 1)"),
    (dict(outer_lr=-1.0), "outer_lr must be > 0"),
])
def test_bad_settings_are_refused_naming_the_setting(bad, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        JobSpec(**bad)
    msg = JobSpec().to_proto(node_pb2)
    for key, value in bad.items():
        setattr(msg, key, value)
    with pytest.raises(InvalidRequest, match="job spec"):  # what a node answers a bad header with
        JobSpec.from_proto(msg)


def test_unset_and_zero_stay_apart_through_the_proto_and_the_job_registry():
    for spec in (JobSpec(), JobSpec(outer_momentum=0.0, warmup_rounds=0), JobSpec(outer_momentum=0.5, warmup_rounds=2)):
        msg = spec.to_proto(node_pb2)
        assert JobSpec.from_proto(msg) == spec
        stored = spec_to_dict(msg)  # what the coordinator's registry keeps (JSON)
        assert JobSpec.from_proto(node_pb2.JobSpec(**stored)) == spec
    assert "outer_momentum" not in spec_to_dict(JobSpec().to_proto(node_pb2))


def test_train_flags_set_the_job_settings():
    parser = argparse.ArgumentParser()
    add_job_arguments(parser)
    spec = job_spec(parser.parse_args(["--round-steps", "10", "--diloco-codec", "cocktail", "--diloco-bits", "2",
                                       "--outer-momentum", "0", "--warmup-rounds", "1"]))
    assert (spec.round_steps, spec.codec, spec.codec_bits, spec.outer_momentum, spec.warmup_rounds) == (
        10, "cocktail", 2, 0.0, 1)
    assert spec.outer_lr == 0.0 and spec.codec_p == 0.0  # not given: the nodes' defaults
    registered = JobSpec(round_steps=5, codec="fp16", outer_lr=0.5).to_proto(node_pb2)
    spec = job_spec(parser.parse_args([]), registered)  # flags left out: the registered job's
    assert (spec.round_steps, spec.codec, spec.outer_lr) == (5, "fp16", 0.5)
    with pytest.raises(ValueError, match="bits must be an int in"):
        job_spec(parser.parse_args(["--diloco-bits", "12"]))


def test_bytes_reported_with_commit_are_stored_with_the_round_and_shown(tmp_path):
    async def scenario():
        store = Store(StoreConfig(data_dir=tmp_path)).open()
        rounds = Rounds(RoundsConfig(window_s=5.0, commit_timeout_s=5.0), store, membership("a", "b"))
        assert store.last_committed_rounds() == []
        job = Job()
        for r, (sa, sb) in enumerate([(100, 200), (300, 400)], start=1):
            await asyncio.gather(rounds.begin("j", SPAN, r, "a", 1), rounds.begin("j", SPAN, r, "b", 1))
            results, checksum = job.round(r, 2)
            out = await asyncio.gather(
                rounds.commit("j", SPAN, r, "a", checksum, job.state() if r == 1 else b"", bytes_sent=sa,
                              bytes_received=sb, coordinator_bytes_sent=10, coordinator_bytes_received=20,
                              results=[(0, results[0])], outer=STEP, request_bytes=1000),
                rounds.commit("j", SPAN, r, "b", checksum, b"", bytes_sent=sb, bytes_received=sa,
                              results=[(1, results[1])], outer=STEP, request_bytes=2000))
            assert [o.committed for o in out] == [True, True]
        store.close()
        return Store(StoreConfig(data_dir=tmp_path)).open().last_committed_rounds()  # survives a reopen

    (last,) = asyncio.run(scenario())
    assert (last["job"], last["span"], last["round"]) == ("j", [0, 4], 2)
    # ExchangeShard bytes as reported, plus BeginRound's (reported) and CommitRound's (measured here)
    assert last["members"] == [
        {"member_id": "a", "shard_index": 0, "committed": True, "bytes_sent": 1310, "bytes_received": 420,
         "coordinator_bytes_sent": 1010, "coordinator_bytes_received": 20},
        {"member_id": "b", "shard_index": 1, "committed": True, "bytes_sent": 2400, "bytes_received": 300,
         "coordinator_bytes_sent": 2000, "coordinator_bytes_received": 0}]
    status = {"epoch": 1, "model_id": "m", "num_blocks": 4, "members": [], "blocks": [], "holes": [],
              "dht_initial_peers": [], "started_at": 0.0, "version": "v", "heartbeat_period_s": 1.0,
              "lease_s": 4.0, "rounds": [last]}
    reply = status_to_proto(status)
    assert [m.bytes_sent for m in reply.rounds[0].members] == [1310, 2400]
    assert [m.coordinator_bytes_sent for m in reply.rounds[0].members] == [1010, 2000]
    text = format_rounds(reply.rounds, now=last["committed_at"] + 5)
    assert text.splitlines()[2].split() == ["j", "0:4", "2", "5s", "ago", "a", "0", "1.3", "kB", "420", "B"], text


def test_the_node_command_sets_the_round_waits():
    """NodeConfig composes RoundConfig; a volunteer on a slow link sets its waits by flag."""
    import argparse

    from pollinate.node.cli import add_arguments, build_config
    from pollinate.node.rounds import RoundConfig

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--host", "127.0.0.1", "--blocks", "0:2"]
    assert build_config(parser.parse_args(base)).rounds == RoundConfig()
    rounds = build_config(parser.parse_args([*base, "--round-exchange-timeout", "120",
                                             "--round-contribution-wait", "30"])).rounds
    assert (rounds.exchange_timeout_s, rounds.contribution_wait_s) == (120.0, 30.0)
    with pytest.raises(ValueError, match="contribution_wait_s"):  # must stay below the exchange timeout
        build_config(parser.parse_args([*base, "--round-contribution-wait", "90"]))


def test_the_job_flags_help_states_the_defaults_in_force():
    """`pollinate train --help` names the adapter and full-weight outer settings; it does not
    import node/diloco.py (torch), so this keeps its numbers from drifting."""
    import argparse

    from pollinate.client.cli_job import add_job_arguments

    p = argparse.ArgumentParser()
    add_job_arguments(p)
    helps = {a.dest: a.help for a in p._actions}
    full = DiLoCoConfig()
    assert f"[{ADAPTER_OUTER_LR} for adapter jobs, {full.outer_lr} for full weights]" in helps["outer_lr"]
    assert f"[{ADAPTER_OUTER_MOMENTUM} for adapter jobs, {full.outer_momentum} for" in helps["outer_momentum"]
    assert f"[{ADAPTER_COCKTAIL_P} for adapter jobs, {full.codec_params['p']} for" in helps["diloco_p"]
