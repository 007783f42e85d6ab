"""coordinator/rounds.py: quorum forming, commit on agreeing checksums, abort on disagreement,
a committed round (and its state file) surviving a reopen of the data directory, and the
new state rebuilt from the owners' result frames (issue 12) or taken whole where it cannot be."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from pollinate.compression.outer import (
    OuterStep,
    apply_results,
    mask_seed,
    shard_bounds,
    state_to_bytes,
)
from pollinate.coordinator.config import RoundsConfig, StoreConfig
from pollinate.coordinator.rounds import CommitOutcome, Rounds
from pollinate.coordinator.store import Store
from pollinate.protocol.errors import FailedPrecondition, NotFound
from pollinate.protocol.shared import Span

SPAN = Span(0, 4)
NUMEL = 5000
# the adapter-job defaults (node/diloco.py): cocktail at ~0.77 bit/element, outer lr 1.0
STEP = OuterStep(codec="cocktail", codec_params={"p": 0.75, "k": 1.0, "bits": 1, "bucket": 1024},
                 lr=1.0, momentum=0.8)
OK = CommitOutcome(committed=True, reason="", committed_round=1)


class Job:
    """What every member of a group holds and does: the state, one round's result frames."""

    def __init__(self) -> None:
        self.theta = torch.randn(NUMEL, generator=torch.Generator().manual_seed(0))
        self.momentum = torch.zeros(NUMEL)

    def round(self, r: int, n: int, step: OuterStep = STEP) -> tuple[list[bytes], str]:
        """Owners' results for round r (n shards) and the checksum after applying them."""
        codec, g = step.make_codec(), torch.Generator().manual_seed(r)
        results = [codec.encode(torch.randn(stop - start, generator=g) * 1e-2, seed=mask_seed(r, start))
                   for start, stop in shard_bounds(NUMEL, n)]
        return results, apply_results(self.theta, self.momentum, results, step, round_index=r)

    def state(self) -> bytes:
        return state_to_bytes(self.theta, self.momentum)


def membership(*ids: str, span: Span = SPAN):
    members = {m: SimpleNamespace(member_id=m, span=span, record=SimpleNamespace(address=f"h:{i}", source_host=""))
               for i, m in enumerate(ids)}
    return SimpleNamespace(members=members)


def test_round_forms_commits_and_survives_reopen(tmp_path):
    async def scenario():
        job = Job()
        store = Store(StoreConfig(data_dir=tmp_path)).open()
        rounds = Rounds(RoundsConfig(window_s=5.0, commit_timeout_s=5.0), store, membership("b", "a"))
        (ga, sa), (gb, sb) = await asyncio.gather(rounds.begin("j", SPAN, 1, "b", 10),
                                                  rounds.begin("j", SPAN, 1, "a", 30))
        assert ga == gb and [m for m, _ in ga.members] == ["a", "b"] and (sa, sb) == (1, 0)
        assert ga.state_member == "a"  # round 1: nothing to rebuild from, shard 0 sends the state
        with pytest.raises(FailedPrecondition):
            await rounds.begin("j", SPAN, 2, "a", 1)  # round 1 is not committed yet
        results, c1 = job.round(1, 2)
        out = await asyncio.gather(rounds.commit("j", SPAN, 1, "a", c1, job.state()),
                                   rounds.commit("j", SPAN, 1, "b", c1, b""))
        assert out == [OK, OK]
        assert rounds.committed_state("j", SPAN) == (1, c1, job.state())
        # round 2: checksums disagree -> aborted, nothing committed, same number formed again
        await asyncio.gather(rounds.begin("j", SPAN, 2, "a", 1), rounds.begin("j", SPAN, 2, "b", 1))
        out = await asyncio.gather(rounds.commit("j", SPAN, 2, "a", "x"), rounds.commit("j", SPAN, 2, "b", "y"))
        assert [o.committed for o in out] == [False, False] and "disagree" in out[0].reason
        assert out[0].committed_round == 1
        (g2, _), _ = await asyncio.gather(rounds.begin("j", SPAN, 2, "a", 1), rounds.begin("j", SPAN, 2, "b", 1))
        assert g2.attempt == 2 and g2.state_member == ""  # round 1's state is here: rebuild
        results, c2 = job.round(2, 2)
        out = await asyncio.gather(*(rounds.commit("j", SPAN, 2, m, c2, attempt=2, results=[(j, results[j])],
                                                   outer=STEP) for j, m in enumerate("ab")))
        assert [o.committed for o in out] == [True, True]
        assert rounds.committed_state("j", SPAN) == (2, c2, job.state())  # rebuilt bit for bit
        store.close()

        # a restarted coordinator rebuilds round 3 from round 2's file
        reopened = Rounds(RoundsConfig(window_s=5.0, commit_timeout_s=5.0),
                          Store(StoreConfig(data_dir=tmp_path)).open(), membership("a", "b"))
        assert reopened.committed_state("j", SPAN) == (2, c2, job.state())
        with pytest.raises(NotFound):
            reopened.committed_state("other", SPAN)
        (g3, _), _ = await asyncio.gather(reopened.begin("j", SPAN, 3, "a", 1), reopened.begin("j", SPAN, 3, "b", 1))
        assert g3.state_member == ""
        results, c3 = job.round(3, 2)
        out = await asyncio.gather(*(reopened.commit("j", SPAN, 3, m, c3, results=[(j, results[j])], outer=STEP)
                                     for j, m in enumerate("ab")))
        assert [o.committed for o in out] == [True, True]
        assert reopened.committed_state("j", SPAN) == (3, c3, job.state())

    asyncio.run(scenario())


def test_a_replica_that_does_not_show_is_left_out(tmp_path):
    async def scenario():
        store = Store(StoreConfig(data_dir=tmp_path)).open()
        rounds = Rounds(RoundsConfig(window_s=0.2), store, membership("a", "b"))
        group, shard = await rounds.begin("j", SPAN, 1, "a", 5)
        assert [m for m, _ in group.members] == ["a"] and shard == 0
        with pytest.raises(FailedPrecondition):
            await rounds.begin("j", SPAN, 1, "b", 5)  # too late: formed without it
        job = Job()
        _, c1 = job.round(1, 1)
        assert await rounds.commit("j", SPAN, 1, "a", c1, job.state()) == OK
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
        job = Job()
        _, c1 = job.round(1, 2)
        with pytest.raises(FailedPrecondition):  # a checksum for the aborted attempt
            await rounds.commit("j", SPAN, 1, "a", c1, job.state(), attempt=1)
        out = await asyncio.gather(rounds.commit("j", SPAN, 1, "a", c1, job.state(), attempt=2),
                                   rounds.commit("j", SPAN, 1, "b", c1, b"", attempt=2))
        assert out == [OK, OK]
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
        job = Job()
        _, c1 = job.round(1, 3)
        out = await asyncio.gather(rounds.commit("j", SPAN, 1, "a", c1, job.state(), attempt=1),
                                   rounds.commit("j", SPAN, 1, "c", c1, b"", attempt=1))
        assert out == [OK, OK]
        with pytest.raises(FailedPrecondition, match="committed without b"):
            await b_again
        assert rounds.committed_state("j", SPAN) == (1, c1, job.state())
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


async def _commit_round_1(rounds: Rounds, job: Job, ids: str) -> None:
    await asyncio.gather(*(rounds.begin("j", SPAN, 1, m, 1) for m in ids))
    _, c1 = job.round(1, len(ids))
    out = await asyncio.gather(*(rounds.commit("j", SPAN, 1, m, c1, job.state() if m == ids[0] else b"")
                                 for m in ids))
    assert all(o.committed for o in out), out


async def _three_in_round_2(tmp_path):
    """a, b and c committed round 1 and formed round 2: (job, store, rounds, the round's result
    frames, its checksum)."""
    job, store = Job(), Store(StoreConfig(data_dir=tmp_path)).open()
    rounds = Rounds(RoundsConfig(window_s=30.0, commit_timeout_s=30.0), store, membership("a", "b", "c"))
    await _commit_round_1(rounds, job, "abc")
    await asyncio.gather(*(rounds.begin("j", SPAN, 2, m, 1) for m in "abc"))
    return (job, store, rounds, *job.round(2, 3))


def test_a_result_missing_the_coordinator_asks_one_member_for_the_state(tmp_path):
    """b (owner of shard 1) gives round 2 up after serving its result; a and c commit it, but
    shard 1's frame never reached the coordinator: it asks a, the first reporter, for the whole
    state, checks it against the checksum and commits; c only ever sent its own frame."""
    async def scenario():
        job, store, rounds, results, c2 = await _three_in_round_2(tmp_path)
        b_again = asyncio.ensure_future(rounds.begin("j", SPAN, 2, "b", 1))
        c = asyncio.ensure_future(rounds.commit("j", SPAN, 2, "c", c2, results=[(2, results[2])], outer=STEP))
        a = await rounds.commit("j", SPAN, 2, "a", c2, results=[(0, results[0])], outer=STEP)
        assert a.send_state and not a.committed and not c.done()  # c waits for a's state
        again = await rounds.commit("j", SPAN, 2, "a", c2, job.state())
        assert again.committed and not again.send_state
        c = await c
        assert c.committed and not c.send_state and c.committed_round == 2
        assert rounds.committed_state("j", SPAN) == (2, c2, job.state())
        with pytest.raises(FailedPrecondition, match="committed without b"):
            await b_again
        store.close()

    asyncio.run(scenario())


def test_a_rebuild_that_disagrees_takes_the_state_and_a_wrong_state_aborts(tmp_path):
    """The members applied another outer step than the one they sent (here: lr 0.5 vs 1.0):
    the coordinator's rebuild does not match their checksum, so it takes the state whole; a
    state that does not match the checksum either is refused and the round aborts."""
    async def scenario():
        job, store = Job(), Store(StoreConfig(data_dir=tmp_path)).open()
        rounds = Rounds(RoundsConfig(window_s=30.0, commit_timeout_s=30.0), store, membership("a", "b"))
        await _commit_round_1(rounds, job, "ab")
        before = job.state()
        await asyncio.gather(*(rounds.begin("j", SPAN, 2, m, 1) for m in "ab"))
        results, c2 = job.round(2, 2, OuterStep(codec=STEP.codec, codec_params=STEP.codec_params, lr=0.5,
                                                momentum=0.8))
        b = asyncio.ensure_future(rounds.commit("j", SPAN, 2, "b", c2, results=[(1, results[1])], outer=STEP))
        a = await rounds.commit("j", SPAN, 2, "a", c2, results=[(0, results[0])], outer=STEP)
        assert (a.committed, a.send_state) == (False, True)
        assert (await rounds.commit("j", SPAN, 2, "a", c2, job.state())).committed
        assert (await b).committed
        assert rounds.committed_state("j", SPAN) == (2, c2, job.state())

        await asyncio.gather(*(rounds.begin("j", SPAN, 3, m, 1) for m in "ab"))
        results, c3 = job.round(3, 2, OuterStep(codec="none", lr=1.0, momentum=0.8))  # STEP sent: disagrees
        b = asyncio.ensure_future(rounds.commit("j", SPAN, 3, "b", c3, results=[(1, results[1])], outer=STEP))
        assert (await rounds.commit("j", SPAN, 3, "a", c3, results=[(0, results[0])], outer=STEP)).send_state
        wrong = await rounds.commit("j", SPAN, 3, "a", c3, before)  # round 1's state
        assert not wrong.committed and "does not match" in wrong.reason
        assert not (await b).committed
        assert rounds.committed_round(("j", 0, 4)) == 2
        store.close()

    asyncio.run(scenario())


def test_a_member_that_reports_another_checksum_is_outvoted_not_a_veto(tmp_path):
    """Issue 18: in a group of three, a (shard 0) reports a wrong checksum and sends wrong
    result frames; b and c agree. The coordinator rebuilds from the frames, which gives
    neither checksum, so it asks b (the first agreeing member, not a) for the whole state,
    checks it against b's and c's checksum and commits it for them; a is told it was
    outvoted and to fetch the committed state. (A group of two that disagrees still aborts:
    test_round_forms_commits_and_survives_reopen.)"""
    from pollinate.coordinator.rounds import majority_checksum

    assert majority_checksum({"a": "x", "b": "y", "c": "y"}, 3) == "y"
    assert majority_checksum({"a": "x", "b": "y"}, 3) == ""  # c gave up: one each of three
    assert majority_checksum({"a": "y", "b": "y"}, 3) == "y"  # every reporter agrees
    assert majority_checksum({"a": "x", "b": "y"}, 2) == ""

    async def scenario():
        job, store, rounds, results, c2 = await _three_in_round_2(tmp_path)
        lies, _ = Job().round(7, 3)
        b = asyncio.ensure_future(rounds.commit("j", SPAN, 2, "b", c2, results=[(1, results[1])], outer=STEP))
        c = asyncio.ensure_future(rounds.commit("j", SPAN, 2, "c", c2, results=[(2, results[2])], outer=STEP))
        a = asyncio.ensure_future(rounds.commit("j", SPAN, 2, "a", "f" * 64, results=[(0, lies[0])], outer=STEP))
        await asyncio.wait([b, c], return_when=asyncio.FIRST_COMPLETED)  # b, asked for the state
        assert b.done() and b.result().send_state and not c.done()
        assert (await rounds.commit("j", SPAN, 2, "b", c2, job.state())).committed
        assert (await c).committed and not (await a).committed
        assert "fetch the committed state" in a.result().reason and a.result().committed_round == 2
        assert rounds.committed_state("j", SPAN) == (2, c2, job.state())
        assert store.members_with_standing(("j", 0, 4)) == {"a", "b", "c"}  # all three agreed in round 1
        assert rounds.standing(("j", 0, 4)) == {"a", "b", "c"}
        store.close()

    asyncio.run(scenario())


def test_the_next_rounds_masks_are_drawn_while_its_members_exchange(tmp_path):
    """Once round 3 forms, the coordinator draws its cocktail masks ahead in a worker thread,
    with round 2's codec, so the rebuild after the last commit finds them cached."""
    from pollinate.compression import cocktail

    async def scenario():
        job, store, rounds, results, c2 = await _three_in_round_2(tmp_path)
        out = await asyncio.gather(*(rounds.commit("j", SPAN, 2, m, c2, results=[(j, results[j])], outer=STEP)
                                     for j, m in enumerate("abc")))
        assert all(o.committed for o in out)
        keys = [(stop - start, 0.75, mask_seed(3, start), cocktail.BERNOULLI) for start, stop in shard_bounds(NUMEL, 3)]
        for k in keys:  # drawn by nothing but the prefetch (another test may have drawn them)
            cocktail._masks.pop(k, None)
        await asyncio.gather(*(rounds.begin("j", SPAN, 3, m, 1) for m in "abc"))
        await asyncio.gather(*rounds._tasks)  # the draw, started when the group formed
        assert all(k in cocktail._masks for k in keys)
        store.close()

    asyncio.run(scenario())


def test_an_outvoted_member_gains_no_standing(tmp_path):
    """Standing is having reported a committed round's checksum, not having reported one."""
    async def scenario():
        job, store = Job(), Store(StoreConfig(data_dir=tmp_path)).open()
        rounds = Rounds(RoundsConfig(window_s=30.0, commit_timeout_s=30.0), store, membership("a", "b", "c"))
        await asyncio.gather(*(rounds.begin("j", SPAN, 1, m, 1) for m in "abc"))
        _, c1 = job.round(1, 3)
        out = await asyncio.gather(rounds.commit("j", SPAN, 1, "a", c1, job.state()),
                                   rounds.commit("j", SPAN, 1, "b", c1), rounds.commit("j", SPAN, 1, "c", "0" * 64))
        assert [o.committed for o in out] == [True, True, False]
        assert store.members_with_standing(("j", 0, 4)) == rounds.standing(("j", 0, 4)) == {"a", "b"}
        store.close()

    asyncio.run(scenario())


def test_commit_traffic_is_counted_with_the_round(tmp_path):
    """Status's bytes of a round include the commit: the member's own counts (ExchangeShard,
    BeginRound) plus the CommitRound request and reply sizes measured here, also alone."""
    async def scenario():
        job, store = Job(), Store(StoreConfig(data_dir=tmp_path)).open()
        rounds = Rounds(RoundsConfig(window_s=0.2), store, membership("a"))
        await rounds.begin("j", SPAN, 1, "a", 5)
        _, c1 = job.round(1, 1)
        assert (await rounds.commit("j", SPAN, 1, "a", c1, job.state(), bytes_sent=0, bytes_received=0,
                                    coordinator_bytes_sent=40, coordinator_bytes_received=30,
                                    request_bytes=80_000)).committed
        rounds.count_traffic("j", SPAN, 1, "a", received=9)  # the reply, counted by the servicer
        (row,) = store.last_committed_rounds()
        (m,) = row["members"]
        assert (m["bytes_sent"], m["bytes_received"]) == (80_040, 39)
        assert (m["coordinator_bytes_sent"], m["coordinator_bytes_received"]) == (80_040, 39)
        store.close()

    asyncio.run(scenario())


def test_a_newcomer_alone_cannot_commit_over_the_replicas_with_standing(tmp_path):
    """Issue 18, item 4: x joins span 0:4 after a and b committed round 1 and is the whole group
    of round 2 after the window; its well-formed state (checksum right) is refused for lack of
    a majority of a and b. a and b, asking while x's next attempt is formed without them, wait
    it out and commit round 2 together. Once they have not asked for standing_s, x decides alone."""
    from pollinate.coordinator.rounds import majority_lacking

    assert majority_lacking({"a"}, set()) == ""  # no voter: the group decides (round 1)
    assert majority_lacking({"a", "x"}, {"a", "b", "c"}) != ""  # 1 of 3
    assert majority_lacking({"a", "b"}, {"a", "b", "c"}) == ""  # 2 of 3

    async def scenario():
        job, store = Job(), Store(StoreConfig(data_dir=tmp_path)).open()
        members = membership("a", "b")
        rounds = Rounds(RoundsConfig(window_s=0.3, commit_timeout_s=5.0, standing_s=1.5), store, members)
        await _commit_round_1(rounds, job, "ab")
        members.members["x"] = SimpleNamespace(member_id="x", span=SPAN,
                                               record=SimpleNamespace(address="h:9", source_host=""))
        forged = Job()
        forged.theta += 1.0
        _, cx = forged.round(2, 1)
        group, _ = await rounds.begin("j", SPAN, 2, "x", 1)
        assert [m for m, _ in group.members] == ["x"]
        out = await rounds.commit("j", SPAN, 2, "x", cx, forged.state())
        assert not out.committed and "no majority" in out.reason and out.committed_round == 1, out

        group, _ = await rounds.begin("j", SPAN, 2, "x", 1)  # attempt 2, x alone again
        honest = asyncio.gather(rounds.begin("j", SPAN, 2, "a", 1), rounds.begin("j", SPAN, 2, "b", 1))
        await asyncio.sleep(0.05)
        assert not honest.done()  # they wait for x's attempt to settle instead of being refused
        assert not (await rounds.commit("j", SPAN, 2, "x", cx, forged.state(), attempt=group.attempt)).committed
        (ga, _), (gb, _) = await asyncio.wait_for(honest, 5.0)
        assert ga == gb and [m for m, _ in ga.members] == ["a", "b"] and ga.attempt == 3
        results, c2 = job.round(2, 2)
        out = await asyncio.gather(*(rounds.commit("j", SPAN, 2, m, c2, attempt=3, results=[(j, results[j])],
                                                   outer=STEP) for j, m in enumerate("ab")))
        assert [o.committed for o in out] == [True, True]
        assert rounds.committed_state("j", SPAN) == (2, c2, job.state())
        assert rounds.standing(("j", 0, 4)) == {"a", "b"}  # x never reported in a committed round

        await asyncio.sleep(1.6)  # a and b idle for standing_s: they no longer hold commits back
        assert rounds.voters(("j", 0, 4)) == set()
        await rounds.begin("j", SPAN, 3, "x", 1)
        _, cx3 = forged.round(3, 1)
        assert (await rounds.commit("j", SPAN, 3, "x", cx3, forged.state())).committed  # the rule's limit
        store.close()

    asyncio.run(scenario())


def test_sybils_on_one_address_share_one_vote(tmp_path):
    """Issue 18, Sybils: x, y and z (one source host) committed round 1 honestly with a and b
    (two other hosts), so all five have standing; three of five members could outvote a and b,
    but the three share their host's one vote: their forged round 2 is refused (1 of 3 votes)
    and a and b alone commit it (2 of 3). On one host, votes stay one per member."""
    from pollinate.coordinator.rounds import majority_lacking

    hosts = {"a": "10.0.0.1", "b": "10.0.0.2", "x": "10.6.6.6", "y": "10.6.6.6", "z": "10.6.6.6"}
    assert majority_lacking({"x", "y", "z"}, set(hosts), hosts.get).startswith(
        "no majority of the span's voters (members with standing, else those training the job): 3 of 5 on 3 hosts, "
        "1.00 of 3 votes")
    assert majority_lacking({"a", "b"}, set(hosts), hosts.get) == ""
    assert majority_lacking({"a", "x"}, set(hosts), hosts.get) != ""  # 1 + 1/3 of 3 votes
    assert majority_lacking({"a", "x", "y"}, set(hosts), hosts.get) == ""  # 1 + 2/3
    assert majority_lacking({"x", "y"}, {"x", "y", "z"}, hosts.get) == ""  # one machine: 2 of 3 members
    assert majority_lacking({"x"}, {"x", "y", "z"}, hosts.get) != ""

    async def scenario():
        job, store = Job(), Store(StoreConfig(data_dir=tmp_path)).open()
        members = membership(*hosts)
        for m, host in hosts.items():
            members.members[m].record.source_host = host
        rounds = Rounds(RoundsConfig(window_s=0.3, commit_timeout_s=5.0), store, members)
        await _commit_round_1(rounds, job, "abxyz")
        assert rounds.standing(("j", 0, 4)) == set(hosts)

        forged = Job()
        forged.theta += 1.0
        _, cx = forged.round(2, 3)
        await asyncio.gather(*(rounds.begin("j", SPAN, 2, m, 1) for m in "xyz"))  # the window closes without a, b
        out = await asyncio.gather(*(rounds.commit("j", SPAN, 2, m, cx, forged.state() if m == "x" else b"")
                                     for m in "xyz"))
        assert not any(o.committed for o in out) and "3 of 5 on 3 hosts" in out[0].reason, out

        await asyncio.gather(*(rounds.begin("j", SPAN, 2, m, 1) for m in "ab"))
        results, c2 = job.round(2, 2)
        out = await asyncio.gather(*(rounds.commit("j", SPAN, 2, m, c2, attempt=2, results=[(j, results[j])],
                                                   outer=STEP) for j, m in enumerate("ab")))
        assert [o.committed for o in out] == [True, True], out
        assert rounds.committed_state("j", SPAN) == (2, c2, job.state())
        store.close()

    asyncio.run(scenario())


def test_round_1_needs_the_replicas_that_report_training_the_job(tmp_path):
    """Issue 18, item 4, before anyone has standing: x asks for round 1 of a job that a is
    training (a's heartbeats report its steps) and is the whole group after the window; its
    well-formed state is refused for lack of a's majority, also when x claims steps itself. a,
    alone, then commits round 1. A replica whose last reported step is older than trained_s no
    longer holds a lone member back (here: x decides round 1 of another job alone)."""

    async def scenario():
        store = Store(StoreConfig(data_dir=tmp_path)).open()
        rounds = Rounds(RoundsConfig(window_s=0.2, commit_timeout_s=5.0, trained_s=60.0), store,
                        membership("a", "x"))
        rounds.note_trained("a", {"j": 3})
        rounds.note_trained("a", {"j": 3})  # the same count again: not a new step, still a voter
        assert rounds.voters(("j", 0, 4)) == {"a"}
        forged = Job()
        forged.theta += 1.0
        _, cx = forged.round(1, 1)
        for claimed in ({}, {"j": 100}):
            rounds.note_trained("x", claimed)
            group, _ = await rounds.begin("j", SPAN, 1, "x", 1)
            assert [m for m, _ in group.members] == ["x"]
            out = await rounds.commit("j", SPAN, 1, "x", cx, forged.state(), attempt=group.attempt)
            assert not out.committed and "no majority" in out.reason and "a" in out.reason, out
            assert out.committed_round == 0
        rounds.note_trained("x", {})
        honest = Job()
        group, _ = await rounds.begin("j", SPAN, 1, "a", 1)
        assert [m for m, _ in group.members] == ["a"]
        _, c1 = honest.round(1, 1)
        assert (await rounds.commit("j", SPAN, 1, "a", c1, honest.state(), attempt=group.attempt)).committed
        assert rounds.committed_state("j", SPAN)[:2] == (1, c1) and rounds.standing(("j", 0, 4)) == {"a"}

        stale = Rounds(RoundsConfig(window_s=0.2, commit_timeout_s=5.0, trained_s=0.1), store,
                       membership("a", "x"))
        stale.note_trained("a", {"k": 3})
        await stale.begin("k", SPAN, 1, "x", 1)  # the window (0.2 s) outlasts a's last step report
        assert (await stale.commit("k", SPAN, 1, "x", cx, forged.state())).committed  # the rule's limit
        store.close()

    asyncio.run(scenario())


def test_round_1_is_rebuilt_on_the_base_state_its_state_member_sends(tmp_path):
    """Round 1: the coordinator holds no previous state, so shard 0's member (a) sends the state
    the round started from (zstd) and the coordinator applies both results to it: the state is
    committed without anyone sending it whole, and bit for bit what the members hold. A base
    state that is not what the members started from (b's 'base' is ignored: b is not the
    state member; a's is off by one value) makes the rebuild disagree, and the coordinator
    asks for the whole state instead; a zstd frame that declares more than a state's cap is
    refused before it is decompressed."""
    import zstandard

    from pollinate.compression.outer import state_from_bytes, state_to_zstd
    from pollinate.protocol.channels import COORDINATOR_STATE_BYTES

    async def scenario(base_of, expect_rebuilt: bool):
        job, store = Job(), Store(StoreConfig(data_dir=tmp_path / str(len(list(tmp_path.iterdir()))))).open()
        rounds = Rounds(RoundsConfig(window_s=5.0, commit_timeout_s=5.0), store, membership("a", "b"))
        (group, _), _ = await asyncio.gather(rounds.begin("j", SPAN, 1, "a", 1), rounds.begin("j", SPAN, 1, "b", 1))
        assert group.state_member == "a"
        base = base_of(job)
        results, c1 = job.round(1, 2)
        b = asyncio.ensure_future(rounds.commit("j", SPAN, 1, "b", c1, results=[(1, results[1])], outer=STEP,
                                                base_state=state_to_zstd(torch.zeros(NUMEL), torch.zeros(NUMEL))))
        a = await rounds.commit("j", SPAN, 1, "a", c1, results=[(0, results[0])], outer=STEP, base_state=base)
        if not expect_rebuilt:
            assert a.send_state and not a.committed and not b.done()
            a = await rounds.commit("j", SPAN, 1, "a", c1, job.state())
        assert a == OK and await b == OK
        got = state_from_bytes(rounds.committed_state("j", SPAN)[2])
        assert torch.equal(got["global"], job.theta) and torch.equal(got["momentum"], job.momentum)
        store.close()

    asyncio.run(scenario(lambda job: state_to_zstd(job.theta, job.momentum), True))
    wrong = lambda job: state_to_zstd(torch.cat([job.theta[:1] + 1, job.theta[1:]]), job.momentum)  # noqa: E731
    asyncio.run(scenario(wrong, False))
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * (COORDINATOR_STATE_BYTES + 8192))
    asyncio.run(scenario(lambda job: bomb, False))
    # the zeros of round 1's start (here the momentum) cost next to nothing
    job = Job()
    assert len(state_to_zstd(job.theta, job.momentum)) < 0.6 * len(job.state())
