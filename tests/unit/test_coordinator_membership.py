"""Membership domain logic and its SQLite store, with a fake clock (no network)."""

from __future__ import annotations

import sqlite3

import pytest

from pollinate.coordinator.config import MembershipConfig, StoreConfig
from pollinate.coordinator.membership import JoinParams, Membership, parse_address
from pollinate.coordinator.store import MemberRecord, Store
from pollinate.protocol.errors import (
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    ResourceExhausted,
)
from pollinate.protocol.shared import Span


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path, clock=None, **overrides) -> Membership:
    cfg = MembershipConfig(**{"num_blocks": 30, "lease_s": 5.0, **overrides})
    store = Store(StoreConfig(data_dir=tmp_path)).open()
    m = Membership(cfg, store, clock=clock or Clock(), wall_clock=lambda: 1.7e9)
    m.restore()
    return m


def params(port: int, capacity: int = 10, **kw) -> JoinParams:
    return JoinParams(address=f"127.0.0.1:{port}", model_id="", capacity=capacity,
                      throughput=kw.pop("throughput", 1.0), source_host="127.0.0.1", **kw)


def test_joiners_cover_the_model_and_each_join_bumps_the_epoch(tmp_path):
    m = make(tmp_path)
    spans = [m.join(params(7000 + i)).span for i in range(3)]
    assert spans == [Span(0, 10), Span(10, 20), Span(20, 30)]
    assert m.epoch == 3 and m.holes() == []


def test_store_is_in_wal_mode_and_state_survives_reopen(tmp_path):
    clock = Clock()
    m = make(tmp_path, clock)
    a = m.join(params(7000))
    b = m.join(params(7001))
    m.leave(a.member_id)
    m.store.close()

    clock.now += 100.0  # long after every lease would have expired
    m2 = make(tmp_path, clock)
    assert m2.epoch == 3
    assert list(m2.members) == [b.member_id]
    assert m2.members[b.member_id].span == Span(10, 20)
    mode = sqlite3.connect(tmp_path / "coordinator.sqlite3").execute("PRAGMA journal_mode").fetchone()
    assert mode[0] == "wal"
    # Restored members get lease + grace before eviction, not an instant eviction.
    clock.now += 9.9
    assert m2.evict_expired() == []
    clock.now += 0.2
    assert m2.evict_expired() == [b.member_id]
    assert m2.epoch == 4


def test_throughput_update_survives_restart_and_only_a_change_is_written(tmp_path):
    m = make(tmp_path)
    a = m.join(params(7000, throughput=1.0))
    writes = []
    m.store.db.set_trace_callback(lambda sql: writes.append(sql) if "UPDATE" in sql else None)
    m.heartbeat(a.member_id, a.span, 0.0)  # 0: unchanged
    m.heartbeat(a.member_id, a.span, 1.0)  # the same value: nothing to write
    assert writes == []
    m.heartbeat(a.member_id, a.span, 42.5)
    assert len(writes) == 1 and m.block_throughputs()[0] == 42.5 and m.epoch == 1
    with pytest.raises(InvalidRequest, match="throughput"):
        m.heartbeat(a.member_id, a.span, float("nan"))
    m.store.close()
    m2 = make(tmp_path)
    assert m2.members[a.member_id].throughput == 42.5 and m2.block_throughputs()[0] == 42.5
    assert m2.epoch == 1


def test_a_members_key_survives_a_restart(tmp_path):
    """Calls in a member's name need its key also after the coordinator restarted (no trust on
    first use); a member stored without a key (an unsigned Join, before they were refused)
    loads, and every call in its name is refused, whatever key signs it: no first key adopted."""
    from pollinate.protocol.errors import Unauthenticated

    m = make(tmp_path)
    keyed = m.join(params(7000, member_key="02" + "ab" * 32))
    unkeyed = m.join(params(7001))
    m.store.close()
    m2 = make(tmp_path)
    assert m2.members[keyed.member_id].member_key == "02" + "ab" * 32
    with pytest.raises(Unauthenticated):
        m2.check_key(keyed.member_id, "03" + "cd" * 32)
    m2.check_key(keyed.member_id, "02" + "ab" * 32)
    assert m2.members[unkeyed.member_id].member_key == ""
    for key in ("03" + "cd" * 32, None, "03" + "cd" * 32):
        with pytest.raises(Unauthenticated, match="join again"):
            m2.check_key(unkeyed.member_id, key)
    assert m2.members[unkeyed.member_id].member_key == ""


def test_data_dir_is_bound_to_one_model(tmp_path):
    make(tmp_path).store.close()
    with pytest.raises(RuntimeError, match="belongs to a swarm"):
        make(tmp_path, num_blocks=24)


def test_failed_write_changes_nothing(tmp_path):
    m = make(tmp_path)
    m.join(params(7000))
    rec = MemberRecord(member_id="x", address="127.0.0.1:7000", source_host="h", capacity=1,
                       throughput=1.0, span=Span(0, 1), pinned=False, joined_at=0.0)
    with pytest.raises(sqlite3.IntegrityError):  # the address is UNIQUE
        m.store.record_change(99, added=[rec], removed=["nobody"])
    epoch, members = m.store.load_members()
    assert epoch == 1 and [r.address for r in members] == ["127.0.0.1:7000"]


def test_missed_lease_evicts_and_the_lost_span_is_reassigned(tmp_path):
    clock = Clock()
    m = make(tmp_path, clock)
    a = m.join(params(7000))                       # 0:10
    b = m.join(params(7001))                       # 10:20
    c = m.join(params(7002))                       # 20:30
    d = m.join(params(7003))                       # all equal: the first window, 0:10
    assert d.span == Span(0, 10)
    epoch = m.epoch
    clock.now += 4.0
    for x in (a, b, d):
        m.heartbeat(x.member_id, x.span)
    clock.now += 1.5  # c's lease (5 s) ran out; the others renewed 1.5 s ago
    assert m.evict_expired() == [c.member_id]
    # Eviction bumps the epoch, and a hole (20:30 had one replica) triggers a move at once:
    # a or d (two replicas of 0:10) is the one whose blocks stay covered without it.
    assert m.epoch == epoch + 2 and m.holes() == []
    moved = [x for x in (a, d) if m.members[x.member_id].span == Span(20, 30)]
    assert len(moved) == 1 and m.members[b.member_id].span == Span(10, 20)
    mover = moved[0].member_id
    beat = m.heartbeat(mover, Span(0, 10))
    assert beat.move == Span(20, 30) and "20:30 lost their last replica" in beat.reason
    assert m.members[mover].state == "loading"
    # Reporting the new span clears the instruction.
    assert m.heartbeat(mover, Span(20, 30)).move is None
    assert m.members[mover].state == "online"


def test_unknown_member_is_not_found(tmp_path):
    m = make(tmp_path)
    with pytest.raises(NotFound, match="join again"):
        m.heartbeat("nope", None)
    with pytest.raises(NotFound):
        m.leave("nope")


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (dict(capacity=0), InvalidRequest, "capacity_blocks"),
        (dict(throughput=-1.0), InvalidRequest, "throughput"),
        (dict(throughput=float("nan")), InvalidRequest, "throughput"),
        (dict(requested_span=Span(25, 35)), InvalidRequest, "outside the model"),
        (dict(current_span=Span(0, 31)), InvalidRequest, "outside the model"),
        (dict(requested_span=Span(0, 20), capacity=5), InvalidRequest, "capacity"),
        (dict(quant="int3"), InvalidRequest, "quant must be none, int8 or int4"),
    ],
)
def test_impossible_joins_are_refused_and_change_nothing(tmp_path, bad, error, match):
    m = make(tmp_path)
    with pytest.raises(error, match=match):
        m.join(params(7000, **bad))
    assert m.members == {} and m.epoch == 0 and m.store.load_members() == (0, [])


@pytest.mark.parametrize("address", ["", "nohost", "host:", ":7000", "h:0", "h:70000",
                                     "bad host:1", "[zz::1]:80", "a_b:1"])
def test_malformed_addresses_are_invalid(address):
    with pytest.raises(InvalidRequest):
        parse_address(address)


def test_well_formed_addresses_parse():
    assert parse_address("10.0.0.7:7100") == ("10.0.0.7", 7100)
    assert parse_address("[::1]:80") == ("[::1]", 80)
    assert parse_address("node-3.example.org:443") == ("node-3.example.org", 443)


def test_other_model_is_a_failed_precondition(tmp_path):
    m = make(tmp_path)
    with pytest.raises(FailedPrecondition, match="serves"):
        m.join(JoinParams(address="h:1", model_id="other/model", capacity=3, throughput=1.0))


def test_join_flood_from_one_address_is_capped(tmp_path):
    m = make(tmp_path, max_members_per_address=3)
    for i in range(3):
        m.join(params(7000 + i))
    with pytest.raises(ResourceExhausted, match="cap is 3"):
        m.join(params(7003))
    assert len(m.members) == 3 and m.epoch == 3
    # Another source is not affected.
    m.join(JoinParams(address="10.0.0.2:7000", model_id="", capacity=3, throughput=1.0,
                      source_host="10.0.0.2"))


def test_same_address_rejoining_replaces_its_old_record(tmp_path):
    m = make(tmp_path, max_members_per_address=1)
    old = m.join(params(7000))
    new = m.join(params(7000, current_span=Span(0, 10)))
    assert list(m.members) == [new.member_id] and new.member_id != old.member_id
    assert new.span == Span(0, 10) and new.state == "online"
    assert m.epoch == 2


def test_pinned_span_is_kept_and_never_moved(tmp_path):
    clock = Clock()
    m = make(tmp_path, clock)
    p = m.join(params(7000, requested_span=Span(3, 7), capacity=0))
    assert p.span == Span(3, 7) and p.record.pinned and p.record.capacity == 4
    assert m.rebalance() == []


def test_periodic_rebalance_moves_only_for_a_real_gain(tmp_path):
    m = make(tmp_path, num_blocks=20, rebalance_margin=0.1)
    # Three members pinned-free on 0:10 by current_span (re-joins), one on 10:20.
    for i in range(3):
        m.join(params(7000 + i, current_span=Span(0, 10)))
    m.join(params(7003, current_span=Span(10, 20)))
    moves = m.rebalance()
    assert len(moves) == 1 and moves[0].new == Span(10, 20)
    assert m.rebalance() == []  # balanced now (2 and 2): nothing further, no flip-flop


def test_rebalance_check_is_skipped_until_a_placement_changes(tmp_path, monkeypatch):
    import pollinate.coordinator.membership as membership_module

    plans = []
    real = membership_module.plan_moves
    monkeypatch.setattr(membership_module, "plan_moves", lambda *a, **k: plans.append(1) or real(*a, **k))
    m = make(tmp_path, num_blocks=20, rebalance_margin=0.1)
    a = m.join(params(7000, current_span=Span(0, 10)))
    m.join(params(7001, current_span=Span(10, 20)))
    assert m.rebalance() == [] and m.rebalance() == [] and len(plans) == 1
    m.heartbeat(a.member_id, a.span, 1.0)  # beats that change nothing: still nothing to plan
    assert m.rebalance() == [] and len(plans) == 1
    # Three more on 0:10 make a move worth it; the throughput change alone re-plans too.
    for i in range(3):
        m.join(params(7002 + i, current_span=Span(0, 10)))
    assert len(m.rebalance()) == 1 and len(plans) == 2
    assert m.rebalance() == [] and len(plans) == 3  # the move itself changed placements
    m.heartbeat(a.member_id, a.span, 2.0)
    m.rebalance()
    assert len(plans) == 4
