"""The gdb TCP stub serves only the daemon's own user and root (issue 19, finding 3): a port on 127.0.0.1 is open
to every local user, and ``monitor`` would give them the whole HMP table as the daemon's user. Real gdb, run as a
second uid with ``setpriv``; the refusal is one log line in the daemon's output."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from sevmon.gdb.peer import tcp_peer_uid
from tests.gdb.gdb_support import need_gdb, run_gdb

NOBODY = 65534


def _setpriv() -> list[str]:
    """A gdb command line as uid/gid 65534; it needs setpriv and root (CI has both: a missing one fails there)."""
    path = shutil.which("setpriv")
    problem = ("setpriv is not installed (util-linux)" if path is None else
               "switching to a second uid needs root" if os.geteuid() != 0 else None)
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    return [path, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def _port(d) -> str:
    m = re.search(r"gdb stub listening on tcp:127\.0\.0\.1:(\d+)", d.output())
    assert m, d.output()
    return m.group(1)


def test_another_user_is_refused_with_one_log_line_and_the_owner_still_served(make_daemon):
    gdb = need_gdb()
    prefix = _setpriv()
    d = make_daemon("--gdb", "tcp::0", "--no-workload")
    port = _port(d)
    out = subprocess.run(prefix + [gdb, "-batch", "-nx", "-ex", "set architecture i386:x86-64",
                                   "-ex", f"target remote 127.0.0.1:{port}", "-ex", "x/2gx 0x400000",
                                   "-ex", "monitor info mem"],
                         capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"], "HOME": "/"})
    text = out.stdout + out.stderr
    assert "0x6761702072657375" not in text and "ffff888000000000" not in text   # no plaintext, no monitor
    assert "Remote connection closed" in text or "Connection reset" in text or "Remote communication error" in text
    log = d.output()
    refusals = [ln for ln in log.splitlines() if "gdb stub: refused a connection" in ln]
    assert len(refusals) == 1, log
    assert f"(uid {NOBODY})" in refusals[0] and f"only uid {os.geteuid()} and root may debug" in refusals[0]
    # the daemon's own user (here root) is served as before
    assert "0x400000:\t0x6761702072657375\t0x0000000000302065" in run_gdb(f"127.0.0.1:{port}", "x/2gx 0x400000")


def test_the_peer_lookup_finds_the_owner_of_a_loopback_connection():
    """Both ends of a real loopback connection are listed with this process's uid; an unknown peer is None."""
    import socket

    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            srv = socket.socket(family)
            srv.bind((host, 0))
        except OSError:
            continue   # no IPv6 on this host
        srv.listen(1)
        cli = socket.create_connection(srv.getsockname()[:2])
        conn, _ = srv.accept()
        assert tcp_peer_uid(conn.getsockname(), conn.getpeername()) == os.geteuid()
        assert tcp_peer_uid(conn.getsockname(), (host, 1)) is None
        for s in (conn, cli, srv):
            s.close()
