"""Overlapped rounds (node/rounds.py, DiLoCoConfig.overlap_rounds): the scheduling, with the
coordinator and ExchangeShard replaced by an in-process round of the real DiLoCoMember that
ends when the test says so (the round's network part is what tests/integration/test_rounds*.py
cover in both modes).

What must hold: the Backward that ends a round's steps does not wait for it; the steps made
while it is out are kept when it lands (θ_local ← restart point + progress since the
snapshot); a Backward waits for a round still out after overlap_max_steps steps (or at the
next boundary), and only then; each round logs one backward_wait_s line; a round that crashes
leaves the adapter as it is and the next Backward starts it again; a pseudo-gradient carries
each step exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import re
from types import SimpleNamespace

import pytest
import torch

from pollinate.node.diloco import (DiLoCoConfig, DiLoCoMember, assign_flat, exchange_in_process, job_diloco_config,
                                   flatten_params, overlap_restart)
from pollinate.node.rounds import RoundConfig, RoundDriver, JobRounds
from pollinate.protocol.identity import NodeIdentity

NUMEL = 6
H = 2


def config(overlap: bool, max_steps: int = 100) -> DiLoCoConfig:
    # fp32 rounds, one member, outer SGD without momentum at lr 0.5: θ_global moves halfway
    # to the member's θ_local, so every number below can be written down by hand. max_steps
    # 100 (> H): a round may stay out until the next boundary
    return DiLoCoConfig(inner_steps=H, codec="none", codec_params={}, outer_lr=0.5, outer_momentum=0.0,
                        solo_outer_optimizer=None, overlap_rounds=overlap, overlap_max_steps=max_steps)


class Driver(RoundDriver):
    """RoundDriver whose run_round is the same round in process (the commit part of _attempt:
    apply, restart the given params from local_start, count from here), held until released."""

    def __init__(self) -> None:
        super().__init__(RoundConfig(), coordinator_address="127.0.0.1:1", token="t",
                         member_id=lambda: "m0", framing=None, identity=NodeIdentity.generate())
        self.gate = asyncio.Event()
        self.fail_next = False
        self.rounds: list[tuple[torch.Tensor, int]] = []  # (θ_local the round read, its tokens)

    async def run_round(self, manager, job, state, *, params=None, tokens=None) -> bool:
        params = params if params is not None else list(job.adapter.parameters())
        tokens = tokens if tokens is not None else max(job.tokens - state.tokens_at_round, 1)
        await self.gate.wait()
        self.gate.clear()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected: the round crashed")
        local = flatten_params(params)
        self.rounds.append((local, tokens))
        r = state.committed_round + 1
        exchange_in_process([state.member], [local], [tokens], round_index=r)
        assign_flat(params, state.member.local_start())
        state.committed_round = r
        state.steps_at_round, state.tokens_at_round = job.inner_steps, job.tokens  # as _attempt does
        return True


async def run_now(fn, *args):
    return fn(*args)


def setup(overlap: bool, max_steps: int = 100):
    driver = Driver()
    param = torch.nn.Parameter(torch.zeros(NUMEL))
    job = SimpleNamespace(name="j", inner_steps=0, tokens=0, pending=0,
                          adapter=SimpleNamespace(parameters=lambda: [param]))
    driver.jobs["j"] = JobRounds(member=DiLoCoMember(torch.zeros(NUMEL), config(overlap, max_steps)),
                                  restored=True)
    manager = SimpleNamespace(server=SimpleNamespace(start=0, end=2, run_torch=run_now))
    return driver, job, param, manager


def step(job, param, delta: torch.Tensor) -> None:
    """One inner step that moves the adapter by delta (8 tokens)."""
    with torch.no_grad():
        param.add_(delta)
    job.inner_steps += 1
    job.tokens += 8


async def settle() -> None:
    for _ in range(5):  # let the background task run as far as it can
        await asyncio.sleep(0)


def waits(caplog) -> list[tuple[int, str, float]]:
    return [(int(m[1]), m[2], float(m[3])) for m in re.finditer(
        r"round (\d+) of job j span 0:2: (.*?), backward_wait_s=(\d+\.\d+)", caplog.text)]


def test_overlap_restart_keeps_the_steps_since_the_snapshot():
    start, snap = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5])
    assert torch.equal(overlap_restart(start, snap + torch.tensor([0.25, -1.0]), snap),
                       torch.tensor([1.25, 1.0]))
    assert torch.equal(overlap_restart(start, snap, snap), start)  # no step since: the blocking restart
    with pytest.raises(ValueError, match="elements"):
        overlap_restart(start, torch.zeros(3), snap)


def test_the_boundary_backward_does_not_wait_and_the_round_lands_with_the_later_steps(caplog):
    caplog.set_level(logging.INFO, logger="pollinate.node.rounds")

    async def main():
        driver, job, param, manager = setup(overlap=True)
        state = driver.jobs["j"]
        a, b, c = (torch.arange(NUMEL, dtype=torch.float32) * k for k in (1.0, -0.5, 0.25))
        step(job, param, a)
        await driver.after_backward(manager, job)
        step(job, param, b)
        await driver.after_backward(manager, job)  # the H-th step: round 1 starts, no wait
        assert state.committed_round == 0 and not driver.rounds
        step(job, param, c)  # training goes on while round 1 is out
        await driver.after_backward(manager, job)
        driver.gate.set()
        await driver.settled(manager, job)
        (local, tokens), = driver.rounds
        assert torch.equal(local, a + b) and tokens == 16  # the snapshot, and its H steps' tokens
        # θ_global = 0 − 0.5 × (0 − (a + b)); the adapter keeps c on top of it
        assert torch.allclose(state.member.global_flat, 0.5 * (a + b))
        assert torch.allclose(param.detach(), 0.5 * (a + b) + c)
        assert (state.steps_at_round, state.tokens_at_round) == (2, 16)  # counted from the snapshot
        assert waits(caplog) == [(1, "overlapped, landed 1 inner steps after its snapshot", 0.0)]

    asyncio.run(main())


def test_the_next_boundary_waits_for_a_round_still_out(caplog):
    caplog.set_level(logging.INFO, logger="pollinate.node.rounds")

    async def main():
        driver, job, param, manager = setup(overlap=True)
        ones = torch.ones(NUMEL)
        for _ in range(H):
            step(job, param, ones)
            await driver.after_backward(manager, job)
        step(job, param, ones)
        await driver.after_backward(manager, job)
        step(job, param, ones)  # the next boundary with round 1 still out
        boundary = asyncio.create_task(driver.after_backward(manager, job))
        await settle()
        assert not boundary.done()  # held for round 1
        driver.gate.set()
        await boundary
        assert driver.jobs["j"].committed_round == 1
        assert driver._overlapped["j"].round == 2 and not driver._overlapped["j"].task.done()  # round 2 out
        (r, how, wait), = waits(caplog)
        assert (r, how) == (1, "overlapped, landed 2 inner steps after its snapshot") and wait >= 0.0
        driver.gate.set()
        await driver.settled(manager, job)
        assert [w[0] for w in waits(caplog)] == [1, 2]  # one line per round

    asyncio.run(main())


def test_a_round_out_longer_than_overlap_max_steps_holds_the_backward(caplog):
    caplog.set_level(logging.INFO, logger="pollinate.node.rounds")

    async def main():
        driver, job, param, manager = setup(overlap=True, max_steps=1)
        ones = torch.ones(NUMEL)
        for _ in range(H):
            step(job, param, ones)
            await driver.after_backward(manager, job)  # the H-th: round 1 starts, no wait
        step(job, param, 2 * ones)  # one step past the snapshot: the most it may stay out
        held = asyncio.create_task(driver.after_backward(manager, job))
        await settle()
        assert not held.done()
        driver.gate.set()
        await held
        # landed after that step: θ_global = 0.5 × 2, plus the step made since the snapshot
        assert torch.allclose(param.detach(), ones + 2 * ones)
        (r, how, wait), = waits(caplog)
        assert (r, how) == (1, "overlapped, landed 1 inner steps after its snapshot") and wait >= 0.0
        step(job, param, ones)  # round 2 starts at the boundary (step 4); nothing out: no wait
        await driver.after_backward(manager, job)
        assert driver._overlapped["j"].round == 2 and driver._overlapped["j"].steps == 4

    asyncio.run(main())

    with pytest.raises(ValueError, match="overlap_max_steps"):
        DiLoCoConfig(overlap_max_steps=0)


def test_every_step_reaches_global_exactly_once():
    """Outer lr 1 without momentum: θ_global becomes the member's θ_local at each round, so
    after the last round it must equal the sum of every step, whatever landed when."""

    async def main():
        driver, job, param, manager = setup(overlap=True)
        state = driver.jobs["j"]
        state.member.config = DiLoCoConfig(**{**config(True).__dict__, "outer_lr": 1.0})
        total = torch.zeros(NUMEL)
        for i in range(3 * H):
            delta = torch.randn(NUMEL, generator=torch.Generator().manual_seed(i))
            step(job, param, delta)
            total += delta
            await driver.after_backward(manager, job)
            if i % 3 == 0:  # rounds land at different points of the next round's steps
                driver.gate.set()
                await settle()
        driver.gate.set()
        await driver.settled(manager, job)
        assert state.committed_round == 3
        assert torch.allclose(state.member.global_flat, total, atol=1e-6)
        assert torch.allclose(param.detach(), total, atol=1e-6)

    asyncio.run(main())


def test_a_crashed_round_leaves_the_adapter_and_is_started_again(caplog):
    caplog.set_level(logging.INFO, logger="pollinate.node.rounds")

    async def main():
        driver, job, param, manager = setup(overlap=True)
        state = driver.jobs["j"]
        ones = torch.ones(NUMEL)
        for _ in range(H):
            step(job, param, ones)
            await driver.after_backward(manager, job)
        driver.fail_next = True
        driver.gate.set()
        await driver.settled(manager, job)
        assert torch.equal(param.detach(), 2 * ones) and state.committed_round == 0
        assert (state.steps_at_round, state.tokens_at_round) == (0, 0)
        step(job, param, ones)  # the next Backward starts round 1 again, from all 3 steps
        await driver.after_backward(manager, job)
        driver.gate.set()
        await driver.settled(manager, job)
        (local, tokens), = driver.rounds
        assert torch.equal(local, 3 * ones) and tokens == 24 and state.committed_round == 1
        assert "round 1 of job j span 0:2 (overlapped) failed: injected" in caplog.text

    asyncio.run(main())


def test_blocking_rounds_hold_the_backward_and_log_it(caplog):
    caplog.set_level(logging.INFO, logger="pollinate.node.rounds")

    async def main():
        driver, job, param, manager = setup(overlap=False)
        ones = torch.ones(NUMEL)
        step(job, param, ones)
        await driver.after_backward(manager, job)
        step(job, param, ones)
        boundary = asyncio.create_task(driver.after_backward(manager, job))
        await settle()
        assert not boundary.done()  # the H-th Backward runs the round
        driver.gate.set()
        await boundary
        assert torch.allclose(param.detach(), 0.5 * 2 * ones)  # restarted at local_start
        (r, how, _), = waits(caplog)
        assert (r, how) == (1, "blocking")

    asyncio.run(main())


def test_the_job_setting_travels_unset_true_and_false_apart():
    """JobSpec.overlap_rounds (node.proto field 31, optional): unset = the nodes' default,
    through the proto, the coordinator's registry and the train/job-create flags."""
    import argparse

    from pollinate.client.cli_job import add_job_arguments, job_spec
    from pollinate.coordinator.jobs import spec_to_dict
    from pollinate.protocol.shared import JobSpec
    from pollinate.protocol.v1 import node_pb2

    for value in (None, True, False):
        spec = JobSpec(overlap_rounds=value)
        msg = spec.to_proto(node_pb2)
        assert JobSpec.from_proto(msg) == spec
        assert JobSpec.from_proto(node_pb2.JobSpec(**spec_to_dict(msg))) == spec
        assert job_diloco_config(spec).overlap_rounds is (DiLoCoConfig().overlap_rounds if value is None else value)
    assert "overlap_rounds" not in spec_to_dict(JobSpec().to_proto(node_pb2))
    parser = argparse.ArgumentParser()
    add_job_arguments(parser)
    assert job_spec(parser.parse_args([])).overlap_rounds is None
    assert job_spec(parser.parse_args(["--no-overlap-rounds"])).overlap_rounds is False
    assert job_spec(parser.parse_args(["--overlap-rounds"])).overlap_rounds is True
    registered = JobSpec(overlap_rounds=False).to_proto(node_pb2)
    assert job_spec(parser.parse_args([]), registered).overlap_rounds is False  # the registered job's
