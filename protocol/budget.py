"""Bytes a server holds for what callers are still sending, bounded per caller's host and in
all (issue 18: bounded state per peer).

A caller declares a size before it sends the bytes (a tensor's first chunk, a request's first
piece); the server takes that size from the budget before it keeps more, and gives it back
when the thing is whole or the stream ends. Past the budget the caller gets
RESOURCE_EXHAUSTED at once, and other hosts go on being served.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from pollinate.protocol.errors import ResourceExhausted, one_line


class ByteBudget:
    """`total` bytes in all (None: no bound), `per_host` per caller's host, except hosts for
    which `is_local` is true (this machine's: a lab's processes all share one address)."""

    def __init__(self, *, total: int | None, per_host: int,
                 is_local: Callable[[str], bool] = lambda host: False) -> None:
        self.total, self.per_host, self.is_local = total, per_host, is_local
        self.held = 0
        self._by_host: dict[str, int] = {}

    def take(self, host: str, n: int, what: str) -> None:
        """Hold `n` more bytes for `host`; ResourceExhausted (nothing taken) past the budget."""
        by_host = self._by_host.get(host, 0)
        if self.total is not None and self.held + n > self.total:
            raise ResourceExhausted(f"{what}: this server holds {self.held >> 20} MiB of what callers are "
                                    f"sending; {n >> 20} MiB more is over its {self.total >> 20} MiB (try again later)")
        if not self.is_local(host) and by_host + n > self.per_host:
            raise ResourceExhausted(f"{what}: calls from {one_line(host, 64)} hold {by_host >> 20} MiB of what "
                                    f"they are sending; {n >> 20} MiB more is over {self.per_host >> 20} MiB "
                                    f"per address")
        self.held += n
        self._by_host[host] = by_host + n

    def give(self, host: str, n: int) -> None:
        self.held -= n
        left = self._by_host.get(host, 0) - n
        if left > 0:
            self._by_host[host] = left
        else:
            self._by_host.pop(host, None)

    @contextlib.contextmanager
    def hold(self, host: str, n: int, what: str):
        """`n` bytes for `host` while the block runs."""
        self.take(host, n, what)
        try:
            yield
        finally:
            self.give(host, n)

    def stream(self, host: str, what: str) -> StreamHold:
        return StreamHold(self, host, what)


class StreamHold:
    """What one stream holds of a ByteBudget: called with the bytes of the thing in progress
    (a tensor's declared size at its first chunk, 0 once it is whole: TensorAssembler's
    `hold`); as a context manager, gives back whatever it still holds when the stream ends."""

    def __init__(self, budget: ByteBudget, host: str, what: str) -> None:
        self.budget, self.host, self.what = budget, host, what
        self.n = 0

    def __call__(self, n: int) -> None:
        if n > self.n:
            self.budget.take(self.host, n - self.n, self.what)
        elif n < self.n:
            self.budget.give(self.host, self.n - n)
        self.n = n

    def __enter__(self) -> StreamHold:
        return self

    def __exit__(self, *exc) -> None:
        self(0)
