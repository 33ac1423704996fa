"""Scripted monitor tests against sevmon, as QEMU's own tests drive VMs with ``QEMUMachine``.

:class:`SevmonDaemon` starts ``sevmon serve`` with any options (``--attach`` too), in a
private temporary directory, waits until its QMP socket answers, and hands out synchronous
QMP handles (:class:`QMPHandle`: ``cmd``, ``hmp``, ``events``) built on ``qemu.qmp``'s
legacy client. Leaving the ``with`` block stops the daemon and removes the directory::

    from sevmon.testing import SevmonDaemon

    with SevmonDaemon("--paging", "pae") as d:
        d.qmp.cmd("stop")
        assert d.qmp.events("STOP")
        print(d.qmp.hmp("info mem"))

The pytest plugin (:mod:`sevmon.testing.pytest_plugin`, registered through the ``pytest11``
entry point, so installing sevmon is enough) offers the fixtures ``sevmon_daemon`` (a
factory) and ``sevmon_qmp`` (a negotiated handle on a default built-in guest).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol

__all__ = ["DaemonError", "ExecuteError", "HMPSocket", "QMPHandle", "SevmonDaemon"]

START_TIMEOUT = 60.0  # seconds for ``sevmon serve`` to build its guest and listen
STOP_TIMEOUT = 15.0   # seconds after SIGTERM before SIGKILL


class DaemonError(Exception):
    """The daemon did not start (or died): ``str()`` says why, with what it logged."""


class QMPHandle:
    """A negotiated, synchronous QMP connection to the daemon.

    ``cmd`` returns the command's ``return`` value and raises ``qemu.qmp.ExecuteError``
    on an error reply (``e.error_class``, ``str(e)`` is QEMU's ``desc``). Keyword
    arguments spell QMP's hyphens as underscores (``command_line=``), as QEMUMachine's do.
    """

    def __init__(self, path: str, timeout: float | None = 60.0):
        self.path = path
        self._qmp = QEMUMonitorProtocol(path)
        self._qmp.connect(negotiate=True)
        self._qmp.settimeout(timeout)
        self._events: list[dict] = []

    def cmd(self, name: str, arguments: dict | None = None, **kwargs):
        args = dict(arguments or {})
        args.update({k.replace("_", "-"): v for k, v in kwargs.items()})
        return self._qmp.cmd(name, **args)

    def hmp(self, line: str, cpu_index: int | None = None) -> str:
        """One HMP line through ``human-monitor-command``; its text, ``\\r\\n`` line ends."""
        args: dict = {"command-line": line}
        if cpu_index is not None:
            args["cpu-index"] = cpu_index
        return self.cmd("human-monitor-command", args)

    def events(self, name: str | None = None, wait: float = 0.0) -> list[dict]:
        """The events received so far (only those called ``name``, if given), removed from
        the queue; with ``wait``, wait up to that many seconds for the first one."""
        deadline = time.monotonic() + wait
        while True:
            self._events += self._qmp.get_events(wait=False)
            got = [e for e in self._events if name is None or e["event"] == name]
            left = deadline - time.monotonic()
            if got or left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                self._events += self._qmp.get_events(wait=min(left, 0.5))
        self._events = [e for e in self._events if not (name is None or e["event"] == name)]
        return got

    def event_wait(self, name: str, timeout: float = 30.0) -> dict:
        """The next event called ``name`` (waiting up to ``timeout`` s; TimeoutError otherwise)."""
        got = self.events(name, wait=timeout)
        if not got:
            raise TimeoutError(f"no {name} event within {timeout:g} s")
        self._events[:0] = got[1:]
        return got[0]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._qmp.close()

    def __enter__(self) -> QMPHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HMPSocket:
    """A client of an HMP socket (``serve --hmp PATH``, QEMU's ``-monitor unix:PATH,server``), as a person at
    ``socat`` sees it: ``banner`` is what came before the first prompt, ``run(line)`` what a line printed before
    the prompt came back (``\\r\\n`` line ends, the prompt left out). A closed socket raises ``EOFError``."""

    PROMPT = b"(qemu) "

    def __init__(self, path: str, timeout: float | None = 60.0):
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.settimeout(timeout)
        self._sock.connect(path)
        self._buf = b""
        self.banner = self.until_prompt()

    def until_prompt(self) -> str:
        """What the monitor printed up to its next prompt."""
        while not self._buf.endswith(self.PROMPT):
            chunk = self._sock.recv(65536)
            if not chunk:
                raise EOFError(f"the HMP socket closed after {self._buf[-200:]!r}")
            self._buf += chunk
        out, self._buf = self._buf[:-len(self.PROMPT)], b""
        return out.decode()

    def run(self, line: str) -> str:
        self.send(line.encode() + b"\n")
        return self.until_prompt()

    def send(self, data: bytes) -> None:
        """Raw bytes, e.g. half a line (read what follows with :meth:`until_prompt`)."""
        self._sock.sendall(data)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> HMPSocket:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SevmonDaemon:
    """``sevmon serve`` with ``args`` (any of its options), in a private temporary directory.

    ``hmp=True`` also opens an HMP socket (``hmp_path``); ``attach=TARGET`` passes
    ``--attach TARGET``. ``qmp`` is a handle opened at start; ``connect()`` opens more.
    ``python`` runs the daemon (default: this interpreter, so it imports this sevmon).
    """

    def __init__(self, *args: str, hmp: bool = False, attach: str | None = None, python: str | None = None,
                 start_timeout: float = START_TIMEOUT, keep_dir: bool = False):
        self.args = [str(a) for a in args] + (["--attach", str(attach)] if attach is not None else [])
        self.want_hmp = hmp
        self.python = python or sys.executable
        self.start_timeout = start_timeout
        self.keep_dir = keep_dir
        self.dir: str | None = None
        self.proc: subprocess.Popen | None = None
        self.qmp: QMPHandle | None = None
        self._handles: list[QMPHandle] = []
        self._log = None

    @property
    def qmp_path(self) -> str:
        return os.path.join(self.dir, "qmp.sock")

    @property
    def hmp_path(self) -> str | None:
        return os.path.join(self.dir, "hmp.sock") if self.want_hmp else None

    def argv(self) -> list[str]:
        """The command line the daemon runs with (valid once the directory exists)."""
        argv = [self.python, "-m", "sevmon", "serve", "--qmp", self.qmp_path]
        if self.want_hmp:
            argv += ["--hmp", self.hmp_path]
        return argv + self.args

    def start(self) -> SevmonDaemon:
        self.dir = tempfile.mkdtemp(prefix="sevmon-test-")  # mode 0700: the sockets stay private
        self._log = open(os.path.join(self.dir, "daemon.log"), "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv(), cwd=self.dir, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        try:
            self._wait_listening()
            self.qmp = self.connect()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        paths = [p for p in (self.qmp_path, self.hmp_path) if p]
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise DaemonError(f"sevmon serve exited with status {rc}: {self.log().strip()}")
            if all(_answers(p) for p in paths):
                return
            if time.monotonic() > deadline:
                raise DaemonError(f"sevmon serve did not listen within {self.start_timeout:g} s: "
                                  f"{self.log().strip()}")
            time.sleep(0.05)

    def connect(self, timeout: float | None = 60.0) -> QMPHandle:
        """One more negotiated QMP handle (closed by ``stop``)."""
        handle = QMPHandle(self.qmp_path, timeout)
        self._handles.append(handle)
        return handle

    def log(self) -> str:
        """What the daemon wrote to stdout/stderr so far."""
        if self._log is None:
            return ""
        self._log.flush()
        with open(self._log.name) as f:
            return f.read()

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Close the handles, stop the daemon (``sig``, then SIGKILL), remove the directory."""
        for h in self._handles:
            h.close()
        self._handles.clear()
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            rc = self.proc.returncode
        if self._log is not None:
            self._log.close()
        if self.dir is not None and not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        return rc

    def __enter__(self) -> SevmonDaemon:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _answers(path: str) -> bool:
    if not os.path.exists(path):
        return False
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
        return True
    except OSError:
        return False
