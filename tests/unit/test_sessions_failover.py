"""Client session failover with fake hops: what the replacement receives, and when."""

import time

import pytest
import torch

from pollinate.client.config import ClientConfig
from pollinate.client.routing import BanList, PeerSpan, find_route
from pollinate.client.session import RemoteSession
from pollinate.client.spot_check import SpotChecker
from pollinate.protocol.errors import InvalidRequest, NotFound, PeerUnavailable, ResourceExhausted, SessionHandedOff


class FakeSwarm:
    def __init__(self, peers):
        self.config = ClientConfig(max_failovers=3)
        self.bans = BanList(base_s=60)
        self.peers = peers
        self.num_blocks = 4
        self.spot_checks = SpotChecker(self, rate=0.0, tolerance=0.03)  # off: these tests are about failover

    async def route(self, start, end, exclude=frozenset()):
        return find_route(self.peers, start, end, config=self.config.routing,
                          banned=self.bans.banned(time.monotonic()) | exclude)

    def ban(self, peer, reason):
        self.bans.ban(peer.peer_id, time.monotonic())


class FakeStream:
    """Adds (block count) to the hidden states; fails as told; logs what it received."""

    log: list = []
    dead: set = set()
    refuse: set = set()
    handing_off: dict = {}  # peer id -> peer id it hands its sessions to
    forgot: set = set()  # peers that refuse a resume (the handed-off session expired)

    def __init__(self, hop, resume_secret=None, history=None):
        self.hop = hop
        self.history = history if history is not None else []
        self.opened = False
        self.secret = resume_secret or b"secret"
        self.resuming = resume_secret is not None
        self.resumed = False
        self.opened_at = 0.0

    async def step(self, x, position):
        pid = self.hop.peer.peer_id
        if pid in self.dead:
            raise PeerUnavailable(f"{pid} is dead")
        if pid in self.handing_off:
            to = self.handing_off[pid]
            raise SessionHandedOff(f"session handed off: to {to} peer {to} (session s)")
        if self.resuming and not self.opened:
            if pid in self.forgot:
                raise NotFound(f"no handed-off session s waits here")
            self.opened = True
        if pid in self.refuse and not self.opened:
            raise ResourceExhausted(f"{pid} is full")
        self.opened = True
        FakeStream.log.append((pid, position, x.shape[1], x.clone()))
        return x + (self.hop.end - self.hop.start)

    async def close(self):
        pass


def peer(pid, s, e, thr=100.0):
    return PeerSpan(peer_id=pid, address=pid, start=s, end=e, throughput=thr)


@pytest.fixture
def session():
    FakeStream.log, FakeStream.dead, FakeStream.refuse = [], set(), set()
    FakeStream.handing_off, FakeStream.forgot = {}, set()
    swarm = FakeSwarm([peer("a", 0, 1), peer("b1", 1, 3, thr=200), peer("b2", 1, 3), peer("c", 3, 4)])
    s = RemoteSession(swarm, max_length=16)
    s._new_stream = FakeStream
    return s


async def test_dead_hop_is_replaced_and_history_replayed_at_position_0(session):
    x = torch.arange(5.0).reshape(1, 5, 1)
    assert torch.equal(await session.step(x), x + 4)
    for t in range(3):
        await session.step(torch.full((1, 1, 1), 10.0 + t))
    FakeStream.dead.add("b1")
    FakeStream.log.clear()
    out = await session.step(torch.full((1, 1, 1), 20.0))
    assert torch.equal(out, torch.full((1, 1, 1), 24.0))
    # b2 got the 8 tokens b1 had seen (a's outputs, i.e. inputs + 1) at position 0, then the step
    calls = [(pid, pos, n) for pid, pos, n, _ in FakeStream.log]
    assert calls == [("a", 8, 1), ("b2", 0, 8), ("b2", 8, 1), ("c", 8, 1)]
    replay = FakeStream.log[1][3].flatten().tolist()
    assert replay == [v + 1 for v in [0, 1, 2, 3, 4, 10, 11, 12]]
    assert session.failovers == 1 and session.position == 9
    assert [h.peer.peer_id for h in session.route] == ["a", "b2", "c"]


async def test_handed_off_hop_resumes_at_its_position_without_replay(session):
    await session.step(torch.zeros(1, 5, 1))
    await session.step(torch.ones(1, 1, 1))
    FakeStream.handing_off["b1"] = "b2"
    FakeStream.log.clear()
    out = await session.step(torch.full((1, 1, 1), 7.0))
    assert torch.equal(out, torch.full((1, 1, 1), 11.0))
    calls = [(pid, pos, n) for pid, pos, n, _ in FakeStream.log]
    assert calls == [("a", 6, 1), ("b2", 6, 1), ("c", 6, 1)]  # b2 continues at 6: nothing replayed
    assert (session.handoffs, session.failovers) == (1, 0)
    assert [h.peer.peer_id for h in session.route] == ["a", "b2", "c"]
    assert session.hops[1].secret == b"secret" and len(session.hops[1].history) == 3  # kept for a later replay


async def test_refused_resume_falls_back_to_replay_on_that_replica(session):
    await session.step(torch.zeros(1, 5, 1))
    FakeStream.handing_off["b1"] = "b2"
    FakeStream.forgot.add("b2")
    FakeStream.log.clear()
    await session.step(torch.ones(1, 1, 1))
    calls = [(pid, pos, n) for pid, pos, n, _ in FakeStream.log]
    assert calls == [("a", 5, 1), ("b2", 0, 5), ("b2", 5, 1), ("c", 5, 1)]  # replayed, b2 not banned
    assert (session.handoffs, session.failovers) == (0, 1)


async def test_refused_session_goes_to_other_replica(session):
    FakeStream.refuse.add("b1")
    await session.step(torch.zeros(1, 3, 1))
    assert [h.peer.peer_id for h in session.route] == ["a", "b2", "c"]
    assert (session.reroutes, session.failovers) == (1, 0)


async def test_no_replica_left_raises_naming_blocks(session):
    FakeStream.dead.update({"b1", "b2"})
    with pytest.raises(Exception, match="blocks 1, 2"):
        await session.step(torch.zeros(1, 3, 1))


async def test_too_many_tokens_is_the_callers_error(session):
    with pytest.raises(InvalidRequest, match="max_length 16"):
        await session.step(torch.zeros(1, 17, 1))
