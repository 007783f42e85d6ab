"""Forward inputs a node keeps for the Backward of the same micro-batch (issue 12).

Without them a trainer sends each hop's input twice per micro-batch: with Forward, and
again with Backward, which recomputes the span's forward under autograd. A Forward that
carries ForwardHeader.keep_id leaves its input here, as received (the encoded bytes: the
wire codec's size, decoded again for Backward, and decoding is deterministic, so Backward
recomputes from exactly the tensor Forward ran on); the Backward naming the id takes it.

Bounded: at most ``max_bytes`` of encoded inputs (the least recently kept go first) and
each for at most ``ttl_s``. An input that is gone (evicted, expired, taken, or the node
restarted, or the Backward went to another replica) is not an error of the trainer: it
gets InputNotKept and sends the input again, which costs one extra transfer and nothing
else. Pure bookkeeping: no torch, no locks (the event loop is the only caller).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from pollinate.protocol.errors import InputNotKept, InvalidRequest
from pollinate.protocol.tensors import EncodedTensor

logger = logging.getLogger(__name__)

MAX_KEEP_ID = 64  # characters; a trainer's prefix plus a counter fits in far fewer


@dataclass(frozen=True, kw_only=True)
class KeptInputsConfig:
    # Encoded bytes kept for all trainers together. 256 MiB holds ~290 SmolLM2 micro-batches
    # of 8 x 50 tokens in fp32 (~0.9 MB each), 4x that many at int8row: far more than the
    # micro-batches in flight between a trainer's Forward and its Backward.
    max_bytes: int = 256 << 20
    # Longest a kept input waits for its Backward, seconds. A trainer's Backward follows its
    # Forward by one pass over the route; 300 s covers a slow route on a home link, and a
    # trainer that vanished stops costing memory after it.
    ttl_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {self.max_bytes}")
        if not self.ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {self.ttl_s}")


@dataclass(frozen=True)
class _Kept:
    job: str
    encoded: EncodedTensor
    expires: float


def check_keep_id(keep_id: str) -> str:
    if len(keep_id) > MAX_KEEP_ID or not keep_id.isascii() or not keep_id.isprintable():
        raise InvalidRequest(f"keep_id must be 1-{MAX_KEEP_ID} printable ASCII characters, got {keep_id[:80]!r}")
    return keep_id


class KeptInputs:
    """keep_id -> (job, encoded input), least recently kept first."""

    def __init__(self, config: KeptInputsConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._entries: OrderedDict[str, _Kept] = OrderedDict()
        self.bytes = 0  # encoded bytes held now
        self.evicted = 0  # inputs dropped for the byte budget
        self.expired = 0  # inputs dropped for ttl_s

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, keep_id: str, job: str, encoded: EncodedTensor) -> bool:
        """Keep `encoded` under `keep_id` (replacing an earlier one); False if it alone is
        over the budget (then nothing is kept and Backward falls back to a re-send)."""
        self._expire()
        self._drop(keep_id)
        size = len(encoded.payload)
        if size > self.config.max_bytes:
            logger.info("input %s of job %s not kept: %d bytes, over the budget of %d",
                        keep_id, job, size, self.config.max_bytes)
            return False
        while self.bytes + size > self.config.max_bytes:
            old_id, _ = next(iter(self._entries.items()))
            self._drop(old_id)
            self.evicted += 1
        self._entries[keep_id] = _Kept(job=job, encoded=encoded, expires=self._clock() + self.config.ttl_s)
        self.bytes += size
        return True

    def get(self, keep_id: str, job: str) -> EncodedTensor:
        """The input kept under `keep_id` for `job`, left in place (take it with `forget`
        once the Backward succeeded, so that a refused Backward changes nothing)."""
        self._expire()
        kept = self._entries.get(keep_id)
        if kept is None:
            raise InputNotKept(f"no input is kept here under keep_id {keep_id!r} (evicted, expired or never "
                               f"sent to this node); send hidden_states again")
        if kept.job != job:
            raise InvalidRequest(f"keep_id {keep_id!r} names an input of job {kept.job!r}, not of job {job!r}")
        return kept.encoded

    def forget(self, keep_id: str) -> None:
        self._drop(keep_id)

    def _drop(self, keep_id: str) -> None:
        kept = self._entries.pop(keep_id, None)
        if kept is not None:
            self.bytes -= len(kept.encoded.payload)

    def _expire(self) -> None:
        now = self._clock()
        # entries are in keep order and share one ttl, so the expired ones are a prefix
        while self._entries:
            keep_id, kept = next(iter(self._entries.items()))
            if kept.expires > now:
                break
            self._drop(keep_id)
            self.expired += 1
