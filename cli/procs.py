"""Real processes on this machine (`pollinate demo`, integration tests, benchmarks): start,
wait ready, stop, kill.

    with ProcGroup(tmp_path) as group:
        a = group.start("node-a", ["node", "--blocks", "0:2", ...])   # `python -m pollinate ...`
        group.wait_ready([a], timeout=60)                             # ready file, not sleeps
        ...
        a.kill()                                                       # SIGKILL, a named fault
    # on exit: SIGTERM everyone, SIGKILL whoever lingers; on an exception, log tails printed

Every process gets `--ready-file` (a JSON file it writes once serving; its content is in
`proc.info`) and a log file; nothing here knows about nodes beyond that convention, so
the coordinator and training tests can start their processes the same way. Each process
runs in its own process group, and teardown kills the group: the hivemind DHT process a
node or coordinator forks outlives a SIGKILLed parent otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    ready_path: Path | None
    info: dict = field(default_factory=dict)  # the ready file's JSON once ready

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: no goodbye, no offline announcement."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` seconds; returns the exit code."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.send_signal(signal.SIGKILL)
                self.popen.wait(10)
        return self.popen.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def pollinate_cmd(*args: str, module: str = "pollinate") -> list[str]:
    return [sys.executable, "-m", module, *args]


class ProcGroup:
    """Processes started together and torn down together (SIGTERM, then SIGKILL)."""

    def __init__(self, workdir: Path, *, env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}

    def start(self, name: str, args: list[str], *, ready: bool = True, cmd: list[str] | None = None,
              stdin: bool = False, wrap: list[str] = (), module: str = "pollinate") -> Proc:
        """Start `python -m MODULE ARGS --ready-file F` (MODULE: pollinate unless given), its
        stdout and stderr to a log file; or `cmd` verbatim, its stdout to a pipe. `wrap` goes in
        front of the command line, e.g. `ip netns exec NS` (benchmarks/netlab.py); it must exec
        the command, so the pid (and process group) stay the command's."""
        log_path = self.workdir / f"{name}.log"
        ready_path = self.workdir / f"{name}.ready.json" if ready else None
        full = [*wrap, *(list(cmd) if cmd is not None else pollinate_cmd(*args, module=module))]
        if ready_path is not None:
            ready_path.unlink(missing_ok=True)
            full += ["--ready-file", str(ready_path)]
        log = open(log_path, "wb")
        popen = subprocess.Popen(
            full, stdout=subprocess.PIPE if cmd is not None else log, stderr=log,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, env=self.env, cwd=self.workdir,
            # Its own process group: the hivemind DHT process a node or coordinator forks
            # outlives a SIGKILLed parent, and teardown must not leave it running.
            start_new_session=True,
        )
        log.close()
        proc = Proc(name=name, popen=popen, log_path=log_path, ready_path=ready_path)
        self.procs.append(proc)
        return proc

    def wait_ready(self, procs: list[Proc], timeout: float, on_ready=None) -> None:
        """Wait until each proc has written its ready file; raise (with log tails) otherwise.
        ``on_ready(proc)``, if given, is called as each one becomes ready."""
        deadline = time.monotonic() + timeout
        pending = list(procs)
        while pending:
            for p in list(pending):
                if p.ready_path is not None and p.ready_path.exists():
                    p.info = json.loads(p.ready_path.read_text())
                    pending.remove(p)
                    if on_ready is not None:
                        on_ready(p)
                elif not p.alive():
                    raise RuntimeError(f"{p.name} exited with {p.popen.returncode} before ready:\n{p.log_tail()}")
            if pending and time.monotonic() > deadline:
                tails = "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in pending)
                raise TimeoutError(f"not ready after {timeout:.0f} s: {[p.name for p in pending]}\n{tails}")
            if pending:
                time.sleep(0.1)

    def dump_logs(self, lines: int = 40) -> str:
        return "\n".join(f"===== {p.name} (pid {p.pid}, rc {p.popen.returncode})\n{p.log_tail(lines)}" for p in self.procs)

    def stop_all(self, timeout: float = 10.0) -> None:
        for p in self.procs:
            if p.alive():
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.send_signal(signal.SIGKILL)
                p.popen.wait(10)
        for p in self.procs:  # what they forked (DHT processes), above all of the SIGKILLed ones
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def __enter__(self) -> ProcGroup:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.stop_all()
        finally:
            if exc_type is not None:
                print(self.dump_logs(), file=sys.stderr)
