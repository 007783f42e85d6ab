"""coordinator/rounds.py: quorum forming, commit on agreeing checksums, abort on disagreement,
and a committed round (and its state file) surviving a reopen of the data directory."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from pollinate.coordinator.config import RoundsConfig, StoreConfig
from pollinate.coordinator.placement import Span
from pollinate.coordinator.rounds import Rounds
from pollinate.coordinator.store import Store
from pollinate.protocol.errors import FailedPrecondition, NotFound

SPAN = Span(0, 4)


def membership(*ids: str, span: Span = SPAN):
    members = {m: SimpleNamespace(member_id=m, span=span, record=SimpleNamespace(address=f"h:{i}"))
               for i, m in enumerate(ids)}
    return SimpleNamespace(members=members)


def test_round_forms_commits_and_survives_reopen(tmp_path):
    async def scenario():
        store = Store(StoreConfig(data_dir=tmp_path)).open()
        rounds = Rounds(RoundsConfig(window_s=5.0, commit_timeout_s=5.0), store, membership("b", "a"))
        (ga, sa), (gb, sb) = await asyncio.gather(rounds.begin("j", SPAN, 1, "b", 10),
                                                  rounds.begin("j", SPAN, 1, "a", 30))
        assert ga == gb and [m for m, _ in ga.members] == ["a", "b"] and (sa, sb) == (1, 0)
        with pytest.raises(FailedPrecondition):
            await rounds.begin("j", SPAN, 2, "a", 1)  # round 1 is not committed yet
        out = await asyncio.gather(rounds.commit("j", SPAN, 1, "a", "c1", b"state-1"),
                                   rounds.commit("j", SPAN, 1, "b", "c1", b""))
        assert out == [(True, "", 1), (True, "", 1)]
        # round 2: checksums disagree -> aborted, nothing committed, same number formed again
        await asyncio.gather(rounds.begin("j", SPAN, 2, "a", 1), rounds.begin("j", SPAN, 2, "b", 1))
        out = await asyncio.gather(rounds.commit("j", SPAN, 2, "a", "x", b"s"),
                                   rounds.commit("j", SPAN, 2, "b", "y", b"s"))
        assert [o[0] for o in out] == [False, False] and "disagree" in out[0][1] and out[0][2] == 1
        await asyncio.gather(rounds.begin("j", SPAN, 2, "a", 1), rounds.begin("j", SPAN, 2, "b", 1))
        store.close()

        reopened = Rounds(RoundsConfig(), Store(StoreConfig(data_dir=tmp_path)).open(), membership("a"))
        assert reopened.committed_state("j", SPAN) == (1, "c1", b"state-1")
        with pytest.raises(NotFound):
            reopened.committed_state("other", SPAN)

    asyncio.run(scenario())


def test_a_replica_that_does_not_show_is_left_out(tmp_path):
    async def scenario():
        store = Store(StoreConfig(data_dir=tmp_path)).open()
        rounds = Rounds(RoundsConfig(window_s=0.2), store, membership("a", "b"))
        group, shard = await rounds.begin("j", SPAN, 1, "a", 5)
        assert [m for m, _ in group.members] == ["a"] and shard == 0
        with pytest.raises(FailedPrecondition):
            await rounds.begin("j", SPAN, 1, "b", 5)  # too late: formed without it
        assert await rounds.commit("j", SPAN, 1, "a", "c", b"s") == (True, "", 1)
        store.close()

    asyncio.run(scenario())


def test_owner_failure_aborts_and_the_live_members_form_the_next_attempt_at_once(tmp_path):
    """c dies mid-exchange: a and b give up (ask again); once c's lease is gone the attempt
    aborts and a and b are answered with attempt 2, formed without c, no H steps later."""
    async def scenario():
        store = Store(StoreConfig(data_dir=tmp_path)).open()
        members = membership("a", "b", "c")
        rounds = Rounds(RoundsConfig(window_s=30.0, commit_timeout_s=30.0), store, members)
        first = await asyncio.gather(*(rounds.begin("j", SPAN, 1, m, 1) for m in "abc"))
        assert {g.attempt for g, _ in first} == {1}
        retry = asyncio.gather(rounds.begin("j", SPAN, 1, "a", 1), rounds.begin("j", SPAN, 1, "b", 1))
        await asyncio.sleep(0.1)
        assert not retry.done()  # c is still in the swarm: it may yet report
        del members.members["c"]  # its lease expired
        (ga, sa), (gb, sb) = await asyncio.wait_for(retry, 5.0)
        assert ga == gb and ga.attempt == 2 and [m for m, _ in ga.members] == ["a", "b"]
        with pytest.raises(FailedPrecondition):  # a checksum for the aborted attempt
            await rounds.commit("j", SPAN, 1, "a", "c1", b"s", attempt=1)
        out = await asyncio.gather(rounds.commit("j", SPAN, 1, "a", "c1", b"s", attempt=2),
                                   rounds.commit("j", SPAN, 1, "b", "c1", b"", attempt=2))
        assert out == [(True, "", 1), (True, "", 1)]
        row = store.db.execute("SELECT state FROM rounds WHERE round=1").fetchone()
        assert row[0] == "committed"
        store.close()

    asyncio.run(scenario())


def test_a_member_that_gives_up_is_dropped_and_the_round_commits_for_the_others(tmp_path):
    """b's send failed (its contribution was dropped by the owners) but a and c hold every
    result: they commit the round as a group of two; b, asking again, is told to fetch it."""
    async def scenario():
        store = Store(StoreConfig(data_dir=tmp_path)).open()
        rounds = Rounds(RoundsConfig(window_s=30.0, commit_timeout_s=30.0), store,
                        membership("a", "b", "c"))
        await asyncio.gather(*(rounds.begin("j", SPAN, 1, m, 1) for m in "abc"))
        b_again = asyncio.ensure_future(rounds.begin("j", SPAN, 1, "b", 1))
        out = await asyncio.gather(rounds.commit("j", SPAN, 1, "a", "c1", b"s", attempt=1),
                                   rounds.commit("j", SPAN, 1, "c", "c1", b"", attempt=1))
        assert out == [(True, "", 1), (True, "", 1)]
        with pytest.raises(FailedPrecondition, match="committed without b"):
            await b_again
        assert rounds.committed_state("j", SPAN) == (1, "c1", b"s")
        store.close()

    asyncio.run(scenario())


def test_a_registered_job_turns_training_when_its_first_round_forms(tmp_path):
    from pollinate.coordinator.jobs import Jobs
    from test_coordinator_jobs import LORA

    async def scenario():
        store = Store(StoreConfig(data_dir=tmp_path)).open()
        jobs = Jobs(store, base_model="tiny")
        job, _ = jobs.create("j", LORA)
        assert job.state == "created"
        rounds = Rounds(RoundsConfig(window_s=0.2), store, membership("a"))
        await rounds.begin("j", SPAN, 1, "a", 5)
        now = jobs.get("j")
        assert now.state == "training" and now.spec == LORA and now.created_at == job.created_at
        assert now.updated_at >= job.updated_at
        store.close()

    asyncio.run(scenario())
