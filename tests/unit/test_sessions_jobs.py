"""A session with a job that reaches a replica without it (NOT_FOUND) moves to another
replica of the same blocks; with none left, a clear NotFound (fake hops, as in
test_sessions_failover.py)."""

import pytest
import torch

from pollinate.client.session import RemoteSession
from pollinate.protocol.errors import NotFound
from test_sessions_failover import FakeStream, FakeSwarm, peer


class JobStream(FakeStream):
    """A FakeStream whose peers in `without_job` answer NOT_FOUND, as a node does for a job
    it never trained."""

    without_job: set = set()

    async def step(self, x, position):
        if self.hop.peer.peer_id in self.without_job:
            raise NotFound(f"job 'sums' is unknown on the node serving blocks {self.hop.start}:{self.hop.end}")
        return await super().step(x, position)


def session(job: str) -> RemoteSession:
    FakeStream.log, FakeStream.dead, FakeStream.refuse = [], set(), set()
    swarm = FakeSwarm([peer("a", 0, 1), peer("b1", 1, 3, thr=200), peer("b2", 1, 3), peer("c", 3, 4)])
    s = RemoteSession(swarm, max_length=16, job=job)
    s._new_stream = JobStream
    return s


async def test_replica_without_the_job_is_skipped_not_banned():
    JobStream.without_job = {"b1"}  # b1 is the cheaper replica, so the route tries it first
    s = session("sums")
    out = await s.step(torch.zeros(1, 3, 1))
    assert torch.equal(out, torch.full((1, 3, 1), 4.0))
    assert [h.peer.peer_id for h in s.route] == ["a", "b2", "c"]
    assert list(s.lacking_job) == ["b1"] and s.swarm.bans.banned(0.0) == frozenset()
    assert [pid for pid, *_ in FakeStream.log] == ["a", "b2", "c"]


async def test_job_lost_mid_session_replays_on_a_replica_that_has_it():
    JobStream.without_job = set()
    s = session("sums")
    await s.step(torch.ones(1, 2, 1))
    JobStream.without_job = {"b1"}  # e.g. the node restarted without the job
    FakeStream.log.clear()
    out = await s.step(torch.ones(1, 1, 1))
    assert torch.equal(out, torch.full((1, 1, 1), 5.0))
    assert [(pid, pos, n) for pid, pos, n, _ in FakeStream.log] == [("a", 2, 1), ("b2", 0, 2), ("b2", 2, 1),
                                                                     ("c", 2, 1)]


async def test_no_replica_with_the_job_is_a_clear_not_found():
    JobStream.without_job = {"b1", "b2"}
    s = session("sums")
    with pytest.raises(NotFound) as e:
        await s.step(torch.zeros(1, 3, 1))
    message = str(e.value)
    assert message.startswith("no replica of blocks 1:3 has job 'sums'"), message
    assert "without the job: b1, b2" in message and "job 'sums' is unknown on the node" in message


async def test_without_a_job_not_found_is_not_retried():
    JobStream.without_job = {"b1"}
    s = session("")
    with pytest.raises(NotFound, match="unknown on the node"):
        await s.step(torch.zeros(1, 3, 1))
    assert s.lacking_job == {}
