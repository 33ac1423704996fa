"""Shared test fixtures: a real ``sevmon serve`` on real UNIX sockets, and a raw client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Real QEMU 7.2 captures, carried by the repository (tests/data/README.md): a clone tests itself.
FIXTURES = ROOT / "tests" / "data"
FIXTURE_NAMES = ["linux-4level", "linux-pae", "linux-32bit"]


def pytest_configure(config):
    """sevmon's pytest plugin (sevmon_daemon, sevmon_qmp) even where the installed sevmon's metadata
    predates its pytest11 entry point (an editable install made before it existed)."""
    plugin = "sevmon.testing.pytest_plugin"
    if not config.pluginmanager.has_plugin(plugin):
        config.pluginmanager.import_plugin(plugin)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run long soak/fuzz/scale tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


class Daemon:
    """A ``sevmon serve`` subprocess. ``qmp``/``hmp`` are socket paths."""

    def __init__(self, tmp: Path, args: list[str], hmp: bool = True):
        self.qmp = str(tmp / "qmp.sock")
        self.hmp = str(tmp / "hmp.sock") if hmp else None
        cmd = [sys.executable, "-m", "sevmon", "serve", "--qmp", self.qmp, *args]
        if self.hmp:
            cmd += ["--hmp", self.hmp]
        self.log = open(tmp / "daemon.log", "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.output()}")
            if os.path.exists(self.qmp) and (not self.hmp or os.path.exists(self.hmp)):
                try:
                    s = socket.socket(socket.AF_UNIX)
                    s.connect(self.qmp)
                    s.close()
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError("daemon did not start: " + self.output())

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def make_daemon(tmp_path):
    daemons = []

    def make(*args, hmp=True, subdir=None):
        d = tmp_path / (subdir or f"d{len(daemons)}")
        d.mkdir(exist_ok=True)
        daemon = Daemon(d, list(args), hmp=hmp)
        daemons.append(daemon)
        return daemon

    yield make
    for d in daemons:
        d.stop()


@pytest.fixture
def daemon(make_daemon):
    """The default daemon: the built-in SEV guest."""
    return make_daemon()


class RawClient:
    """Bytes in, parsed lines out: for framing and protocol cases qemu.qmp cannot produce."""

    def __init__(self, path: str, timeout: float = 10):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.greeting = self.recv()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def recv_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def recv(self, events: bool = False) -> dict:
        """The next message; events are skipped unless ``events``."""
        while True:
            msg = json.loads(self.recv_line())
            if events or "event" not in msg:
                return msg

    def cmd(self, name: str, args: dict | None = None, **extra) -> dict:
        msg = {"execute": name, **extra}
        if args is not None:
            msg["arguments"] = args
        self.send(json.dumps(msg))
        return self.recv()

    def negotiate(self) -> None:
        assert self.cmd("qmp_capabilities") == {"return": {}}

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(daemon):
    clients = []

    def connect(negotiate=True, path=None):
        c = RawClient(path or daemon.qmp)
        if negotiate:
            c.negotiate()
        clients.append(c)
        return c

    yield connect
    for c in clients:
        c.close()


def qmp_connect(daemon: Daemon):
    """qemu.qmp's legacy synchronous client, connected and negotiated."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    q = QEMUMonitorProtocol(daemon.qmp)
    q.connect()
    return q


def hmp(q, line: str) -> str:
    """One HMP command through human-monitor-command; the returned text, \\r\\n line ends."""
    return q.cmd_obj({"execute": "human-monitor-command", "arguments": {"command-line": line}})["return"]
