"""Nodes reported for answering wrong, and when the coordinator believes it (issue 18).

A client whose spot check catches a node (client/spot_check.py: two other replicas agree
against it) reports it with ReportLiar. The coordinator cannot check the evidence (it holds
no model), so it counts reporters: one report per reporter (the caller's IP; a repeat
replaces the earlier one), and a node is quarantined while at least ``reporters`` distinct
reporters reported it within ``period_s``. So one hostile client cannot evict an honest node
on its own; Sybils with several addresses can (docs/security.md). A quarantined node is
removed from membership (no span placed on it, its rounds' groups lose it), refused at Join,
and listed by ListQuarantined and Status, which clients read to leave it out of routes. Since
Joins are signed, the member's key is quarantined with its address: the same key joining at
another address (another port, a new IP) is refused too; a fresh key is a new node (Sybils).

Only members can be reported (NOT_FOUND otherwise): the rows stay bounded by the swarm.
Reports persist in the store; a restarted coordinator keeps its quarantines.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from pollinate.coordinator.config import QuarantineConfig
from pollinate.coordinator.store import Store
from pollinate.protocol.errors import FailedPrecondition, NotFound, one_line
from pollinate.protocol.identity import fingerprint

logger = logging.getLogger(__name__)


def quarantined(reports: list[tuple[str, str, str, str, float, str]], needed: int) -> dict[str, dict]:
    """Pure policy: the nodes that ``needed`` distinct reporters reported, from (address,
    reporter, peer_id, reason, reported_at, member_key) rows oldest first -> {address: its
    entry}; an entry's ``member_keys`` are the keys the address was reported under."""
    by_address: dict[str, list] = {}
    for row in reports:
        by_address.setdefault(row[0], []).append(row)
    out = {}
    for address, rows in by_address.items():
        if len(rows) >= needed:  # rows are distinct reporters (the store's key)
            out[address] = {"address": address, "peer_id": rows[-1][2], "reporters": len(rows),
                            "since": rows[needed - 1][4], "reason": rows[-1][3],
                            "member_keys": sorted({row[5] for row in rows if row[5]})}
    return out


class Quarantine:
    def __init__(self, config: QuarantineConfig, store: Store, membership,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.membership = membership
        self.clock = clock

    def nodes(self) -> dict[str, dict]:
        """The nodes quarantined now, by address."""
        return quarantined(self.store.liar_reports(self.clock() - self.config.period_s), self.config.reporters)

    def report(self, address: str, reporter: str, *, peer_id: str, reason: str) -> tuple[bool, int]:
        """Record `reporter`'s report; (the node is quarantined now, its distinct reporters)."""
        member = self.membership.member_at(address)
        if member is None and address not in self.nodes():
            raise NotFound(f"ReportLiar: no member at {one_line(address, 200)}")
        self.store.add_liar_report(address, reporter, peer_id=one_line(peer_id, 100),
                                   reason=one_line(reason, 300), now=self.clock(),
                                   member_key=member.member_key if member is not None else "")
        reporters = sum(1 for row in self.store.liar_reports(self.clock() - self.config.period_s) if row[0] == address)
        now_quarantined = reporters >= self.config.reporters
        logger.warning("node %s reported answering wrong by %s (%d of %d reporters needed): %s",
                       one_line(address, 200), one_line(reporter, 64), reporters, self.config.reporters,
                       one_line(reason, 300))
        if now_quarantined and member is not None:
            self.membership.leave(member.member_id)
            logger.warning("node %s (member %s) quarantined: %d reporters; removed from the swarm for %.0f s",
                           one_line(address, 200), member.member_id, reporters, self.config.period_s)
        return now_quarantined, reporters

    def check(self, address: str, key: str = "") -> None:
        """Refuse a quarantined address (a Join, a data-TLS certificate) and, given the key
        that signed a Join, a quarantined member's key at whatever address."""
        nodes = self.nodes()
        entry = nodes.get(address)
        if entry is not None:
            raise FailedPrecondition(
                f"{one_line(address, 200)} is quarantined: {entry['reporters']} clients reported it answering "
                f"wrong ({entry['reason']}); it may join again {self.config.period_s:.0f} s after the reports")
        for entry in nodes.values():
            if key and key in entry["member_keys"]:
                raise FailedPrecondition(
                    f"this node's key ({fingerprint(key)}) is quarantined: it served {one_line(entry['address'], 200)} "
                    f"when {entry['reporters']} clients reported it answering wrong ({entry['reason']}); it may "
                    f"join again {self.config.period_s:.0f} s after the reports")
