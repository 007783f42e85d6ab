"""Nodes reported for answering wrong, and when the coordinator believes it (issue 18).

A client whose spot check catches a node (client/spot_check.py: two other replicas agree
against it) reports it with ReportLiar, carrying the node's signed answer. The coordinator
judges that evidence (coordinator/evidence.py): where two other members re-run it and agree
against the signed answer, the node is quarantined on that one report ("verified"); where
the members agree with the signed answer, the report is refused and nothing is recorded.
Where nobody can tell (no other member serves the blocks, or they disagree), the report is
one reporter's word, and those are counted: one report per reporter (the caller's IP; a
repeat replaces the earlier one), a node quarantined while at least ``reporters`` distinct
reporters reported it within ``period_s``. Reports without evidence are refused unless
``unverified`` (anyone with the token can make one: Sybils with two addresses could evict
any honest node). A quarantined node is
removed from membership (no span placed on it, its rounds' groups lose it), refused at Join,
and listed by ListQuarantined and Status, which clients read to leave it out of routes. Since
Joins are signed, the member's key is quarantined with its address: the same key joining at
another address (another port, a new IP) is refused too; a fresh key is a new node (Sybils).

A reporter whose report the members refuted may not report again for ``refuted_backoff_s``
(RESOURCE_EXHAUSTED): a hostile client can make a refuted report from any honest answer it
asked for, and each costs two members a re-run of its input. Honest reporters are refuted only
where their own checkers lied to them.

Only members can be reported (NOT_FOUND otherwise): the rows stay bounded by the swarm.
Reports persist in the store; a restarted coordinator keeps its quarantines.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from pollinate.coordinator.config import QuarantineConfig
from pollinate.coordinator.evidence import EvidenceJudge, Verdict
from pollinate.coordinator.store import Store
from pollinate.protocol.errors import FailedPrecondition, NotFound, ResourceExhausted, one_line
from pollinate.protocol.identity import fingerprint

logger = logging.getLogger(__name__)


def quarantined(reports: list[tuple[str, str, str, str, float, str, int]], needed: int) -> dict[str, dict]:
    """Pure policy: the nodes with a verified report or ``needed`` distinct reporters, from
    (address, reporter, peer_id, reason, reported_at, member_key, verified) rows oldest first
    -> {address: its entry}; an entry's ``member_keys`` are the keys the address was reported
    under."""
    by_address: dict[str, list] = {}
    for row in reports:
        by_address.setdefault(row[0], []).append(row)
    out = {}
    for address, rows in by_address.items():
        verified = [row for row in rows if row[6]]
        # when it became quarantined: its first verified report, or its needed-th reporter
        # (rows are distinct reporters: the store's key)
        since = [row[4] for row in verified[:1] + rows[needed - 1:needed]]
        if since:
            out[address] = {"address": address, "peer_id": rows[-1][2], "reporters": len(rows),
                            "since": min(since), "reason": rows[-1][3], "verified": bool(verified),
                            "member_keys": sorted({row[5] for row in rows if row[5]})}
    return out


class Quarantine:
    def __init__(self, config: QuarantineConfig, store: Store, membership,
                 clock: Callable[[], float] = time.time, *, judge: EvidenceJudge | None = None) -> None:
        self.config = config
        self.store = store
        self.membership = membership
        self.clock = clock
        self.judge = judge  # re-runs a report's evidence on other members; None: no evidence is judged
        self._refuted: dict[str, float] = {}  # reporter host -> when it may report again (in memory)

    def nodes(self) -> dict[str, dict]:
        """The nodes quarantined now, by address."""
        return quarantined(self._recent(), self.config.reporters)

    def _recent(self) -> list:
        """The reports that count now (within the period), oldest first."""
        return self.store.liar_reports(self.clock() - self.config.period_s)

    def _reported(self, address: str):
        """The member at `address` (None: quarantined already, no member now); NotFound if
        neither (only members can be reported)."""
        member = self.membership.member_at(address)
        if member is None and address not in self.nodes():
            raise NotFound(f"ReportLiar: no member at {one_line(address, 200)}")
        return member

    async def judge_report(self, address: str, evidence, *, reporter: str) -> Verdict:
        """The verdict on a report of `address` with `evidence` (an AnswerEvidence or None).
        NotFound: not a member; FailedPrecondition: no evidence where unverified reports are
        refused, or evidence that other members refute; InvalidRequest: evidence that is
        malformed or not signed by the member."""
        member = self._reported(address)
        if evidence is None:
            if not self.config.unverified:
                raise FailedPrecondition(
                    "ReportLiar: a report must carry the node's signed answer (evidence); this coordinator "
                    "counts no unverified reports (--quarantine-unverified turns them on; docs/security.md)")
            return Verdict("unverified", "no evidence")
        if member is None or self.judge is None:  # quarantined already: nobody to judge
            return Verdict("unverified", "not judged")
        now = self.clock()
        self._refuted = {host: until for host, until in self._refuted.items() if until > now}
        if reporter in self._refuted:
            raise ResourceExhausted(f"ReportLiar: this address's last report was refuted; it may report again in "
                                    f"{self._refuted[reporter] - now:.0f} s")
        verdict = await self.judge.judge(address, member.member_key, evidence, reporter_host=reporter)
        if verdict.verdict == "refuted":
            self._refuted[reporter] = self.clock() + self.config.refuted_backoff_s
            logger.warning("liar report on %s by %s refuted: %s", one_line(address, 200), one_line(reporter, 64),
                           verdict.detail)
            raise FailedPrecondition(f"ReportLiar: the evidence does not show {one_line(address, 200)} answering "
                                     f"wrong: {verdict.detail}")
        return verdict

    def report(self, address: str, reporter: str, *, peer_id: str, reason: str,
               verified: bool = False) -> tuple[bool, int]:
        """Record `reporter`'s report (`verified`: other members confirmed its evidence);
        (the node is quarantined now, its distinct reporters)."""
        member = self._reported(address)  # again: it may have left while the evidence was judged
        self.store.add_liar_report(address, reporter, peer_id=one_line(peer_id, 100),
                                   reason=one_line(reason, 300), now=self.clock(),
                                   member_key=member.member_key if member is not None else "", verified=verified)
        recent = self._recent()
        entry = quarantined(recent, self.config.reporters).get(address)
        reporters = sum(1 for row in recent if row[0] == address)
        now_quarantined = entry is not None
        logger.warning("node %s reported answering wrong by %s (%s; %d of %d reporters needed unverified): %s",
                       one_line(address, 200), one_line(reporter, 64), "verified" if verified else "unverified",
                       reporters, self.config.reporters, one_line(reason, 300))
        if now_quarantined and member is not None:
            self.membership.leave(member.member_id)
            logger.warning("node %s (member %s) quarantined (%s); removed from the swarm for %.0f s",
                           one_line(address, 200), member.member_id,
                           "verified evidence" if entry["verified"] else f"{reporters} reporters", self.config.period_s)
        return now_quarantined, reporters

    def check(self, address: str, key: str = "") -> None:
        """Refuse a quarantined address (a Join, a data-TLS certificate) and, given the key
        that signed a Join, a quarantined member's key at whatever address."""
        nodes = self.nodes()
        entry = nodes.get(address)
        if entry is not None:
            raise FailedPrecondition(
                f"{one_line(address, 200)} is quarantined: {_why(entry)} ({entry['reason']}); it may join again "
                f"{self.config.period_s:.0f} s after the reports")
        for entry in nodes.values():
            if key and key in entry["member_keys"]:
                raise FailedPrecondition(
                    f"this node's key ({fingerprint(key)}) is quarantined: it served {one_line(entry['address'], 200)} "
                    f"when {_why(entry)} ({entry['reason']}); it may join again {self.config.period_s:.0f} s "
                    f"after the reports")


def _why(entry: dict) -> str:
    if entry["verified"]:
        return "other members confirmed a client's report of its signed answer as wrong"
    return f"{entry['reporters']} clients reported it answering wrong"
