"""The torch worker (node/batching.py): steps go before other jobs, concurrent steps share a
pass within the window and the caps, each caller gets its own result or error."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pollinate.node.batching import BatchingConfig, TorchWorker


class Recorder:
    """run_steps that records each pass and answers each payload with payload * 10."""

    def __init__(self, pass_s: float = 0.0):
        self.pass_s = pass_s  # how long each pass takes
        self.passes: list[list] = []
        self.order: list = []  # what the thread ran, in order: ("pass", payloads) or ("job", name)

    def __call__(self, payloads):
        self.passes.append(list(payloads))
        self.order.append(("pass", tuple(payloads)))
        time.sleep(self.pass_s)
        return [ValueError(f"bad {p}") if p < 0 else p * 10 for p in payloads]


def worker(recorder, *, expected_sessions=lambda: 100, **kw) -> TorchWorker:
    return TorchWorker(BatchingConfig(**kw), run_steps=recorder, expected_sessions=expected_sessions)


async def _block(w: TorchWorker, recorder: Recorder) -> tuple[threading.Event, asyncio.Future]:
    """Occupy the torch thread with a job until the returned event is set."""
    started, release = threading.Event(), threading.Event()

    def busy():
        started.set()
        release.wait(10)
        recorder.order.append(("job", "busy"))

    job = asyncio.ensure_future(w.run(busy))
    await asyncio.to_thread(started.wait, 10)
    return release, job


def test_steps_pending_behind_a_job_share_one_pass_and_go_before_later_jobs():
    async def main():
        rec = Recorder()
        w = worker(rec, window_ms=0)
        try:
            release, busy = await _block(w, rec)
            later = asyncio.ensure_future(w.run(lambda: rec.order.append(("job", "later"))))
            await asyncio.sleep(0)
            steps = [asyncio.ensure_future(w.step(i, tokens=1, packable=True)) for i in range(1, 6)]
            await asyncio.sleep(0.05)  # all submitted while the thread is busy
            release.set()
            results = await asyncio.gather(*steps)
            await asyncio.gather(busy, later)
        finally:
            w.stop()
        assert results == [10, 20, 30, 40, 50]
        assert rec.order == [("job", "busy"), ("pass", (1, 2, 3, 4, 5)), ("job", "later")]
        s = w.stats.snapshot()
        assert (s["passes"], s["steps"], s["max_sessions"], s["jobs"]) == (1, 5, 5, 2)
        assert s["step_wait_p50_ms"] >= 40  # they waited for the busy job

    asyncio.run(main())


def test_caps_split_passes_and_unpackable_steps_run_alone():
    async def main():
        rec = Recorder()
        w = worker(rec, window_ms=0, max_sessions=3, max_tokens=5)
        try:
            release, busy = await _block(w, rec)
            steps = [asyncio.ensure_future(w.step(1, tokens=1, packable=True)),
                     asyncio.ensure_future(w.step(2, tokens=1, packable=False)),
                     asyncio.ensure_future(w.step(3, tokens=1, packable=True)),
                     asyncio.ensure_future(w.step(4, tokens=1, packable=True)),
                     asyncio.ensure_future(w.step(5, tokens=1, packable=True)),
                     asyncio.ensure_future(w.step(6, tokens=4, packable=True)),  # over max_tokens with 5
                     asyncio.ensure_future(w.step(-7, tokens=1, packable=True))]
            await asyncio.sleep(0.05)
            release.set()
            results = await asyncio.gather(*steps, return_exceptions=True)
            await busy
        finally:
            w.stop()
        assert results[:6] == [10, 20, 30, 40, 50, 60]
        assert isinstance(results[6], ValueError) and "bad -7" in str(results[6])
        # oldest first, packable ones together; at most 3 sessions; 5 and 6 make 5 tokens, -7 a 6th
        assert rec.passes == [[1, 3, 4], [2], [5, 6], [-7]]

    asyncio.run(main())


def test_a_lone_step_waits_only_while_other_sessions_may_join():
    async def main():
        rec = Recorder(pass_s=0.4)  # passes longer than the window: the window bounds the wait
        sessions = {"n": 1}
        w = worker(rec, window_ms=300, expected_sessions=lambda: sessions["n"])
        try:
            t0 = time.monotonic()
            assert await w.step(1, tokens=1, packable=True) == 10
            alone = time.monotonic() - t0  # the only open session: no wait
            sessions["n"] = 2
            t0 = time.monotonic()
            first = asyncio.ensure_future(w.step(2, tokens=1, packable=True))
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(w.step(3, tokens=1, packable=True))
            assert await asyncio.gather(first, second) == [20, 30]
            joined = time.monotonic() - t0  # the second joined within the window: no full wait
            t0 = time.monotonic()
            assert await w.step(4, tokens=1, packable=True) == 40
            waited = time.monotonic() - t0  # the other session sent nothing: the whole window
        finally:
            w.stop()
        assert alone < 0.4 + 0.25 and joined < 0.4 + 0.25 and waited >= 0.4 + 0.3
        assert rec.passes == [[1], [2, 3], [4]]
        assert 3 * 0.4 <= w.stats.busy_s < 3 * 0.4 + 0.5  # the passes' time, not the waits'

    asyncio.run(main())


def test_the_wait_is_never_longer_than_the_last_pass():
    async def main():
        rec = Recorder(pass_s=0.05)
        w = worker(rec, window_ms=5000, expected_sessions=lambda: 2)
        try:
            await w.step(1, tokens=1, packable=True)  # no pass before it: no wait
            t0 = time.monotonic()
            assert await w.step(2, tokens=1, packable=True) == 20
            waited = time.monotonic() - t0
        finally:
            w.stop()
        assert 0.05 + 0.05 <= waited < 1.0  # last pass 50 ms: waited that, then ran 50 ms

    asyncio.run(main())


def test_max_sessions_one_turns_batching_off():
    async def main():
        rec = Recorder()
        w = worker(rec, window_ms=0, max_sessions=1)
        try:
            release, busy = await _block(w, rec)
            steps = [asyncio.ensure_future(w.step(i, tokens=1, packable=True)) for i in (1, 2, 3)]
            await asyncio.sleep(0.05)
            release.set()
            assert await asyncio.gather(*steps) == [10, 20, 30]
            await busy
        finally:
            w.stop()
        assert rec.passes == [[1], [2], [3]]

    asyncio.run(main())


def test_a_stopped_worker_refuses_work():
    async def main():
        w = worker(Recorder())
        w.stop()
        with pytest.raises(RuntimeError, match="stopped"):
            await w.run(lambda: None)

    asyncio.run(main())


@pytest.mark.parametrize("bad", [dict(window_ms=-1), dict(max_sessions=0), dict(max_tokens=0), dict(log_every=0),
                                 dict(active_s=0)])
def test_config_names_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        BatchingConfig(**bad)


def test_stop_during_the_window_refuses_the_waiting_steps():
    async def main():
        rec = Recorder(pass_s=0.2)
        w = worker(rec, window_ms=5000, expected_sessions=lambda: 3)
        await w.step(1, tokens=1, packable=True)  # a pass of 0.2 s: the next wait is up to 0.2 s
        waiting = asyncio.ensure_future(w.step(2, tokens=1, packable=True))
        await asyncio.sleep(0.05)  # the thread now waits for the other two active sessions
        w.stop()
        with pytest.raises(RuntimeError, match="stopped"):
            await waiting
        assert rec.passes == [[1]]

    asyncio.run(main())


def test_the_node_command_sets_the_batching():
    """ServingConfig composes BatchingConfig; its flags' defaults are the config's."""
    import argparse

    from pollinate.node.cli import add_arguments, build_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--host", "127.0.0.1", "--blocks", "0:2"]
    assert build_config(parser.parse_args(base)).serving.batching == BatchingConfig()
    batching = build_config(parser.parse_args([*base, "--batch-window-ms", "0", "--max-batch-sessions", "1",
                                               "--max-batch-tokens", "64"])).serving.batching
    assert (batching.window_ms, batching.max_sessions, batching.max_tokens) == (0.0, 1, 64)
    with pytest.raises(ValueError, match="max_sessions"):
        build_config(parser.parse_args([*base, "--max-batch-sessions", "0"]))
