"""KV-cache session accounting on a node: budget, refusals, position checks, expiry."""

import pytest

from pollinate.node.sessions import SessionConfig, SessionManager
from pollinate.protocol.errors import FailedPrecondition, InvalidRequest, NotFound, ResourceExhausted


def manager(**kw):
    return SessionManager(SessionConfig(**{"budget_tokens": 100, "max_session_tokens": 80, **kw}))


def test_budget_reserves_max_length_times_batch_and_refuses_overflow():
    m = manager()
    m.open("a", max_length=40, batch_size=2, start=0, end=2)
    assert m.tokens_left == 20
    with pytest.raises(ResourceExhausted, match="needs 30 cache tokens, node has 20"):
        m.open("b", max_length=30, batch_size=1, start=0, end=2)
    m.open("c", max_length=20, batch_size=1, start=0, end=2)
    assert m.tokens_left == 0
    m.close("a")
    assert m.tokens_left == 80


def test_open_rejects_bad_requests():
    m = manager()
    with pytest.raises(InvalidRequest, match="exceeds this node's limit 80"):
        m.open("a", max_length=81, batch_size=1, start=0, end=1)
    with pytest.raises(InvalidRequest):
        m.open("", max_length=1, batch_size=1, start=0, end=1)
    m.open("a", max_length=5, batch_size=1, start=0, end=1)
    with pytest.raises(FailedPrecondition):
        m.open("a", max_length=5, batch_size=1, start=0, end=1)
    with pytest.raises(NotFound, match="unknown session zz"):
        m.get("zz")


def test_step_checks_position_batch_and_length():
    s = manager().open("a", max_length=10, batch_size=1, start=0, end=1)
    s.check_step(0, 6, 1)
    s.position = 6
    with pytest.raises(FailedPrecondition, match="position 5 does not follow the 6 tokens"):
        s.check_step(5, 1, 1)
    with pytest.raises(InvalidRequest, match="exceed the declared max_length 10"):
        s.check_step(6, 5, 1)
    with pytest.raises(InvalidRequest, match="batch size 2"):
        s.check_step(6, 1, 2)
    s.check_step(6, 4, 1)


def test_idle_sessions_expire_and_free_budget():
    m = manager(idle_timeout_s=10.0)
    s = m.open("a", max_length=50, batch_size=1, start=0, end=1)
    s.last_used = 0.0
    assert m.expire_idle(now=5.0) == []
    assert m.expire_idle(now=11.0) == ["a"]
    assert m.tokens_left == 100 and len(m) == 0


def test_config_validates():
    with pytest.raises(ValueError, match="budget_tokens"):
        SessionConfig(budget_tokens=0)


def test_active_counts_sessions_that_stepped_since():
    # the batching window waits only for these (node/batching.py)
    m = SessionManager(SessionConfig())
    a = m.open("a", max_length=8, batch_size=1, start=0, end=2)
    b = m.open("b", max_length=8, batch_size=1, start=0, end=2)
    a.last_used, b.last_used = 100.0, 90.0
    assert (m.active(since=95.0), m.active(since=90.0), m.active(since=101.0)) == (1, 2, 0)
    m.close("a")
    assert m.active(since=0.0) == 1


def test_one_peer_holds_at_most_its_share_of_the_budget():
    """Issue 18, item 5: a greedy peer is refused past peer_share of the budget while another
    peer still opens sessions; a closed session gives its peer's share back."""
    m = manager(peer_share=0.5)
    m.open("g1", max_length=30, batch_size=1, start=0, end=1, peer="10.0.0.9")
    m.open("g2", max_length=20, batch_size=1, start=0, end=1, peer="10.0.0.9")
    with pytest.raises(ResourceExhausted, match="peer 10.0.0.9 already holds 50 of the 50 one peer may hold"):
        m.open("g3", max_length=1, batch_size=1, start=0, end=1, peer="10.0.0.9")
    m.open("h1", max_length=50, batch_size=1, start=0, end=1, peer="10.0.0.7")
    assert m.tokens_left == 0
    m.close("g1")
    m.open("g3", max_length=30, batch_size=1, start=0, end=1, peer="10.0.0.9")
    with pytest.raises(ValueError, match="peer_share"):
        SessionConfig(peer_share=0.0)
