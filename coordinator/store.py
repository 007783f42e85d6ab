"""The coordinator's durable state: one SQLite database in WAL mode in the data directory.

Every change is one transaction, committed before the RPC that caused it replies, so a
coordinator killed at any instant restarts with exactly what it told its members. Heartbeats
are not written: a lease is soft state, renewed after a restart by a grace period.

Tables (schema version 1):
  meta             key/value: schema_version, epoch, model_id, num_blocks
  members          one row per live member, with its assigned span
  jobs             training jobs (issue 5): name, base model, adapter and optimizer settings
  rounds           DiLoCo outer rounds per (job, span) (issue 6), never deleted once committed
  round_members    each member's part in a round: shard, tokens, reported checksum
  committed_states where the committed global state of a (job, span, round) lives on disk
  round_traffic    bytes each member sent and received in a round: ExchangeShard (as it
                   reported) plus its BeginRound and CommitRound messages (coordinator_*)
  trainers         each trainer of a job (issue 15's open record): its data files' sizes and
                   SHA-256 as it read them, its code version
  loss_reports     training and held-out losses trainers reported, with the round they belong to
  analyses         `pollinate analyze` results per (job, round): the memorisation curves

A committed state pruned by retention (coordinator/retention.py) keeps its committed_states
row with pruned_at / pruned_reason set: its file is gone, its checksum stays on record.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pollinate.coordinator.config import StoreConfig
from pollinate.protocol.shared import Span

logger = logging.getLogger(__name__)

DB_NAME = "coordinator.sqlite3"
RoundKey = tuple[str, int, int]  # (job name, span start, span end)
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS members (
    member_id   TEXT PRIMARY KEY,
    address     TEXT NOT NULL UNIQUE,   -- host:port the node serves on
    source_host TEXT NOT NULL,          -- IP the join came from (for the per-address cap)
    capacity    INTEGER NOT NULL,       -- blocks it can hold
    throughput  REAL NOT NULL,          -- tokens/s it reported
    span_start  INTEGER NOT NULL,
    span_end    INTEGER NOT NULL,
    pinned      INTEGER NOT NULL,       -- 1: operator chose the span (--blocks)
    joined_at   REAL NOT NULL,          -- unix seconds
    epoch       INTEGER NOT NULL,       -- membership epoch of its last change
    public_key  TEXT NOT NULL DEFAULT '' -- the key that signed its Join (protocol/identity.py); '': unsigned
);
CREATE TABLE IF NOT EXISTS jobs (
    name            TEXT PRIMARY KEY,
    base_model      TEXT NOT NULL,
    adapter_method  TEXT NOT NULL,
    adapter_config  TEXT NOT NULL,      -- JSON
    hyperparameters TEXT NOT NULL,      -- JSON: inner optimizer, H, codec settings
    state           TEXT NOT NULL,      -- created / training / finished / failed
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    job_name     TEXT NOT NULL REFERENCES jobs(name),
    span_start   INTEGER NOT NULL,
    span_end     INTEGER NOT NULL,
    round        INTEGER NOT NULL,
    state        TEXT NOT NULL,         -- forming / exchanging / committed / aborted
    created_at   REAL NOT NULL,
    finished_at  REAL,
    PRIMARY KEY (job_name, span_start, span_end, round)
);
CREATE TABLE IF NOT EXISTS round_members (
    job_name    TEXT NOT NULL,
    span_start  INTEGER NOT NULL,
    span_end    INTEGER NOT NULL,
    round       INTEGER NOT NULL,
    member_id   TEXT NOT NULL,
    shard_index INTEGER NOT NULL,       -- slice of the flat vector it owns
    tokens      INTEGER NOT NULL DEFAULT 0,
    checksum    TEXT,                   -- of the new global state; NULL until reported
    PRIMARY KEY (job_name, span_start, span_end, round, member_id),
    FOREIGN KEY (job_name, span_start, span_end, round)
        REFERENCES rounds(job_name, span_start, span_end, round)
);
CREATE TABLE IF NOT EXISTS committed_states (
    job_name    TEXT NOT NULL,
    span_start  INTEGER NOT NULL,
    span_end    INTEGER NOT NULL,
    round       INTEGER NOT NULL,
    path        TEXT NOT NULL,          -- relative to the data directory
    checksum    TEXT NOT NULL,
    nbytes      INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (job_name, span_start, span_end, round)
);
CREATE TABLE IF NOT EXISTS round_traffic (
    job_name       TEXT NOT NULL,
    span_start     INTEGER NOT NULL,
    span_end       INTEGER NOT NULL,
    round          INTEGER NOT NULL,
    member_id      TEXT NOT NULL,
    attempt        INTEGER NOT NULL,    -- the formation the numbers are of (the last reported)
    bytes_sent     INTEGER NOT NULL,    -- serialized ExchangeShard messages, counted by the node
    bytes_received INTEGER NOT NULL,
    coordinator_bytes_sent     INTEGER NOT NULL DEFAULT 0,  -- BeginRound + CommitRound (issue 12)
    coordinator_bytes_received INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_name, span_start, span_end, round, member_id)
);
CREATE TABLE IF NOT EXISTS trainers (
    job_name    TEXT NOT NULL,
    trainer_id  TEXT NOT NULL,
    data_files  TEXT NOT NULL,          -- JSON list of {role, name, size_bytes, sha256, examples}
    version     TEXT NOT NULL,          -- pollinate.__version__ of the trainer
    git_commit  TEXT NOT NULL,          -- "" outside a git checkout
    joined_at   REAL NOT NULL,
    PRIMARY KEY (job_name, trainer_id)
);
CREATE TABLE IF NOT EXISTS loss_reports (
    job_name     TEXT NOT NULL,
    trainer_id   TEXT NOT NULL,
    round        INTEGER NOT NULL,      -- the job's last committed round when it arrived
    step         INTEGER NOT NULL,
    tokens       INTEGER NOT NULL,
    train_loss   REAL,                  -- NULL: not measured in this report
    heldout_loss REAL,
    reported_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS loss_reports_job ON loss_reports (job_name, round);
CREATE TABLE IF NOT EXISTS liar_reports (  -- issue 18: coordinator/quarantine.py
    address     TEXT NOT NULL,          -- the reported node's address
    reporter    TEXT NOT NULL,          -- the reporter's IP, as gRPC saw the call
    peer_id     TEXT NOT NULL,          -- the node's DHT peer id, as the reporter gave it
    reason      TEXT NOT NULL,          -- the report's evidence, one line
    reported_at REAL NOT NULL,          -- unix seconds of the reporter's latest report
    PRIMARY KEY (address, reporter)
);
CREATE TABLE IF NOT EXISTS analyses (
    job_name         TEXT NOT NULL,
    round            INTEGER NOT NULL,  -- the job as it stood at this round
    train_loss       REAL NOT NULL,
    heldout_loss     REAL NOT NULL,
    verbatim_train   REAL NOT NULL,     -- share reproduced verbatim, 0..1
    verbatim_heldout REAL NOT NULL,
    train_examples   INTEGER NOT NULL,
    heldout_examples INTEGER NOT NULL,
    data_sha256      TEXT NOT NULL,
    heldout_sha256   TEXT NOT NULL,
    analysed_at      REAL NOT NULL,
    PRIMARY KEY (job_name, round)
);
"""

# Columns added to schema version 1 after it shipped: (table, column, definition). Added on
# open where missing, so a data directory written before them keeps working.
_ADDED_COLUMNS = (
    ("round_traffic", "coordinator_bytes_sent", "INTEGER NOT NULL DEFAULT 0"),
    ("round_traffic", "coordinator_bytes_received", "INTEGER NOT NULL DEFAULT 0"),
    ("committed_states", "pruned_at", "REAL"),  # issue 15: retention; NULL = the file is kept
    ("committed_states", "pruned_reason", "TEXT"),
    ("members", "public_key", "TEXT NOT NULL DEFAULT ''"),  # issue 18: identity survives a restart
    ("liar_reports", "member_key", "TEXT NOT NULL DEFAULT ''"),  # issue 18: the reported member's key
    ("liar_reports", "verified", "INTEGER NOT NULL DEFAULT 0"),  # issue 18: other members confirmed it
)


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """The durable part of a member; leases live in memory only."""

    member_id: str
    address: str
    source_host: str
    capacity: int
    throughput: float
    span: Span
    pinned: bool
    joined_at: float
    public_key: str = ""  # the key that signed its Join (protocol/identity.py); "": an unsigned Join


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A registered training job (coordinator/jobs.py). `spec` holds the JobSpec's fields as
    plain values (node.proto's field names); {} for a job first seen in a round."""

    name: str
    base_model: str
    spec: dict
    state: str
    created_at: float
    updated_at: float


# JobSpec fields stored in jobs.adapter_config; every other field is an optimizer setting
# and goes to jobs.hyperparameters.
ADAPTER_FIELDS = ("rank", "alpha", "targets", "feedforward_modules", "num_virtual_tokens", "seed")


class Store:
    """Synchronous SQLite access, used from the event loop's thread only.

    Each write is a few rows in one transaction (~0.1 ms with synchronous=NORMAL), cheap
    enough to run inline, which also keeps writes in the order the loop made the changes.
    """

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.path = Path(config.data_dir) / DB_NAME
        self._db: sqlite3.Connection | None = None
        self._totals: tuple[int, list[dict]] | None = None  # round_totals() at total_changes

    def open(self) -> "Store":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=self.config.busy_timeout_s, isolation_level=None)
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            db.close()
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode})")
        db.execute(f"PRAGMA synchronous={self.config.synchronous}")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(_SCHEMA)  # IF NOT EXISTS: a no-op on an existing database
        for table, column, definition in _ADDED_COLUMNS:
            if column not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        version = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if version is None:
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(version[0]) != SCHEMA_VERSION:
            db.close()
            raise RuntimeError(
                f"{self.path} has schema version {version[0]}, this coordinator speaks "
                f"{SCHEMA_VERSION}; use a data directory of the same version"
            )
        self._db = db
        self._totals = None  # total_changes counts from 0 again on a new connection
        return self

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    # ---- meta -------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def check_model(self, model_id: str, num_blocks: int) -> None:
        """Bind the data directory to one model; refuse to reuse it for another."""
        stored = (self.get_meta("model_id"), self.get_meta("num_blocks"))
        if stored == (None, None):
            with _transaction(self.db):
                self.db.execute("INSERT INTO meta VALUES ('model_id', ?)", (model_id,))
                self.db.execute("INSERT INTO meta VALUES ('num_blocks', ?)", (str(num_blocks),))
        elif stored != (model_id, str(num_blocks)):
            raise RuntimeError(
                f"{self.path} belongs to a swarm of {stored[0]} ({stored[1]} blocks), not "
                f"{model_id} ({num_blocks} blocks); use another --data-dir"
            )

    # ---- membership -------------------------------------------------------------------

    def load_members(self) -> tuple[int, list[MemberRecord]]:
        epoch = int(self.get_meta("epoch") or 0)
        rows = self.db.execute(
            "SELECT member_id, address, source_host, capacity, throughput, span_start, "
            "span_end, pinned, joined_at, public_key FROM members ORDER BY joined_at, member_id"
        ).fetchall()
        members = [
            MemberRecord(
                member_id=r[0], address=r[1], source_host=r[2], capacity=r[3],
                throughput=r[4], span=Span(r[5], r[6]), pinned=bool(r[7]), joined_at=r[8], public_key=r[9],
            )
            for r in rows
        ]
        return epoch, members

    def record_change(
        self,
        epoch: int,
        *,
        added: Iterable[MemberRecord] = (),
        removed: Iterable[str] = (),
        moved: Iterable[tuple[str, Span]] = (),
    ) -> None:
        """One membership change and the epoch it produced, atomically."""
        db = self.db
        with _transaction(db):
            db.executemany("DELETE FROM members WHERE member_id=?", [(m,) for m in removed])
            db.executemany(
                "INSERT INTO members (member_id, address, source_host, capacity, throughput, span_start, "
                "span_end, pinned, joined_at, epoch, public_key) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (m.member_id, m.address, m.source_host, m.capacity, m.throughput,
                     m.span.start, m.span.end, int(m.pinned), m.joined_at, epoch, m.public_key)
                    for m in added
                ],
            )
            db.executemany(
                "UPDATE members SET span_start=?, span_end=?, epoch=? WHERE member_id=?",
                [(s.start, s.end, epoch, mid) for mid, s in moved],
            )
            db.execute(
                "INSERT INTO meta VALUES ('epoch', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (str(epoch),),
            )


    def update_throughput(self, member_id: str, throughput: float) -> None:
        """A member re-announced its throughput (no epoch change: its span is the same)."""
        with _transaction(self.db):
            self.db.execute("UPDATE members SET throughput=? WHERE member_id=?",
                            (throughput, member_id))

    # ---- jobs -------------------------------------------------------------------------

    def load_jobs(self, name: str | None = None) -> list[JobRecord]:
        """Every job by name, or the one named `name` (an empty list if unknown)."""
        where, args = ("WHERE name=?", (name,)) if name is not None else ("", ())
        rows = self.db.execute(
            "SELECT name, base_model, adapter_method, adapter_config, hyperparameters, state, "
            f"created_at, updated_at FROM jobs {where} ORDER BY name", args
        ).fetchall()
        jobs = []
        for name, base, method, adapter, hyper, state, created, updated in rows:
            spec = {"method": method, **json.loads(adapter), **json.loads(hyper)} if method else {}
            jobs.append(JobRecord(name=name, base_model=base, spec=spec, state=state,
                                  created_at=created, updated_at=updated))
        return jobs

    def save_job(self, job: JobRecord) -> None:
        """Insert the job, or fill in the settings of a row a round created before it was
        registered (same name); committed before returning."""
        spec = dict(job.spec)
        method = spec.pop("method", "")
        adapter = {k: spec.pop(k) for k in ADAPTER_FIELDS if k in spec}
        with _transaction(self.db):
            self.db.execute(
                "INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
                "base_model=excluded.base_model, adapter_method=excluded.adapter_method, "
                "adapter_config=excluded.adapter_config, hyperparameters=excluded.hyperparameters, "
                "updated_at=excluded.updated_at",
                (job.name, job.base_model, method, json.dumps(adapter, sort_keys=True),
                 json.dumps(spec, sort_keys=True), job.state, job.created_at, job.updated_at),
            )


    # ---- rounds -----------------------------------------------------------------------

    # A round is keyed by RoundKey (job name, span start, span end) and its index.

    def committed_round(self, key: RoundKey) -> int:
        """The last committed round of (job, span); 0 if none."""
        row = self.db.execute(
            "SELECT MAX(round) FROM committed_states WHERE job_name=? AND span_start=? AND span_end=?",
            key).fetchone()
        return int(row[0] or 0)

    def committed_state_file(self, key: RoundKey, round_index: int | None = None) -> tuple[int, Path, str] | None:
        """(round, file, checksum) of round ``round_index``'s committed state, or of the last
        one when None; None if there is no such commit."""
        if round_index is None:
            row = self.db.execute(
                "SELECT round, path, checksum FROM committed_states WHERE job_name=? AND span_start=? "
                "AND span_end=? ORDER BY round DESC LIMIT 1", key).fetchone()
        else:
            row = self.db.execute(
                "SELECT round, path, checksum FROM committed_states WHERE job_name=? AND span_start=? "
                "AND span_end=? AND round=? AND pruned_at IS NULL", (*key, round_index)).fetchone()
        return None if row is None else (int(row[0]), Path(self.config.data_dir) / row[1], row[2])

    def kept_state_at_or_before(self, key: RoundKey, round_index: int) -> tuple[int, Path, str] | None:
        """(round, file, checksum) of the latest kept (not pruned) state of round <= round_index."""
        row = self.db.execute(
            "SELECT round, path, checksum FROM committed_states WHERE job_name=? AND span_start=? AND "
            "span_end=? AND round<=? AND pruned_at IS NULL ORDER BY round DESC LIMIT 1",
            (*key, round_index)).fetchone()
        return None if row is None else (int(row[0]), Path(self.config.data_dir) / row[1], row[2])

    # ---- checkpoints and retention (issue 15) ---------------------------------------------

    def kept_checkpoints(self) -> list[tuple[str, int, int, int, int, float, str]]:
        """Every committed state still stored: (job, span start, span end, round, bytes,
        committed at, path relative to the data directory)."""
        return [tuple(r) for r in self.db.execute(
            "SELECT job_name, span_start, span_end, round, nbytes, created_at, path FROM committed_states "
            "WHERE pruned_at IS NULL ORDER BY job_name, span_start, span_end, round")]

    def pruned_paths(self) -> list[str]:
        """Files of pruned states (relative to the data directory): to delete if still there."""
        return [r[0] for r in self.db.execute("SELECT path FROM committed_states WHERE pruned_at IS NOT NULL")]

    def mark_pruned(self, pruned: dict[tuple[str, int, int, int], str], now: float) -> None:
        """Record states as pruned (key -> reason), in one transaction, before their files go."""
        with _transaction(self.db):
            self.db.executemany(
                "UPDATE committed_states SET pruned_at=?, pruned_reason=? WHERE job_name=? AND span_start=? "
                "AND span_end=? AND round=? AND pruned_at IS NULL",
                [(now, why, *key) for key, why in sorted(pruned.items())])

    def job_rounds(self, job: str) -> list[dict]:
        """Every committed round of `job`, by span and round: its state's checksum, size and
        whether it is kept, and its members with shard, tokens and whether their checksum is in."""
        rounds = {}
        for s, e, r, checksum, nbytes, at, pruned_at, why in self.db.execute(
                "SELECT span_start, span_end, round, checksum, nbytes, created_at, pruned_at, pruned_reason "
                "FROM committed_states WHERE job_name=? ORDER BY span_start, span_end, round", (job,)):
            rounds[(s, e, r)] = {"span": [s, e], "round": r, "checksum": checksum, "state_bytes": nbytes,
                                 "committed_at": at, "kept": pruned_at is None, "pruned_at": pruned_at or 0.0,
                                 "pruned_reason": why or "", "members": []}
        for s, e, r, member, shard, tokens, reported in self.db.execute(
                "SELECT span_start, span_end, round, member_id, shard_index, tokens, checksum IS NOT NULL "
                "FROM round_members WHERE job_name=? ORDER BY span_start, span_end, round, shard_index", (job,)):
            if (s, e, r) in rounds:
                rounds[(s, e, r)]["members"].append({"member_id": member, "shard_index": shard,
                                                     "tokens": tokens, "committed": bool(reported)})
        return list(rounds.values())

    def last_job_round(self, job: str) -> int:
        """The highest committed round over the job's spans; 0 if none."""
        row = self.db.execute("SELECT MAX(round) FROM committed_states WHERE job_name=?", (job,)).fetchone()
        return int(row[0] or 0)

    # ---- trainers and their losses (issue 15) ---------------------------------------------

    def add_trainer(self, job: str, trainer_id: str, *, data_files: list[dict], version: str,
                    git_commit: str, now: float) -> None:
        """A trainer's first report: what it trains on and with which code (kept as first sent)."""
        with _transaction(self.db):
            self.db.execute("INSERT INTO trainers VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                            (job, trainer_id, json.dumps(data_files, sort_keys=True), version, git_commit, now))

    def add_loss_report(self, job: str, trainer_id: str, *, round_index: int, step: int, tokens: int,
                        train_loss: float | None, heldout_loss: float | None, now: float) -> None:
        with _transaction(self.db):
            self.db.execute("INSERT INTO loss_reports VALUES (?,?,?,?,?,?,?,?)",
                            (job, trainer_id, round_index, step, tokens, train_loss, heldout_loss, now))

    def save_analysis(self, job: str, rows: list[dict], *, data_sha256: str, heldout_sha256: str,
                      now: float) -> None:
        """An analysis of some rounds of `job`, replacing earlier results for those rounds."""
        with _transaction(self.db):
            self.db.executemany(
                "INSERT OR REPLACE INTO analyses VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [(job, r["round"], r["train_loss"], r["heldout_loss"], r["verbatim_train"], r["verbatim_heldout"],
                  r["train_examples"], r["heldout_examples"], data_sha256, heldout_sha256, now) for r in rows])

    def analyses(self, job: str) -> list[dict]:
        cols = ("round", "train_loss", "heldout_loss", "verbatim_train", "verbatim_heldout", "train_examples",
                "heldout_examples")
        return [dict(zip(cols, row)) for row in self.db.execute(
            f"SELECT {', '.join(cols)} FROM analyses WHERE job_name=? ORDER BY round", (job,))]

    def trainers(self, job: str) -> list[dict]:
        return [{"trainer_id": t, "data_files": json.loads(files), "version": v, "git_commit": g, "joined_at": at}
                for t, files, v, g, at in self.db.execute(
                    "SELECT trainer_id, data_files, version, git_commit, joined_at FROM trainers WHERE job_name=? "
                    "ORDER BY joined_at, trainer_id", (job,))]

    def loss_reports(self, job: str) -> list[dict]:
        return [{"round": r, "trainer_id": t, "step": step, "tokens": tokens, "train_loss": tl,
                 "heldout_loss": hl, "reported_at": at}
                for t, r, step, tokens, tl, hl, at in self.db.execute(
                    "SELECT trainer_id, round, step, tokens, train_loss, heldout_loss, reported_at FROM loss_reports "
                    "WHERE job_name=? ORDER BY reported_at, rowid", (job,))]

    def form_round(self, key: RoundKey, round_index: int, members: Iterable[tuple[str, int]], now: float) -> None:
        """A round's group formed: ``members`` as (member id, tokens) in shard order. The job
        turns "training" (updated_at: its last round formed); a job met here first gets a
        placeholder row that registering fills in (save_job). A re-formed round (a new
        attempt) replaces its group."""
        db = self.db
        with _transaction(db):
            db.execute("INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
                       "state=excluded.state, updated_at=excluded.updated_at",
                       (key[0], "", "", "{}", "{}", "training", now, now))
            db.execute("INSERT INTO rounds VALUES (?,?,?,?,?,?,NULL) ON CONFLICT DO UPDATE SET "
                       "state=excluded.state, created_at=excluded.created_at",
                       (*key, round_index, "exchanging", now))
            db.execute("DELETE FROM round_members WHERE job_name=? AND span_start=? AND span_end=? "
                       "AND round=?", (*key, round_index))
            db.executemany("INSERT INTO round_members VALUES (?,?,?,?,?,?,?,NULL)",
                           [(*key, round_index, m, j, tokens) for j, (m, tokens) in enumerate(members)])

    def report_checksum(self, key: RoundKey, round_index: int, member_id: str, *, attempt: int,
                        checksum: str, traffic: tuple[int, int, int, int]) -> None:
        """A member's checksum of the new state, and every byte of the round it moved in this
        attempt (issue 12): (ExchangeShard sent, received, coordinator sent, received)."""
        db = self.db
        with _transaction(db):
            db.execute(
                "UPDATE round_members SET checksum=? WHERE job_name=? AND span_start=? AND span_end=? "
                "AND round=? AND member_id=?", (checksum, *key, round_index, member_id))
            db.execute(
                "INSERT INTO round_traffic VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                "attempt=excluded.attempt, bytes_sent=excluded.bytes_sent, "
                "bytes_received=excluded.bytes_received, coordinator_bytes_sent=excluded.coordinator_bytes_sent, "
                "coordinator_bytes_received=excluded.coordinator_bytes_received",
                (*key, round_index, member_id, attempt, *traffic))

    def add_coordinator_traffic(self, key: RoundKey, round_index: int, member_id: str, *,
                                sent: int = 0, received: int = 0) -> None:
        """Bytes measured at the coordinator (CommitRound requests and replies) added to a
        member's round."""
        with _transaction(self.db):
            self.db.execute(
                "UPDATE round_traffic SET coordinator_bytes_sent=coordinator_bytes_sent+?, "
                "coordinator_bytes_received=coordinator_bytes_received+? "
                "WHERE job_name=? AND span_start=? AND span_end=? AND round=? AND member_id=?",
                (sent, received, *key, round_index, member_id))

    def commit_round(self, key: RoundKey, round_index: int, *, path: Path, checksum: str, nbytes: int,
                     now: float) -> None:
        """Round committed: its state's file (relative to the data directory), atomically with
        the round's state."""
        db = self.db
        with _transaction(db):
            db.execute("INSERT INTO committed_states (job_name, span_start, span_end, round, path, checksum, "
                       "nbytes, created_at) VALUES (?,?,?,?,?,?,?,?)",
                       (*key, round_index, str(path), checksum, nbytes, now))
            db.execute("UPDATE rounds SET state='committed', finished_at=? WHERE job_name=? AND "
                       "span_start=? AND span_end=? AND round=?", (now, *key, round_index))

    def abort_round(self, key: RoundKey, round_index: int, now: float) -> None:
        self.db.execute(
            "UPDATE rounds SET state='aborted', finished_at=? WHERE job_name=? AND span_start=? "
            "AND span_end=? AND round=?", (now, *key, round_index))

    def members_with_standing(self, key: RoundKey) -> set[str]:
        """The members that reported the committed checksum of a round of (job, span) (not those
        outvoted in it): those that count towards its commit majority (coordinator/rounds.py)."""
        return {m for (m,) in self.db.execute(
            "SELECT DISTINCT m.member_id FROM round_members m JOIN committed_states c ON c.job_name=m.job_name AND "
            "c.span_start=m.span_start AND c.span_end=m.span_end AND c.round=m.round WHERE m.job_name=? AND "
            "m.span_start=? AND m.span_end=? AND m.checksum=c.checksum", key)}

    def add_liar_report(self, address: str, reporter: str, *, peer_id: str, reason: str, now: float,
                        member_key: str = "", verified: bool = False) -> None:
        """One reporter's report of a node (a repeat replaces its earlier one, but never
        unverifies it); ``member_key``: the public key of the member at that address when
        reported ("" if none); ``verified``: other members confirmed its evidence."""
        with _transaction(self.db):
            self.db.execute("INSERT INTO liar_reports (address, reporter, peer_id, reason, reported_at, member_key, "
                            "verified) VALUES (?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET peer_id=excluded.peer_id, "
                            "reason=excluded.reason, reported_at=excluded.reported_at, "
                            "member_key=CASE WHEN excluded.member_key != '' THEN excluded.member_key ELSE member_key END, "
                            "verified=MAX(verified, excluded.verified)",
                            (address, reporter, peer_id, reason, now, member_key, int(verified)))

    def liar_reports(self, since: float) -> list[tuple[str, str, str, str, float, str, int]]:
        """(address, reporter, peer_id, reason, reported_at, member_key, verified) of reports at
        or after `since`, oldest first."""
        return self.db.execute("SELECT address, reporter, peer_id, reason, reported_at, member_key, verified "
                               "FROM liar_reports WHERE reported_at >= ? ORDER BY reported_at", (since,)).fetchall()

    def round_groups(self, key: RoundKey) -> dict[int, dict]:
        """Every round of (job, span) this store holds: {round: {"state": forming / exchanging
        / committed / aborted, "members": {member id: whether its checksum is in (the
        committed one, for a committed round)}, "coordinator_bytes_sent": {member id: bytes of
        its BeginRound and CommitRound requests (a state sent whole included)}}}, the members
        those of the round's last formation. For tests that end by comparing what was committed, and by whom."""
        rounds = {r: {"state": state, "members": {}, "coordinator_bytes_sent": {}} for r, state in self.db.execute(
            "SELECT round, state FROM rounds WHERE job_name=? AND span_start=? AND span_end=? ORDER BY round",
            key)}
        for r, member, reported, co_sent in self.db.execute(
                "SELECT m.round, m.member_id, m.checksum IS NOT NULL AND (c.checksum IS NULL OR m.checksum=c.checksum), "
                "COALESCE(t.coordinator_bytes_sent, 0) "
                "FROM round_members m LEFT JOIN round_traffic t ON t.job_name=m.job_name AND "
                "t.span_start=m.span_start AND t.span_end=m.span_end AND t.round=m.round AND "
                "t.member_id=m.member_id LEFT JOIN committed_states c ON c.job_name=m.job_name AND "
                "c.span_start=m.span_start AND c.span_end=m.span_end AND c.round=m.round "
                "WHERE m.job_name=? AND m.span_start=? AND m.span_end=? "
                "ORDER BY m.round, m.shard_index", key):
            rounds[r]["members"][member] = bool(reported)
            rounds[r]["coordinator_bytes_sent"][member] = int(co_sent)
        return rounds

    def last_committed_rounds(self) -> list[dict]:
        """Per (job, span): its last committed round, when, and each member of that round's
        group with its shard, whether its checksum is in the commit, and every byte of the
        round it moved (0 = none reported), of which coordinator_bytes_* with the coordinator.
        For status; ordered by job and span."""
        db = self.db
        last = db.execute(
            "SELECT c.job_name, c.span_start, c.span_end, c.round, c.created_at, c.checksum FROM committed_states c "
            "WHERE c.round = (SELECT MAX(round) FROM committed_states d WHERE d.job_name=c.job_name "
            "AND d.span_start=c.span_start AND d.span_end=c.span_end) "
            "ORDER BY c.job_name, c.span_start, c.span_end").fetchall()
        out = []
        for job, start, end, rnd, at, committed in last:
            members = db.execute(  # "committed": its checksum is the committed one (not outvoted)
                "SELECT m.member_id, m.shard_index, COALESCE(m.checksum=?, 0), COALESCE(t.bytes_sent, 0), "
                "COALESCE(t.bytes_received, 0), COALESCE(t.coordinator_bytes_sent, 0), "
                "COALESCE(t.coordinator_bytes_received, 0) FROM round_members m LEFT JOIN round_traffic t ON "
                "t.job_name=m.job_name AND t.span_start=m.span_start AND t.span_end=m.span_end AND "
                "t.round=m.round AND t.member_id=m.member_id WHERE m.job_name=? AND m.span_start=? "
                "AND m.span_end=? AND m.round=? ORDER BY m.shard_index", (committed, job, start, end, rnd)).fetchall()
            out.append({"job": job, "span": [start, end], "round": rnd, "committed_at": at, "members": [
                {"member_id": m, "shard_index": j, "committed": bool(c), "bytes_sent": sent + co_sent,
                 "bytes_received": received + co_received, "coordinator_bytes_sent": co_sent,
                 "coordinator_bytes_received": co_received}
                for m, j, c, sent, received, co_sent, co_received in members]})
        return out

    # ---- round history (status page, issue 15) ----------------------------------------

    def round_history(self, job: str | None = None, *, limit: int = 500,
                      latest_only: bool = False) -> list[dict]:
        """The last `limit` committed rounds (of `job`, or of every job; with latest_only the
        last of each (job, span)), oldest first: per (job, span, round) when it formed and
        committed, its group size, how many members' checksums are in the commit, tokens
        trained for it, every byte its members moved (coordinator_* of which with the
        coordinator) and the committed state's size."""
        conds, args = (["job_name=?"], [job]) if job is not None else ([], [])
        if latest_only:
            conds.append("round = (SELECT MAX(round) FROM committed_states d WHERE d.job_name=s.job_name "
                         "AND d.span_start=s.span_start AND d.span_end=s.span_end)")
        where = "WHERE " + " AND ".join(conds) if conds else ""
        # the `limit` newest rounds first, then their members: a long job's history is not
        # grouped whole to show its last rounds
        rows = self.db.execute(
            "SELECT c.job_name, c.span_start, c.span_end, c.round, r.created_at, c.created_at, c.nbytes, "
            "COUNT(m.member_id), COALESCE(SUM(m.checksum=c.checksum), 0), COALESCE(SUM(m.tokens), 0), "
            "COALESCE(SUM(t.bytes_sent), 0), COALESCE(SUM(t.bytes_received), 0), "
            "COALESCE(SUM(t.coordinator_bytes_sent), 0), COALESCE(SUM(t.coordinator_bytes_received), 0) "
            f"FROM (SELECT * FROM committed_states s {where} ORDER BY created_at DESC, job_name, span_start "
            "LIMIT ?) c LEFT JOIN rounds r USING (job_name, span_start, span_end, round) "
            "LEFT JOIN round_members m USING (job_name, span_start, span_end, round) "
            "LEFT JOIN round_traffic t ON t.job_name=m.job_name AND t.span_start=m.span_start AND "
            "t.span_end=m.span_end AND t.round=m.round AND t.member_id=m.member_id "
            "GROUP BY c.job_name, c.span_start, c.span_end, c.round "
            "ORDER BY c.created_at DESC, c.job_name, c.span_start", (*args, limit)).fetchall()
        out = [{"job": j, "span": [s, e], "round": r, "formed_at": formed, "committed_at": at,
                "state_bytes": nbytes, "members": n, "committed_members": done, "tokens": tokens,
                "bytes_sent": sent + co_sent, "bytes_received": received + co_received,
                "coordinator_bytes_sent": co_sent, "coordinator_bytes_received": co_received}
               for j, s, e, r, formed, at, nbytes, n, done, tokens, sent, received, co_sent, co_received
               in reversed(rows)]
        # losses trainers reported (issue 15): the mean of the reports stored with each round
        losses = {(j, r): (tl, hl) for j, r, tl, hl in self.db.execute(
            "SELECT job_name, round, AVG(train_loss), AVG(heldout_loss) FROM loss_reports "
            + ("WHERE job_name=? " if job is not None else "") + "GROUP BY job_name, round",
            (job,) if job is not None else ())}
        for entry in out:
            tl, hl = losses.get((entry["job"], entry["round"]), (None, None))
            if tl is not None:
                entry["train_loss"] = tl
            if hl is not None:
                entry["heldout_loss"] = hl
        return out

    def round_totals(self) -> list[dict]:
        """Per (job, span): rounds committed, the last one, the sums over all of them of
        tokens and member bytes (for /metrics counters), and the checkpoints still kept and
        their bytes; ordered by job and span. Kept until
        the next write: it reads every round's members (~20 ms at 5000 rounds of 4), and the
        status page asks every 2 s."""
        if self._totals is not None and self._totals[0] == self.db.total_changes:
            return [dict(t) for t in self._totals[1]]
        changes = self.db.total_changes
        rows = self.db.execute(
            "SELECT c.job_name, c.span_start, c.span_end, COUNT(DISTINCT c.round), MAX(c.round), "
            "MAX(c.created_at), COALESCE(SUM(m.tokens), 0), COALESCE(SUM(t.bytes_sent + t.coordinator_bytes_sent), 0), "
            "COALESCE(SUM(t.bytes_received + t.coordinator_bytes_received), 0) FROM committed_states c "
            "LEFT JOIN round_members m USING (job_name, span_start, span_end, round) "
            "LEFT JOIN round_traffic t ON t.job_name=m.job_name AND t.span_start=m.span_start AND "
            "t.span_end=m.span_end AND t.round=m.round AND t.member_id=m.member_id "
            "GROUP BY c.job_name, c.span_start, c.span_end ORDER BY c.job_name, c.span_start, c.span_end"
        ).fetchall()
        # checkpoints still stored (issue 15's retention): how many and their bytes
        kept = {(j, s, e): (n, b) for j, s, e, n, b in self.db.execute(
            "SELECT job_name, span_start, span_end, COUNT(*), COALESCE(SUM(nbytes), 0) FROM committed_states "
            "WHERE pruned_at IS NULL GROUP BY job_name, span_start, span_end")}
        totals = [{"job": j, "span": [s, e], "rounds": n, "last_round": last, "last_committed_at": at,
                   "tokens": tokens, "bytes_sent": sent, "bytes_received": received,
                   "checkpoints_kept": kept.get((j, s, e), (0, 0))[0], "checkpoint_bytes": kept.get((j, s, e), (0, 0))[1]}
                  for j, s, e, n, last, at, tokens, sent, received in rows]
        self._totals = (changes, totals)
        return [dict(t) for t in totals]


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (autocommit connection)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
