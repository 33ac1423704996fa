"""The daemon's life: one log line when listening, 0600 sockets, removal on signals,
refusal when a live server holds the path, replacement of a stale socket file."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys

import pytest

from tests.conftest import RawClient


def test_sockets_are_0600_and_removed_on_sigterm(make_daemon):
    d = make_daemon()
    for path in (d.qmp, d.hmp):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert d.stop(signal.SIGTERM) == 0
    assert not os.path.exists(d.qmp) and not os.path.exists(d.hmp)
    assert d.output().count("listening") == 1


def test_sigint_sends_shutdown_and_removes_sockets(make_daemon):
    d = make_daemon()
    c = RawClient(d.qmp)
    c.negotiate()
    d.proc.send_signal(signal.SIGINT)
    ev = c.recv(events=True)
    assert ev["event"] == "SHUTDOWN" and ev["data"] == {"guest": False, "reason": "host-signal"}
    assert d.proc.wait(10) == 0
    assert not os.path.exists(d.qmp)
    # Ctrl-C is answered: the daemon says what it does
    assert d.output().splitlines()[-1] == "sevmon: SIGINT: stopping: clients get SHUTDOWN, the sockets are removed"


def test_refuses_a_path_held_by_a_live_server(make_daemon, tmp_path):
    d = make_daemon()
    out = subprocess.run([sys.executable, "-m", "sevmon", "serve", "--qmp", d.qmp], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 1
    assert "another server is already listening there" in out.stderr
    assert "Traceback" not in out.stderr
    RawClient(d.qmp).negotiate()  # the first one is unharmed


def test_stale_socket_is_replaced(make_daemon, tmp_path):
    stale = tmp_path / "d0"
    stale.mkdir()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale / "qmp.sock"))
    s.close()  # bound, never listened: a dead server's leftover
    d = make_daemon(subdir="d0")
    RawClient(d.qmp).negotiate()


def test_refuses_a_path_that_is_not_a_socket(tmp_path):
    f = tmp_path / "important.txt"
    f.write_text("keep me")
    out = subprocess.run([sys.executable, "-m", "sevmon", "serve", "--qmp", str(f)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 1 and "is not a socket" in out.stderr
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("entry", [["-m", "sevmon"], ["-c", "import sevmon.cli as c; c.main()"]])
def test_help_runs(entry):
    out = subprocess.run([sys.executable, *entry, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "serve" in out.stdout
