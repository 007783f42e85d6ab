"""Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
NUL-terminated JSON on fds 3 and 4), so a test reads a page's DOM after its scripts ran,
and keeps reading it while the swarm changes underneath, with no driver package.

    with Browser.start() as browser:              # skips the test if no Chromium is found
        tab = browser.open("http://127.0.0.1:7071/")
        tab.wait_for("document.title !== ''", timeout=20)
        tab.eval("document.title")

Chromium is Debian's `chromium` package (.ci/run installs it where it can).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Run by a small Python before Chromium: move the pipe ends (any fd numbers) to fds 3 and 4,
# then exec it (the same pid), as --remote-debugging-pipe expects.
_ON_FDS_3_AND_4 = (
    "import fcntl, os, sys\n"
    "r, w = (fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3])\n"
    "os.dup2(r, 3); os.dup2(w, 4); os.close(r); os.close(w)\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


class Tab:
    def __init__(self, browser: "Browser", session: str) -> None:
        self.browser = browser
        self.session = session

    def call(self, method: str, **params):
        return self.browser.call(method, session=self.session, **params)

    def eval(self, expression: str):
        """The expression's value (JSON-able), evaluated in the page; raises on a JS error."""
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression!r} threw: {out['exceptionDetails']}")
        return out["result"].get("value")

    def wait_for(self, expression: str, timeout: float) -> None:
        """Until the expression is truthy in the page (polled every 0.1 s), or TimeoutError
        with the page's text."""
        deadline = time.monotonic() + timeout
        while not self.eval(f"!!({expression})"):
            if time.monotonic() > deadline:
                text = self.eval("document.body ? document.body.innerText.slice(0, 3000) : ''")
                raise TimeoutError(f"not true after {timeout:.0f} s: {expression}\n--- page text:\n{text}")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))


class Browser:
    def __init__(self, proc: subprocess.Popen, to_browser, from_browser, profile: tempfile.TemporaryDirectory):
        self.proc = proc
        self._out = to_browser
        self._in = from_browser
        self._profile = profile
        self._next_id = 0
        self._buf = b""

    @classmethod
    def start(cls, *, width: int = 1200, height: int = 900, log: Path | None = None) -> "Browser":
        """Chromium with a fresh profile; its stderr to `log` (or discarded)."""
        exe = find_chromium()
        if exe is None:
            pytest.skip("no Chromium (Debian's `chromium` package; .ci/run installs it as root)")
        # fds 3 and 4 in the child: Chromium reads commands from 3 and writes replies to 4
        cmd_r, cmd_w = os.pipe()
        rep_r, rep_w = os.pipe()
        profile = tempfile.TemporaryDirectory(prefix="pollinate-chromium-")
        log = open(log, "wb") if log is not None else subprocess.DEVNULL
        proc = subprocess.Popen(
            [sys.executable, "-c", _ON_FDS_3_AND_4, str(cmd_r), str(rep_w), exe, "--headless", "--no-sandbox",
             "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
             "--remote-debugging-pipe", f"--user-data-dir={profile.name}", f"--window-size={width},{height}",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, pass_fds=(cmd_r, rep_w),
            start_new_session=True)
        os.close(cmd_r)
        os.close(rep_w)
        if log is not subprocess.DEVNULL:
            log.close()
        return cls(proc, os.fdopen(cmd_w, "wb", buffering=0), os.fdopen(rep_r, "rb", buffering=0), profile)

    def call(self, method: str, session: str | None = None, timeout: float = 30.0, **params):
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self._out.write(json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:  # events (no id) and other replies are skipped
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._in.fileno(), 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited ({self.proc.poll()})")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def open(self, url: str, *, width: int | None = None, height: int | None = None) -> Tab:
        """A new tab on `url`; with width/height, a viewport of that size (a phone: 390 x 844)."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        tab = Tab(self, self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"])
        if width:
            tab.call("Emulation.setDeviceMetricsOverride", width=width, height=height or 844,
                     deviceScaleFactor=1, mobile=True)
        tab.call("Page.enable")
        tab.call("Page.navigate", url=url)
        tab.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", timeout=30)
        return tab

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        try:  # its renderer and zygote processes, in the session it leads
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._out.close()
        self._in.close()
        self._profile.cleanup()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
