"""Span placement: which blocks a node should serve. Pure functions, no I/O.

The rule for a joiner is Petals' (petals/server/block_selection.py): add up the throughput
that every assigned span gives each block, then pick the window of the joiner's length whose
*sorted* per-block throughputs are lexicographically smallest — the weakest stretch of the
model, judged first by its weakest block, then its second weakest, and so on.

Rebalancing is run by the coordinator (it is the single authority, so unlike Petals no node
has to guess what the others will do). One step considers moving one unpinned member to the
best window for it and accepts the move only if the swarm's `Balance` strictly improves:
fewer uncovered blocks, or the same number and a weakest-block throughput higher by a
relative margin. `Balance` is totally ordered and each accepted move raises it, so a sequence
of moves with no joins or deaths in between can never return to an earlier placement: no
oscillation, by construction.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from pollinate.protocol.shared import Span

# Below this a block counts as uncovered; throughputs are in tokens/s (or any positive unit),
# so anything this small is rounding noise from subtracting a member's own contribution.
EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Placement:
    """What the policy needs to know about one member."""

    span: Span  # blocks it is assigned (counted even while it is still loading them)
    throughput: float  # tokens/s it adds to every block of its span
    capacity: int  # how many blocks it can hold; a move may give it up to this many
    pinned: bool = False  # the operator chose its blocks (--blocks): never moved


@dataclass(frozen=True, slots=True, order=True)
class Balance:
    """How well a placement covers the model; larger is better. Compare with `better_than`."""

    neg_holes: int  # minus the number of blocks nobody serves
    weakest: float  # the smallest per-block throughput over the whole model

    @property
    def holes(self) -> int:
        return -self.neg_holes

    def better_than(self, other: "Balance", margin: float) -> bool:
        """Strictly better: fewer holes, or as many and a weakest block `margin` stronger."""
        if self.neg_holes != other.neg_holes:
            return self.neg_holes > other.neg_holes
        return self.weakest > other.weakest * (1.0 + margin) + EPS


@dataclass(frozen=True, slots=True)
class Move:
    member_id: str
    old: Span
    new: Span
    before: Balance
    after: Balance


def block_throughputs(placements: Iterable[Placement], num_blocks: int) -> list[float]:
    """Per-block served throughput: the sum over members whose span covers the block."""
    diff = [0.0] * (num_blocks + 1)
    for p in placements:
        diff[p.span.start] += p.throughput
        diff[min(p.span.end, num_blocks)] -= p.throughput
    out, acc = [], 0.0
    for i in range(num_blocks):
        acc += diff[i]
        out.append(acc if acc > EPS else 0.0)
    return out


def balance_of(throughputs: Sequence[float]) -> Balance:
    holes = sum(1 for t in throughputs if t <= EPS)
    return Balance(neg_holes=-holes, weakest=min(throughputs) if throughputs else 0.0)


def holes_of(throughputs: Sequence[float]) -> list[int]:
    return [i for i, t in enumerate(throughputs) if t <= EPS]


def best_window(throughputs: Sequence[float], length: int) -> Span:
    """Petals' rule: the window of `length` blocks whose sorted throughputs are smallest.

    Ties go to the lowest start, so the choice is deterministic.
    """
    n = len(throughputs)
    length = max(1, min(length, n))
    best_key, best_start = None, 0
    for start in range(n - length + 1):
        key = sorted(throughputs[start : start + length])
        if best_key is None or key < best_key:
            best_key, best_start = key, start
    return Span(best_start, best_start + length)


def choose_span_for_joiner(
    placements: Iterable[Placement], num_blocks: int, capacity: int
) -> Span:
    """The span a new member of `capacity` blocks should load."""
    return best_window(block_throughputs(placements, num_blocks), min(capacity, num_blocks))


def _apply(throughputs: list[float], span: Span, delta: float) -> list[float]:
    out = list(throughputs)
    for i in range(span.start, span.end):
        out[i] += delta
        if out[i] <= EPS:
            out[i] = 0.0
    return out


def best_move(
    placements: Mapping[str, Placement],
    num_blocks: int,
    *,
    margin: float,
    max_candidates: int = 64,
    throughputs: Sequence[float] | None = None,
) -> Move | None:
    """The single move of one unpinned member that improves the swarm's balance most.

    Returns None when no move improves the balance by `margin` (the anti-oscillation rule).
    Candidates are the members that leave the most throughput behind on their current span
    (the over-replicated ones); at most `max_candidates` are examined, so one step costs
    O(len(placements) + max_candidates * num_blocks^2) however large the swarm is.
    `throughputs` may pass block_throughputs(placements) when the caller already has it.
    """
    if not placements:
        return None
    base = list(throughputs) if throughputs is not None else block_throughputs(
        placements.values(), num_blocks
    )
    before = balance_of(base)
    # A member's surplus is how strong its blocks stay without it; one whose departure
    # would open a hole has negative surplus and is tried last. At most n(n+1)/2 distinct
    # spans exist, so the window minimum is computed once per span, not once per member.
    window_min: dict[Span, float] = {}
    scored: list[tuple[float, str, Placement]] = []
    for mid, p in placements.items():
        if p.pinned or p.throughput <= 0:
            continue
        low = window_min.get(p.span)
        if low is None:
            low = window_min[p.span] = min(base[p.span.start : p.span.end])
        scored.append((low - p.throughput, mid, p))
    best: Move | None = None
    seen: set[tuple[Span, float, int]] = set()
    for _, mid, p in heapq.nlargest(max_candidates, scored, key=lambda s: s[0]):
        key = (p.span, p.throughput, p.capacity)
        if key in seen:  # an identical member would find the identical move
            continue
        seen.add(key)
        without = _apply(base, p.span, -p.throughput)
        target = best_window(without, min(p.capacity, num_blocks))
        if target == p.span:
            continue
        after = balance_of(_apply(without, target, p.throughput))
        if not after.better_than(before, margin):
            continue
        if best is None or after.better_than(best.after, 0.0):
            best = Move(member_id=mid, old=p.span, new=target, before=before, after=after)
    return best


def plan_moves(
    placements: Mapping[str, Placement],
    num_blocks: int,
    *,
    margin: float,
    max_moves: int,
    max_candidates: int = 64,
) -> list[Move]:
    """Up to `max_moves` successive improving moves (each evaluated after the previous)."""
    current = dict(placements)
    base = block_throughputs(current.values(), num_blocks)
    moves: list[Move] = []
    for _ in range(max_moves):
        move = best_move(
            current, num_blocks, margin=margin, max_candidates=max_candidates, throughputs=base
        )
        if move is None:
            break
        moves.append(move)
        p = current[move.member_id]
        base = _apply(_apply(base, move.old, -p.throughput), move.new, p.throughput)
        current[move.member_id] = Placement(
            span=move.new, throughput=p.throughput, capacity=p.capacity, pinned=p.pinned
        )
    return moves
