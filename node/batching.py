"""The node's one torch thread: inference steps first, gathered into batched passes.

All torch work of a node (session steps, training Forward/Backward, optimizer steps, DiLoCo
round arithmetic) runs on one thread, so nothing races on the span's or an adapter's
tensors. `TorchWorker` puts two queues in front of that thread:

- inference steps (`step`), served first. When the thread picks the oldest pending step,
  it waits up to `window_ms` after that step arrived for other sessions' steps to join
  (not at all once every active session has a step pending, or a cap is reached), then runs
  them as one pass (`run_steps`, node/packed_forward.py); each caller gets its own rows back;
- everything else (`run`), in arrival order, only while no step waits: inference never
  queues behind a backlog of training work (Petals gives inference the same priority). It
  can still wait for the one job already running: torch work is not preempted.

`BatchStats` counts passes, sessions per pass and queue waits; the node logs them every
`log_every` passes and sends them with its heartbeats (`pollinate status`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BatchingConfig:
    """How concurrent sessions' steps are gathered into one pass of the span."""

    # Longest the torch thread waits for other sessions' steps to join the oldest pending
    # one, milliseconds after it arrived or the thread got free (whichever is later), and
    # never longer than the last pass took. The wait ends as soon as every active session
    # (see active_s) has a step pending, so a lone user never waits. 50 ms covers a client's
    # round trip on loopback or a LAN (reply, LM head, next step) on CPU, where a pass takes
    # 100-300 ms; on a GPU the last pass's time bounds it. 0 = never wait: a pass takes what
    # is pending when the thread frees up.
    window_ms: float = 50.0
    # A session counts as active (its next step is likely on its way) for this long after it
    # last sent or got a step, seconds: a generating client steps again within a round trip;
    # a chat user reading the answer does not, and nobody waits for them.
    active_s: float = 1.0
    # Most sessions' steps in one pass; 1 turns batching off (every step runs alone).
    max_sessions: int = 16
    # Most new tokens in one pass (a prefill counts its length): bounds one pass's activation
    # memory and how long the steps in it wait. A single step larger than this runs alone.
    max_tokens: int = 2048
    # Log a line of batch sizes and queue waits every this many passes.
    log_every: int = 200

    def __post_init__(self) -> None:
        if not self.window_ms >= 0:
            raise ValueError(f"window_ms must be >= 0, got {self.window_ms}")
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.active_s > 0:
            raise ValueError(f"active_s must be > 0, got {self.active_s}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")


def _percentile(values, q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class BatchStats:
    """What the torch thread did: passes of inference steps and their queue waits."""

    passes: int = 0  # passes of inference steps run (a step alone counts as a pass of 1)
    steps: int = 0  # inference steps run
    max_sessions: int = 0  # largest pass, sessions
    busy_s: float = 0.0  # seconds spent running passes of steps
    jobs: int = 0  # other torch jobs (training, Forward, rounds) run
    # Recent waits, seconds, from a step's (job's) arrival to the start of its pass (job).
    step_waits: deque = field(default_factory=lambda: deque(maxlen=2000))
    job_waits: deque = field(default_factory=lambda: deque(maxlen=2000))
    recent_sizes: deque = field(default_factory=lambda: deque(maxlen=2000))  # sessions per recent pass

    def snapshot(self) -> dict[str, float]:
        """Numbers for logs and the heartbeat: recent means and percentiles, in ms."""
        sizes = self.recent_sizes
        return {
            "passes": self.passes,
            "steps": self.steps,
            "mean_sessions": sum(sizes) / len(sizes) if sizes else 0.0,
            "max_sessions": self.max_sessions,
            "step_wait_p50_ms": 1000 * _percentile(self.step_waits, 0.5),
            "step_wait_p99_ms": 1000 * _percentile(self.step_waits, 0.99),
            "job_wait_p50_ms": 1000 * _percentile(self.job_waits, 0.5),
            "jobs": self.jobs,
            "busy_s": self.busy_s,
        }

    def to_proto(self):
        """The snapshot as the wire's ServingLoad (heartbeats, Info)."""
        from pollinate.protocol.v1 import common_pb2

        s = self.snapshot()
        return common_pb2.ServingLoad(
            passes=s["passes"], steps=s["steps"], mean_sessions=s["mean_sessions"], max_sessions=s["max_sessions"],
            step_wait_p50_ms=s["step_wait_p50_ms"], step_wait_p99_ms=s["step_wait_p99_ms"], busy_s=s["busy_s"])

    def describe(self) -> str:
        s = self.snapshot()
        return (f"{s['passes']} passes of {s['steps']} steps, {s['mean_sessions']:.1f} sessions per pass lately "
                f"(max {s['max_sessions']}), step queue wait p50 {s['step_wait_p50_ms']:.1f} ms "
                f"p99 {s['step_wait_p99_ms']:.1f} ms; {s['jobs']} training/other jobs, "
                f"their wait p50 {s['job_wait_p50_ms']:.1f} ms")


@dataclass
class _Pending:
    payload: Any  # a step (for run_steps) or (fn, args)
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float  # time.monotonic()
    tokens: int = 0  # new tokens of a step
    packable: bool = False  # may share a pass with other steps


def _settle(future: asyncio.Future, value, error: BaseException | None) -> None:
    if future.done():  # the caller went away (cancelled)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class TorchWorker:
    """One torch thread with a priority queue of inference steps (batched) and other jobs.

    run_steps(payloads) runs a list of step payloads as one pass and returns, per payload,
    its result or the exception it raised. expected_sessions() counts the sessions whose step
    may come soon (no sense waiting for more once they all have one pending).
    """

    def __init__(self, config: BatchingConfig, *, run_steps: Callable[[list], list],
                 expected_sessions: Callable[[], int], name: str = "span-torch"):
        self.config = config
        self.run_steps = run_steps
        self.expected_sessions = expected_sessions
        self.stats = BatchStats()
        self._cv = threading.Condition()
        self._steps: deque[_Pending] = deque()
        self._jobs: deque[_Pending] = deque()
        self._stopping = False
        self._free_since = 0.0  # time.monotonic() when the thread finished its last work
        self._last_pass_s = 0.0  # how long the last pass of steps took (none yet: no wait)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ---- the event loop's side

    async def run(self, fn, *args):
        """``fn(*args)`` on the torch thread, after any pending inference steps."""
        return await self._submit(self._jobs, _Pending((fn, args), *self._new_future()))

    async def step(self, payload, *, tokens: int, packable: bool):
        """One inference step's result, from a pass shared with other sessions' steps when
        `packable` (run_steps gets the payload in a list)."""
        pending = _Pending(payload, *self._new_future(), tokens=tokens, packable=packable)
        return await self._submit(self._steps, pending)

    def _new_future(self):
        loop = asyncio.get_running_loop()
        return loop.create_future(), loop, time.monotonic()

    async def _submit(self, queue: deque, pending: _Pending):
        with self._cv:
            if self._stopping:
                raise RuntimeError("the torch worker is stopped")
            queue.append(pending)
            self._cv.notify()
        return await pending.future

    def stop(self) -> None:
        """Finish the pass or job in progress, refuse what waits, end the thread."""
        with self._cv:
            self._stopping = True
            left = [*self._steps, *self._jobs]
            self._steps.clear()
            self._jobs.clear()
            self._cv.notify_all()
        for p in left:
            p.loop.call_soon_threadsafe(_settle, p.future, None, RuntimeError("the torch worker stopped"))
        if self.stats.passes or self.stats.jobs:
            logger.info("batching: %s", self.stats.describe())

    # ---- the torch thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._steps and not self._jobs:
                    self._cv.wait()
                if self._stopping:
                    return
                batch = self._gather() if self._steps else None
                if self._stopping:  # stop() came while the window was open: it refused them
                    return
                job = self._jobs.popleft() if batch is None else None
            if batch is not None:
                self._run_batch(batch)
            else:
                self._run_job(job)
            self._free_since = time.monotonic()

    def _gather(self) -> list[_Pending]:
        """The steps of the next pass (lock held): the oldest pending step, and if it may share
        a pass, the packable steps after it, waiting up to the window for more."""
        first = self._steps[0]
        cfg = self.config
        if not first.packable or cfg.max_sessions == 1:
            return [self._steps.popleft()]
        # Wait from when the step arrived or the thread got free, whichever is later: steps that
        # queued behind the last pass do not go alone while the sessions of that pass, about
        # to send again, are a round trip away. Never longer than the last pass took: waiting
        # longer than a pass costs more than the pass it saves.
        window = min(cfg.window_ms / 1000, self._last_pass_s)
        deadline = max(first.arrived, self._free_since) + window
        while True:
            take, tokens = [], 0
            for p in self._steps:
                if not p.packable:
                    continue
                if len(take) == cfg.max_sessions or (take and tokens + p.tokens > cfg.max_tokens):
                    break
                take.append(p)
                tokens += p.tokens
            full = len(take) == cfg.max_sessions or len(take) < sum(p.packable for p in self._steps)
            left = deadline - time.monotonic()
            if full or left <= 0 or self._stopping or len(self._steps) >= self.expected_sessions():
                break
            self._cv.wait(left)
        if self._stopping:
            return []
        for p in take:
            self._steps.remove(p)
        return take

    def _run_batch(self, batch: list[_Pending]) -> None:
        start = time.monotonic()
        try:
            results = self.run_steps([p.payload for p in batch])
        except BaseException as e:  # run_steps reports per step; this is its own failure
            results = [e] * len(batch)
        self._last_pass_s = time.monotonic() - start
        s = self.stats  # counted before anyone hears back, so a caller's next Info includes its step
        s.passes += 1
        s.busy_s += self._last_pass_s
        s.steps += len(batch)
        s.max_sessions = max(s.max_sessions, len(batch))
        s.recent_sizes.append(len(batch))
        s.step_waits.extend(start - p.arrived for p in batch)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("pass of %d steps (%d tokens) after waits of %s ms took %.0f ms", len(batch),
                         sum(p.tokens for p in batch), [round(1000 * (start - p.arrived)) for p in batch],
                         1000 * self._last_pass_s)
        if s.passes % self.config.log_every == 0:
            logger.info("batching: %s", s.describe())
        for p, r in zip(batch, results):
            error = r if isinstance(r, BaseException) else None
            p.loop.call_soon_threadsafe(_settle, p.future, None if error else r, error)

    def _run_job(self, job: _Pending) -> None:
        self.stats.job_waits.append(time.monotonic() - job.arrived)
        self.stats.jobs += 1
        fn, args = job.payload
        try:
            value, error = fn(*args), None
        except BaseException as e:
            value, error = None, e
        job.loop.call_soon_threadsafe(_settle, job.future, value, error)
