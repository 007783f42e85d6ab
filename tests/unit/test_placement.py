"""Span placement policy: Petals' rule for joiners, improving-only moves for rebalancing."""

from __future__ import annotations

import pytest

from pollinate.coordinator.placement import (
    Balance,
    Placement,
    balance_of,
    best_move,
    best_window,
    block_throughputs,
    choose_span_for_joiner,
    holes_of,
    plan_moves,
)
from pollinate.protocol.shared import Span


def P(start: int, end: int, throughput: float = 1.0, capacity: int | None = None, pinned=False):
    return Placement(
        span=Span(start, end), throughput=throughput,
        capacity=capacity if capacity is not None else end - start, pinned=pinned,
    )


def test_span_rejects_empty_and_negative():
    with pytest.raises(ValueError, match="start < end"):
        Span(3, 3)
    with pytest.raises(ValueError):
        Span(-1, 2)


def test_block_throughputs_sums_overlapping_spans():
    assert block_throughputs([P(0, 2, 1.0), P(1, 4, 2.5)], 5) == [1.0, 3.5, 2.5, 2.5, 0.0]


def test_first_joiner_takes_the_start_and_second_the_next_hole():
    assert choose_span_for_joiner([], 30, 10) == Span(0, 10)
    assert choose_span_for_joiner([P(0, 10)], 30, 10) == Span(10, 20)
    assert choose_span_for_joiner([P(0, 10), P(10, 20)], 30, 10) == Span(20, 30)


def test_capacity_beyond_the_model_is_clamped():
    assert choose_span_for_joiner([], 4, 100) == Span(0, 4)


def test_window_is_chosen_by_sorted_throughput_not_by_sum():
    # Window [0,2) has sum 2 (sorted [0, 2]); window [2,4) has sum 1.5 (sorted [0.5, 1]).
    # Petals' rule compares sorted lists: [0, 2] < [0.5, 1], so the hole wins.
    assert best_window([0.0, 2.0, 0.5, 1.0], 2) == Span(0, 2)


def test_balance_orders_holes_before_throughput():
    two_holes = balance_of([0.0, 0.0, 5.0])
    one_hole = balance_of([0.0, 1.0, 1.0])
    covered = balance_of([0.1, 9.0, 9.0])
    assert one_hole.better_than(two_holes, margin=0.5)
    assert covered.better_than(one_hole, margin=0.5)
    assert not two_holes.better_than(one_hole, margin=0.0)
    assert holes_of([0.0, 1.0, 0.0]) == [0, 2]


def test_margin_blocks_small_improvements():
    weak = Balance(neg_holes=0, weakest=10.0)
    assert not Balance(neg_holes=0, weakest=10.5).better_than(weak, margin=0.1)
    assert Balance(neg_holes=0, weakest=11.5).better_than(weak, margin=0.1)


def test_last_replica_lost_moves_an_over_replicated_member_into_the_hole():
    # Blocks 0:10 have three replicas, 10:20 one (a), 20:30 lost its only replica.
    placements = {
        "a": P(10, 20), "b": P(0, 10), "c": P(0, 10), "d": P(0, 10),
    }
    move = best_move(placements, 30, margin=0.1)
    assert move is not None
    assert move.member_id in {"b", "c", "d"}
    assert move.new == Span(20, 30)
    assert move.after.holes == 0 and move.before.holes == 10


def test_member_with_spare_capacity_extends_over_a_hole():
    # a holds 0:10 but can hold 20 blocks; b holds 0:10 too. 10:15 is a hole.
    placements = {"a": P(0, 10, capacity=20), "b": P(0, 10), "c": P(15, 30)}
    move = best_move(placements, 30, margin=0.1)
    assert move is not None and move.member_id == "a"
    assert move.new.length == 20 and move.new.start <= 10 and move.new.end >= 15


def test_the_only_replica_is_not_moved_away_from_its_blocks():
    # Moving a to the hole would open a hole where it was: no improvement, no move.
    assert best_move({"a": P(0, 10)}, 20, margin=0.0) is None


def test_pinned_members_never_move():
    placements = {"a": P(0, 10, pinned=True), "b": P(0, 10, pinned=True)}
    assert best_move(placements, 20, margin=0.0) is None


def test_balanced_swarm_makes_no_move():
    placements = {f"n{i}": P(10 * (i % 3), 10 * (i % 3) + 10) for i in range(9)}
    assert best_move(placements, 30, margin=0.1) is None


def test_plan_moves_closes_several_holes_and_every_move_improves():
    placements = {f"n{i}": P(0, 5) for i in range(6)}
    moves = plan_moves(placements, 30, margin=0.1, max_moves=10)
    assert len(moves) == 5
    for earlier, later in zip(moves, moves[1:]):
        assert later.after.better_than(earlier.after, 0.0)
    final = dict(placements)
    for m in moves:
        final[m.member_id] = P(m.new.start, m.new.end)
    assert holes_of(block_throughputs(final.values(), 30)) == []


def test_margin_prevents_moving_for_a_marginal_gain():
    # Weakest block 1.0 (a alone on 10:20); moving one of three on 0:10 lifts it to 2.0
    # (+100%) but a margin of 1.5 (needs +150%) forbids it.
    placements = {"a": P(10, 20), "b": P(0, 10), "c": P(0, 10), "d": P(0, 10)}
    assert best_move(placements, 20, margin=0.1) is not None
    assert best_move(placements, 20, margin=1.5) is None
