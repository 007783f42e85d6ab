"""ExchangeShard's owner inbox keeps nothing for rounds this node did not begin (issue 18):
a contribution waits for the node's own BeginRound (open) at most exchange_timeout_s, and is
refused if it names a round too far ahead, comes from outside the group, or is left unmatched."""

from __future__ import annotations

import asyncio

import pytest

from pollinate.node.rounds import RoundConfig
from pollinate.node.shard_exchange import MAX_ROUNDS_AHEAD, ShardExchange
from pollinate.protocol.errors import FailedPrecondition, RpcTimeout
from pollinate.protocol.tensors import DEFAULT_FRAMING

COMMITTED = 3


def exchange() -> ShardExchange:
    config = RoundConfig(exchange_timeout_s=0.5, contribution_wait_s=0.2)
    return ShardExchange(config, token="t", framing=DEFAULT_FRAMING, job_state=lambda job: (COMMITTED, 1 << 20))


def test_a_round_never_begun_here_leaves_nothing_behind():
    async def run():
        ex = exchange()
        with pytest.raises(FailedPrecondition, match="not in progress here"):
            await ex.receive("j", COMMITTED + MAX_ROUNDS_AHEAD + 1, "a", 0, 1, b"x" * 1000)
        with pytest.raises(FailedPrecondition, match="not in progress here"):
            await ex.receive("j", 2 ** 64 - 1, "a", 0, 1, b"x")
        with pytest.raises(RpcTimeout, match="did not begin on this node"):
            await ex.receive("j", COMMITTED + 1, "a", 0, 1, b"x" * (8 << 20))
        ex.count("j", 2 ** 64 - 1, 1, received=10)
        return ex._inboxes, ex._traffic

    inboxes, traffic = asyncio.run(run())
    assert inboxes == {} and traffic == {}


def test_only_the_group_lands_once_the_round_began_and_leave_refuses_the_waiting():
    async def run():
        ex = exchange()
        r = COMMITTED + 1
        waiting = asyncio.create_task(ex.receive("j", r, "a", 0, 1, b"a"))
        await asyncio.sleep(0)  # the contribution waits for this node's own BeginRound
        assert not waiting.done()
        inbox = ex.open("j", r, 1, ["me", "a"])
        with pytest.raises(FailedPrecondition, match="not a member"):
            await ex.receive("j", r, "stranger", 0, 1, b"s")
        await asyncio.wait_for(inbox.arrived.wait(), 1.0)  # "a" landed once the round began
        assert set(inbox.contributions) == {"a"}
        early = asyncio.create_task(ex.receive("j", r, "a", 0, 1, b"a", attempt=2))
        await asyncio.sleep(0)
        ex.leave("j", r, 2, "given up")
        results = await asyncio.gather(waiting, early, return_exceptions=True)
        return results, ex._inboxes

    (first, second), inboxes = asyncio.run(run())
    assert isinstance(first, FailedPrecondition) and "left by its owner" in str(first)
    assert isinstance(second, FailedPrecondition) and "over on this node" in str(second)
    assert inboxes == {}
