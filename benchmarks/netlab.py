"""A network lab on one Linux machine: one network namespace per process, each with its own
address on a bridge, every link capped by `tc tbf` in both directions.

    with NetLab(workdir, rate_mbit=20) as lab:          # 0 = unlimited
        coord = lab.add_host("coord")                    # namespace + veth + 10.77.0.1
        node = lab.add_host("node-0")                    # 10.77.0.2 ...
        p = lab.start(coord, "coordinator", ["coordinator", "--host", coord.ip, ...])
        lab.group.wait_ready([p], timeout=60)            # tests/integration/procs.py
        before = lab.counters()                          # {host: (rx_bytes, tx_bytes)}
        lab.set_rate(100)                                # change every link's cap
    # on exit, failure or Ctrl-C: processes SIGKILLed by group, namespaces deleted

Layout: a bridge `br0` lives in a namespace of its own (`<lab>-br`); each host namespace
(`<lab>-<name>`) holds `eth0` (10.77.0.N/24) and `lo`, and its veth peer `v<N>` sits on the
bridge. No namespace has a default route, and the bridge namespace has no address, so
nothing can reach or leave for an address outside the lab; the root namespace is never
touched beyond creating the namespaces. Labs run side by side: every name is under a
unique prefix (`pollab-<pid>-<random>`), and interface names live inside the lab's own
namespaces. A lab whose creating process is gone (killed with SIGKILL) is removed by the
next lab that starts.

Rates: `tbf` on `eth0` caps what a host sends, `tbf` on its bridge-side `v<N>` caps what
it receives, so each direction of each link has the rate. `tc netem` is not available on
this machine, so the lab models bandwidth only: no added delay, jitter or loss (a round
trip in the lab is a few tens of microseconds).

Needs root and the `ip` and `tc` tools; `unavailable()` says why not, for tests to skip on.
Processes start through tests/integration/procs.py's ProcGroup (`ip netns exec` in front of
the command; it execs, so the pid and its process group are the command's).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from procs import Proc, ProcGroup  # noqa: E402

PREFIX = "pollab-"
# Addresses only ever assigned inside the lab's namespaces (RFC 1918 space, /24: 253 hosts).
SUBNET = "10.77.0"
# tbf's bucket: at least 128 KiB, so one 64 KiB GSO segment of a veth always fits, else the
# rate's 10 ms worth. Its queue holds 100 ms of traffic before tail-dropping.
MIN_BURST_BYTES = 128 * 1024
QUEUE_LATENCY_MS = 100
# A home router (add_home): masquerade out of eth0, forward only what the home started, and
# accept nothing new on the router itself from outside.
NAT_RULES = """
table ip nat {
    chain postrouting { type nat hook postrouting priority 100; oifname "eth0" masquerade; }
}
table inet filter {
    chain forward {
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "eth0" accept
    }
    chain input {
        type filter hook input priority 0; policy drop;
        ct state established,related accept
        iifname { "lo", "lan0" } accept
    }
}
"""
# Seconds one `ip`/`tc` command may take.
COMMAND_TIMEOUT_S = 20.0


class LabError(RuntimeError):
    """An `ip` or `tc` command failed (its stderr is in the message)."""


def unavailable() -> str | None:
    """Why a lab cannot run here (for pytest.skip), or None if it can."""
    if sys.platform != "linux":
        return "the network lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the network lab needs root (it creates network namespaces and tc qdiscs)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the network lab needs the `{tool}` tool (iproute2)"
    return None


def nat_unavailable() -> str | None:
    """Why a lab cannot hold a home behind NAT (add_home) here, or None if it can."""
    if unavailable() is not None:
        return unavailable()
    if shutil.which("nft") is None:
        return "a home behind NAT needs the `nft` tool (Debian package nftables)"
    return None


def _run(*cmd: str, check: bool = True, input: str | None = None) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, input=input)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tbf_args(rate_mbit: float) -> list[str]:
    """The qdisc of a link capped at rate_mbit (after `tc qdisc replace dev DEV root`)."""
    burst = max(MIN_BURST_BYTES, int(rate_mbit * 1e6 / 8 * 0.01))
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", f"{QUEUE_LATENCY_MS}ms"]


def list_namespaces() -> list[str]:
    return [line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip()]


def _delete_namespace(ns: str) -> None:
    """SIGKILL whatever still runs in `ns`, then delete it (its veths go with it)."""
    for pid in _run("ip", "netns", "pids", ns, check=False).split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _run("ip", "netns", "del", ns, check=False)


def cleanup_stale() -> list[str]:
    """Delete the namespaces of labs whose creating process no longer runs; returns them."""
    stale = []
    for ns in list_namespaces():
        if not ns.startswith(PREFIX):
            continue
        try:
            owner = int(ns[len(PREFIX):].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(owner):
            _delete_namespace(ns)
            stale.append(ns)
    return stale


def read_counters(namespaces: dict[str, str]) -> dict[str, tuple[int, int]]:
    """{name: (rx_bytes, tx_bytes)} of eth0 in each named namespace (any process running as
    root can read them: `ip -n` names the namespace, nothing is dialed)."""
    out = {}
    for name, ns in namespaces.items():
        stats = json.loads(_run("ip", "-n", ns, "-s", "-j", "link", "show", "dev", "eth0"))[0]["stats64"]
        out[name] = (int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"]))
    return out


@dataclass(frozen=True)
class Host:
    name: str  # role in the lab: "coord", "node-0", "trainer"
    ns: str  # network namespace
    ip: str  # its address inside the lab
    index: int  # N in 10.77.0.N and in the bridge-side v<N>

    def address(self, port: int) -> str:
        return f"{self.ip}:{port}"


class NetLab:
    """Namespaces, links and processes, torn down on exit (see the module docstring)."""

    def __init__(self, workdir: Path, *, rate_mbit: float = 0, env: dict[str, str] | None = None):
        why = unavailable()
        if why is not None:
            raise LabError(why)
        self.workdir = Path(workdir)
        self.lab_id = f"{PREFIX}{os.getpid()}-{random.randrange(16 ** 4):04x}"
        self.bridge_ns = f"{self.lab_id}-br"
        self.hosts: dict[str, Host] = {}
        self.rate_mbit = rate_mbit
        self.group = ProcGroup(self.workdir, env=env)
        self._namespaces: list[str] = []
        self._next_index = 1  # N of the next host on the bridge
        self._old_handlers: dict[int, object] = {}
        self._closed = False

    # ---- set-up -----------------------------------------------------------------------

    def open(self) -> NetLab:
        removed = cleanup_stale()
        if removed:
            print(f"netlab: removed {len(removed)} namespaces of dead labs", file=sys.stderr)
        self._trap_signals()
        self._add_namespace(self.bridge_ns)
        self._ip(self.bridge_ns, "link", "add", "br0", "type", "bridge")
        self._ip(self.bridge_ns, "link", "set", "br0", "up")
        self._ip(self.bridge_ns, "link", "set", "lo", "up")
        return self

    def add_host(self, name: str) -> Host:
        """A namespace with eth0 = 10.77.0.N/24 on the lab's bridge, at the lab's rate."""
        if name in self.hosts:
            raise ValueError(f"host {name!r} already exists")
        index = self._next_index
        if index > 253:
            raise ValueError("a lab holds at most 253 hosts")
        host = Host(name=name, ns=f"{self.lab_id}-{name}", ip=f"{SUBNET}.{index}", index=index)
        self._add_namespace(host.ns)
        # Created in the bridge namespace, then one end moved into the host's.
        self._ip(self.bridge_ns, "link", "add", f"v{index}", "type", "veth", "peer", "name", "eth0",
                 "netns", host.ns)
        self._ip(self.bridge_ns, "link", "set", f"v{index}", "master", "br0")
        self._ip(self.bridge_ns, "link", "set", f"v{index}", "up")
        self._ip(host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        self._ip(host.ns, "link", "set", "eth0", "up")
        self._ip(host.ns, "link", "set", "lo", "up")
        self.hosts[name] = host
        self._next_index += 1
        self._shape(host, self.rate_mbit)
        return host

    def add_home(self, name: str) -> Host:
        """A host behind a home router: namespace `name` holds eth0 = 192.168.N.2/24 with its
        default route through a router host `<name>-router` (10.77.0.N on the bridge). The
        router masquerades what the home sends (nftables) and drops every connection that
        starts outside: the home can dial out, nothing can dial in. The link is capped on the
        router's side of the bridge (the lab's rate) and on the home's eth0."""
        if shutil.which("nft") is None:
            raise LabError("a home behind NAT needs the `nft` tool (Debian package nftables)")
        router = self.add_host(f"{name}-router")
        lan = f"192.168.{router.index}"
        host = Host(name=name, ns=f"{self.lab_id}-{name}", ip=f"{lan}.2", index=router.index)
        self._add_namespace(host.ns)
        self._ip(router.ns, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", host.ns)
        self._ip(router.ns, "addr", "add", f"{lan}.1/24", "dev", "lan0")
        self._ip(router.ns, "link", "set", "lan0", "up")
        self._ip(host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        self._ip(host.ns, "link", "set", "eth0", "up")
        self._ip(host.ns, "link", "set", "lo", "up")
        self._ip(host.ns, "route", "add", "default", "via", f"{lan}.1")
        _run("ip", "netns", "exec", router.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _run("ip", "netns", "exec", router.ns, "nft", "-f", "-", input=NAT_RULES)
        self.hosts[name] = host
        self._shape(host, self.rate_mbit)
        return host

    def set_rate(self, rate_mbit: float) -> None:
        """Cap every link at rate_mbit in each direction (0: unlimited)."""
        self.rate_mbit = rate_mbit
        for host in self.hosts.values():
            self._shape(host, rate_mbit)

    def _shape(self, host: Host, rate_mbit: float) -> None:
        for ns, dev in ((host.ns, "eth0"), (self.bridge_ns, f"v{host.index}")):
            if rate_mbit <= 0:
                _run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
                continue
            _run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *tbf_args(rate_mbit))

    def qdisc(self, host: Host) -> str:
        """`tc qdisc show` of the host's eth0 (to check what is applied)."""
        return _run("tc", "-n", host.ns, "qdisc", "show", "dev", "eth0").strip()

    # ---- processes and counters ---------------------------------------------------------

    def start(self, host: Host, name: str, args: list[str], **kwargs) -> Proc:
        """ProcGroup.start inside the host's namespace."""
        return self.group.start(name, args, wrap=["ip", "netns", "exec", host.ns], **kwargs)

    def exec(self, host: Host, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run a command to completion inside the host's namespace (subprocess.run kwargs)."""
        return subprocess.run(["ip", "netns", "exec", host.ns, *cmd], **kwargs)

    def counters(self) -> dict[str, tuple[int, int]]:
        """{host name: (rx_bytes, tx_bytes)} of each host's eth0, as the kernel counts them."""
        return read_counters({host.name: host.ns for host in self.hosts.values()})

    # ---- teardown ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL to each process group), delete every
        namespace. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.group.stop_all(timeout=5.0)
        finally:
            for ns in reversed(self._namespaces):
                _delete_namespace(ns)
            self._restore_signals()

    def _add_namespace(self, ns: str) -> None:
        _run("ip", "netns", "add", ns)
        self._namespaces.append(ns)

    def _ip(self, ns: str, *args: str) -> None:
        _run("ip", "-n", ns, *args)

    def _trap_signals(self) -> None:
        """SIGTERM and SIGINT raise in the main thread, so `finally` and `__exit__` run and
        the namespaces go (SIGKILL cannot be trapped: the next lab's cleanup_stale handles it)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def raise_exit(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, raise_exit)

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def __enter__(self) -> NetLab:
        try:
            return self.open()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                print(self.group.dump_logs(), file=sys.stderr)
        finally:
            self.close()
