"""Faults a monitor daemon meets in the field: clients that vanish mid-reply, half-open
sockets, connection churn, enormous inputs, clients that never read, SIGTERM under load.

Each test checks what a user sees: the misbehaving client's bytes, a well-behaved client's
replies and latency, the daemon's process (alive, exit status, socket files) and its
resources (/proc/PID/fd, VmRSS).
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import struct
import threading
import time

import pytest

from tests.conftest import RawClient
from tests.hardening.support import (
    PROMPT,
    CheckedClient,
    Watcher,
    alive,
    fd_count,
    log_mark,
    no_tracebacks,
    parse_line,
    recv_until_eof,
    rss_mib,
    split_lines,
    status_kib,
    wait_fds_at_most,
)

MiB = 1 << 20
GENERIC = "GenericError"


def err(desc: str, **rid) -> dict:
    return {"error": {"class": GENERIC, "desc": desc}, **rid}


def warm_baseline(d) -> int:
    """The daemon's fd count once one client came and went (lazy set-up is done)."""
    c = CheckedClient(d.qmp)
    c.negotiate()
    c.cmd("query-qmp-schema")
    c.close()
    prev, n = -1, fd_count(d.proc.pid)
    while n != prev:
        time.sleep(0.2)
        prev, n = n, fd_count(d.proc.pid)
    return n


class Pinger(threading.Thread):
    """Pings with a Watcher every ``period`` s in the background; records the worst latency."""

    def __init__(self, w: Watcher, period: float = 0.02):
        super().__init__(daemon=True)
        self.w, self.period = w, period
        self.stop_ = threading.Event()
        self.worst = 0.0
        self.count = 0
        self.exc: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop_.is_set():
                self.worst = max(self.worst, self.w.ping())
                self.count += 1
                time.sleep(self.period)
        except BaseException as e:
            self.exc = e

    def finish(self) -> None:
        self.stop_.set()
        self.join(30)
        assert not self.is_alive(), "the watcher's ping hangs"
        if self.exc is not None:
            raise self.exc


# --------------------------------------------------------------------------- vanishing clients

def _kill(sock: socket.socket, how: str) -> None:
    if how == "rst":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif how == "shutdown":
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.mark.parametrize("how", ["close", "rst", "shutdown"])
def test_client_gone_mid_reply_leaves_others_unharmed(daemon, how):
    """A client asks for megabytes of replies and disappears while they are being written."""
    pid = daemon.proc.pid
    mark = log_mark(daemon)
    base = warm_baseline(daemon)
    w = Watcher(daemon.qmp)
    for rnd in range(5):
        v = CheckedClient(daemon.qmp)
        v.negotiate()
        v.send(b"".join(b'{"execute":"query-qmp-schema","id":%d}' % i for i in range(300)))
        got = b""
        while len(got) < 256 * 1024:  # the daemon is writing now
            chunk = v.sock.recv(64 * 1024)
            assert chunk
            got += chunk
        ids = [m["id"] for m in split_lines(got[:got.rfind(b"\r\n") + 2])]
        assert ids == list(range(len(ids))), "replies out of order"
        _kill(v.sock, how)
        assert w.ping() < 2, f"round {rnd}: the well-behaved client was held up"
    for _ in range(20):
        w.ping()
    assert alive(daemon)
    w.close()
    n = wait_fds_at_most(pid, base)
    assert n <= base, f"fd leak: {n} open, {base} at the start"
    no_tracebacks(daemon, since=mark)


# --------------------------------------------------------------------------- half-open sockets

def test_shut_wr_after_commands_all_replies_then_eof(daemon):
    c = CheckedClient(daemon.qmp)
    c.send(b'{"execute":"qmp_capabilities"}'
           + b"".join(b'{"execute":"query-kvm","id":%d}' % i for i in range(50))
           + b'{"execute":"query-status","id":"last"}')
    c.sock.shutdown(socket.SHUT_WR)
    msgs = split_lines(c.buf + recv_until_eof(c.sock))
    assert msgs[0] == {"return": {}}
    assert [m["id"] for m in msgs[1:]] == [*range(50), "last"]
    assert all("return" in m for m in msgs)


def test_shut_wr_with_a_partial_message_drops_only_that(daemon):
    """As when QEMU sees the connection close: the half-read message is forgotten, silently."""
    c = CheckedClient(daemon.qmp)
    c.negotiate()
    c.send(b'{"execute":"query-kvm","id":1}{"execute":"query-st')
    c.sock.shutdown(socket.SHUT_WR)
    msgs = split_lines(c.buf + recv_until_eof(c.sock))
    assert [m.get("id") for m in msgs] == [1]


def test_shut_wr_before_the_greeting_is_read(daemon):
    s = socket.socket(socket.AF_UNIX)
    s.connect(daemon.qmp)
    s.shutdown(socket.SHUT_WR)
    msgs = split_lines(recv_until_eof(s))
    assert len(msgs) == 1 and "QMP" in msgs[0]
    s.close()


def test_hmp_line_cut_off_by_eof_is_not_executed(daemon):
    """QEMU's monitor runs a line when its Enter arrives; a connection that ends in the
    middle of a line (a dropped terminal, ``printf stop | nc -U``) runs nothing."""
    w = Watcher(daemon.qmp)
    assert w.c.cmd("query-status")["return"]["running"] is True
    s = socket.socket(socket.AF_UNIX)
    s.connect(daemon.hmp)
    s.sendall(b"stop")
    s.shutdown(socket.SHUT_WR)
    out = recv_until_eof(s)
    time.sleep(0.2)
    assert w.c.cmd("query-status")["return"]["running"] is True, "the unterminated line ran"
    assert out.startswith(b"sevmon ") and out.count(PROMPT) == 1, out
    w.close()


def test_shut_rd_client_does_not_disturb_the_daemon(daemon):
    pid = daemon.proc.pid
    mark = log_mark(daemon)
    base = warm_baseline(daemon)
    w = Watcher(daemon.qmp)
    deaf = []
    for _ in range(5):
        c = RawClient(daemon.qmp)
        c.negotiate()
        c.sock.shutdown(socket.SHUT_RD)
        try:
            for _ in range(20):
                c.send(b'{"execute":"query-qmp-schema"}' * 10)
        except OSError:
            pass  # the daemon may give up on a peer that cannot receive
        deaf.append(c)
        assert w.ping() < 2
    for c in deaf:
        c.close()
    w.ping()
    w.close()
    assert alive(daemon)
    assert wait_fds_at_most(pid, base) <= base
    no_tracebacks(daemon, since=mark)


# --------------------------------------------------------------------------- churn

def test_ten_thousand_connect_disconnect_cycles(daemon):
    pid = daemon.proc.pid
    mark = log_mark(daemon)
    base = warm_baseline(daemon)
    rss0 = rss_mib(pid)
    w = Watcher(daemon.qmp)
    t0 = time.monotonic()
    for i in range(10_000):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(daemon.qmp)
        mode = i % 5
        if mode == 1:  # read the greeting, leave
            assert s.recv(4096).startswith(b'{"QMP"')
        elif mode == 2:  # negotiate, leave
            buf = b""
            s.sendall(b'{"execute":"qmp_capabilities"}')
            while buf.count(b"\r\n") < 2:
                chunk = s.recv(4096)
                assert chunk
                buf += chunk
            assert buf.split(b"\r\n")[1] == b'{"return": {}}'
        elif mode == 3:  # half a command, leave
            s.sendall(b'{"execute":"query-sta')
        elif mode == 4:  # a command whose reply is never read
            s.sendall(b'{"execute":"qmp_capabilities"}{"execute":"query-qmp-schema"}')
        s.close()  # mode 0: straight away
        if i % 1000 == 999:
            assert w.ping() < 2
    elapsed = time.monotonic() - t0
    w.ping()
    w.close()
    assert alive(daemon)
    n = wait_fds_at_most(pid, base)
    assert n <= base, f"fd leak after 10,000 connections: {n} open, {base} at the start"
    grown = rss_mib(pid) - rss0
    assert grown < 100, f"RSS grew by {grown:.0f} MiB over 10,000 connections"
    c = CheckedClient(daemon.qmp)
    c.negotiate()
    assert "return" in c.cmd("query-status")
    c.close()
    no_tracebacks(daemon, since=mark)
    print(f"10,000 cycles in {elapsed:.1f}s; fds {base} -> {n}; RSS {grown:+.1f} MiB")


# --------------------------------------------------------------------------- enormous input

def _kvm(d) -> dict:
    w = Watcher(d.qmp)
    w.close()
    return w.kvm


def _big_send(d, payload: bytes, then: bytes, expect: list, hmp: bool = False):
    """Send ``payload`` + ``then`` on a fresh connection while a watcher pings; return
    the replies (``len(expect)`` of them) and the worst watcher latency."""
    pid = d.proc.pid
    w = Watcher(d.qmp)
    rss0 = rss_mib(pid)
    pinger = Pinger(w)
    pinger.start()
    if hmp:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(120)
        s.connect(d.hmp)
        s.sendall(payload)
        s.sendall(then)
        buf = b""
        while buf.count(PROMPT) < 1 + len(expect):
            chunk = s.recv(1 << 16)
            assert chunk, buf
            buf += chunk
        s.close()
        got = buf
    else:
        c = CheckedClient(d.qmp, timeout=120)
        c.negotiate()
        c.sock.sendall(payload)
        c.sock.sendall(then)
        got = [c.recv() for _ in expect]
        c.close()
    pinger.finish()
    rss1 = rss_mib(pid)
    w.close()
    assert alive(d)
    assert rss1 - rss0 < 300, f"RSS grew from {rss0:.0f} to {rss1:.0f} MiB"
    peak = status_kib(pid, "VmHWM") / 1024  # the process's peak RSS so far
    assert peak - rss0 < 300, f"RSS peaked at {peak:.0f} MiB (from {rss0:.0f})"
    print(f"RSS {rss0:.0f} -> {rss1:.0f} MiB (peak {peak:.0f}); {pinger.count} pings, worst {pinger.worst:.3f}s")
    return got, pinger


def test_64mib_keyword_is_one_token_size_error(daemon):
    mark = log_mark(daemon)
    kvm = _kvm(daemon)
    got, p = _big_send(daemon, b"x" * (64 * MiB) + b"\n", b'{"execute":"query-kvm","id":"after"}', [1, 2])
    assert got == [err("JSON token size limit exceeded"), {"return": kvm, "id": "after"}]
    assert p.count > 0 and p.worst < 2, f"watcher waited {p.worst:.2f}s"
    no_tracebacks(daemon, since=mark)


def test_64mib_of_text_after_a_stray_byte_is_skipped(daemon):
    """After a lexical error QEMU skips everything up to a structural or control byte."""
    mark = log_mark(daemon)
    kvm = _kvm(daemon)
    text = (b"lorem ipsum dolor sit amet \t" * (64 * MiB // 28 + 1))[:64 * MiB]
    got, p = _big_send(daemon, b"\x01" + text + b"\n", b'{"execute":"query-kvm","id":"after"}', [1, 2])
    assert got == [err("JSON parse error, stray '\x01'"), {"return": kvm, "id": "after"}]
    assert p.count > 0 and p.worst < 2, f"watcher waited {p.worst:.2f}s"
    no_tracebacks(daemon, since=mark)


def test_64mib_json_string_hits_the_token_size_limit(daemon):
    """json-lexer.c flushes a token longer than 64 MiB and restarts at IN_START: the
    message is dropped with one error, and the string's closing quote then opens a new
    string (here closed by the extra quote sent after it, a lone string: not an object)."""
    mark = log_mark(daemon)
    kvm = _kvm(daemon)
    head = b'{"execute":"human-monitor-command","arguments":{"command-line":"'
    payload = head + b"a" * (64 * MiB) + b'"}}'
    got, p = _big_send(daemon, payload, b'"{"execute":"query-kvm","id":"after"}', [1, 2, 3])
    assert got == [err("JSON token size limit exceeded"), err("QMP input must be a JSON object"),
                   {"return": kvm, "id": "after"}]
    assert p.count > 0 and p.worst < 2, f"watcher waited {p.worst:.2f}s"
    no_tracebacks(daemon, since=mark)


def test_just_under_the_limit_a_32mib_string_is_accepted(daemon):
    """A big but legal token is parsed and echoed back whole (the id of a request)."""
    c = CheckedClient(daemon.qmp, timeout=120)
    c.negotiate()
    rid = "b" * (32 * MiB)
    c.send(json.dumps({"execute": "query-kvm", "id": rid}))
    r = c.recv()
    assert r["id"] == rid and set(r) == {"return", "id"}
    c.close()


def test_64mib_hmp_line_is_refused_and_the_monitor_goes_on(daemon):
    mark = log_mark(daemon)
    got, p = _big_send(daemon, b"x" * (64 * MiB) + b"\n", b"info status\n", [1, 2], hmp=True)
    banner, refused, status, rest = got.split(PROMPT)
    assert banner.startswith(b"sevmon ")
    assert refused.startswith(b"Error: ") and refused.endswith(b"\r\n") and refused.count(b"\r\n") == 1
    assert status.startswith(b"VM status: ") and rest == b""
    assert p.count > 0 and p.worst < 2, f"watcher waited {p.worst:.2f}s"
    no_tracebacks(daemon, since=mark)


def test_client_that_never_reads_is_cut_off_with_bounded_memory(daemon):
    """Replies pile up for a client that never reads: past the daemon's backlog limit
    (64 MiB) it is disconnected; memory stays bounded and others are not held up."""
    pid = daemon.proc.pid
    mark = log_mark(daemon)
    base = warm_baseline(daemon)
    w = Watcher(daemon.qmp)
    rss0 = rss_mib(pid)
    deaf = socket.socket(socket.AF_UNIX)
    deaf.settimeout(60)
    deaf.connect(daemon.qmp)
    big_id = "z" * MiB
    req = json.dumps({"execute": "query-kvm", "id": big_id}).encode()
    cut = False
    try:
        deaf.sendall(b'{"execute":"qmp_capabilities"}')
        for _ in range(120):  # 120 MiB of replies if nobody stopped it
            deaf.sendall(req)
            assert w.ping() < 2
    except (BrokenPipeError, ConnectionResetError):
        cut = True
    if not cut:  # the daemon may still be working through the requests
        data = b""
        try:
            deaf.settimeout(30)
            time.sleep(2)
            while True:
                chunk = deaf.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            pass
        assert len(data) < 120 * MiB, "the deaf client was never cut off"
    deaf.close()
    assert w.ping() < 2
    rss1 = rss_mib(pid)
    peak = status_kib(pid, "VmHWM") / 1024
    w.close()
    assert alive(daemon)
    assert rss1 - rss0 < 300, f"RSS {rss0:.0f} -> {rss1:.0f} MiB (peak {peak:.0f})"
    assert peak - rss0 < 300, f"RSS peaked at {peak:.0f} MiB (from {rss0:.0f})"
    assert wait_fds_at_most(pid, base) <= base
    no_tracebacks(daemon, since=mark)


def test_hmp_client_that_never_reads_is_throttled(daemon):
    """An HMP client floods commands and reads nothing: the daemon stops reading it
    (back-pressure) instead of buffering without bound; QMP clients are not held up."""
    pid = daemon.proc.pid
    mark = log_mark(daemon)
    base = warm_baseline(daemon)
    w = Watcher(daemon.qmp)
    rss0 = rss_mib(pid)
    s = socket.socket(socket.AF_UNIX)
    s.connect(daemon.hmp)
    s.setblocking(False)
    sent, t_end = 0, time.monotonic() + 3
    while time.monotonic() < t_end:
        try:
            sent += s.send(b"help\n" * 1000)
        except BlockingIOError:
            assert w.ping() < 2
            time.sleep(0.05)
    assert sent < 64 * MiB, "the daemon kept reading a client that reads nothing"
    assert rss_mib(pid) - rss0 < 300
    assert w.ping() < 2
    s.close()
    w.close()
    assert alive(daemon)
    assert wait_fds_at_most(pid, base) <= base
    no_tracebacks(daemon, since=mark)


# --------------------------------------------------------------------------- SIGTERM

class Collector(threading.Thread):
    def __init__(self, sock: socket.socket):
        super().__init__(daemon=True)
        self.sock, self.data, self.started = sock, b"", threading.Event()

    def run(self) -> None:
        self.sock.settimeout(60)
        try:
            while True:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    return
                self.data += chunk
                if self.data.count(b"\r\n") > 20:
                    self.started.set()
        except OSError:
            return


def test_sigterm_with_clients_mid_command(make_daemon):
    d = make_daemon()
    busy = CheckedClient(d.qmp)
    busy.negotiate()
    idle = CheckedClient(d.qmp)
    idle.negotiate()
    shy = CheckedClient(d.qmp)  # never negotiates: sees no event
    h = socket.socket(socket.AF_UNIX)
    h.connect(d.hmp)
    h.sendall(b"info sta")  # half an HMP line
    partial = CheckedClient(d.qmp)
    partial.negotiate()
    partial.send(b'{"execute":"query-st')
    coll = Collector(busy.sock)
    busy.send(b"".join(b'{"execute":"query-qmp-schema","id":%d}' % i for i in range(3000)))
    coll.start()
    assert coll.started.wait(30)
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    assert not os.path.exists(d.qmp) and not os.path.exists(d.hmp)
    coll.join(30)
    # The busy client: replies in order, then the SHUTDOWN event somewhere, then EOF;
    # every message whole (a torn last line would break a reader's JSON decoding).
    msgs = split_lines(busy.buf + coll.data)
    ids = [m["id"] for m in msgs if "id" in m]
    assert ids == list(range(len(ids)))
    assert [m["event"] for m in msgs if "event" in m] == ["SHUTDOWN"]
    idle_msgs = split_lines(idle.buf + recv_until_eof(idle.sock))
    assert [m.get("event") for m in idle_msgs] == ["SHUTDOWN"]
    assert idle_msgs[0]["data"] == {"guest": False, "reason": "host-signal"}
    assert split_lines(shy.buf + recv_until_eof(shy.sock)) == []
    assert split_lines(partial.buf + recv_until_eof(partial.sock))[0]["event"] == "SHUTDOWN"
    recv_until_eof(h)
    # (the log is checked by test_sigterm_while_a_client_never_reads, where the shutdown
    # race that can put a CancelledError traceback there is deterministic)


@pytest.mark.parametrize("monitor", ["qmp", "hmp"])
def test_sigterm_while_a_client_never_reads(make_daemon, monitor):
    """A client that never reads cannot keep the daemon from exiting promptly and
    cleanly (exit status 0, sockets removed, nothing but the usual lines in its log)."""
    d = make_daemon()
    deaf = socket.socket(socket.AF_UNIX)
    deaf.connect(d.qmp if monitor == "qmp" else d.hmp)
    deaf.setblocking(False)
    flood = (b'{"execute":"qmp_capabilities"}' + b'{"execute":"query-qmp-schema"}' * 2000
             if monitor == "qmp" else b"help\n" * 20000)
    try:
        deaf.send(flood)  # as much as the socket takes: the daemon's replies back up
    except BlockingIOError:
        pass
    time.sleep(1)
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    assert time.monotonic() - t0 < 10
    assert not os.path.exists(d.qmp) and not os.path.exists(d.hmp)
    deaf.close()
    no_tracebacks(d)


# --------------------------------------------------------------------------- fd exhaustion

def test_running_out_of_file_descriptors_is_survived(daemon):
    """With its fd limit reached the daemon cannot accept: connected clients are still
    served, waiting ones are greeted as soon as descriptors free up, nothing leaks."""
    pid = daemon.proc.pid
    base = warm_baseline(daemon)
    w = Watcher(daemon.qmp)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    limit = fd_count(pid) + 30
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    try:
        socks = []
        for _ in range(60):  # all fit in the listen backlog; ~30 can be accepted
            s = socket.socket(socket.AF_UNIX)
            s.connect(daemon.qmp)
            socks.append(s)
        greeted = _greeted(socks, 2.0)
        assert 0 < len(greeted) < len(socks)
        assert w.ping() < 2
        for s in greeted:
            s.close()
        rest = [s for s in socks if s not in greeted]
        more = _greeted(rest, 10.0)
        assert len(more) >= min(len(rest), 20), f"{len(more)} of {len(rest)} waiting clients greeted"
        for s in rest:
            s.close()
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    w.ping()
    w.close()
    assert alive(daemon)
    assert wait_fds_at_most(pid, base) <= base
    c = CheckedClient(daemon.qmp, timeout=10)
    c.negotiate()
    assert "return" in c.cmd("query-status")
    c.close()


def _greeted(socks: list[socket.socket], wait: float) -> list[socket.socket]:
    """The sockets on which a whole greeting line arrives within ``wait`` seconds."""
    bufs = {s: b"" for s in socks}
    done: list[socket.socket] = []
    deadline = time.monotonic() + wait
    while len(done) < len(socks) and (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([s for s in socks if s not in done], [], [], left)
        for s in readable:
            chunk = s.recv(4096)
            assert chunk, "closed before the greeting"
            bufs[s] += chunk
            if bufs[s].endswith(b"\r\n"):
                assert "QMP" in split_lines(bufs[s])[0]
                done.append(s)
    return done


def test_parse_line_rejects_python_only_literals():
    """The checker itself: QEMU writes inf/nan; NaN/Infinity would be a foreign dialect."""
    assert parse_line(b'{"return": {}, "id": inf}')["id"] == float("inf")
    with pytest.raises(AssertionError):
        parse_line(b'{"return": {}, "id": NaN}')
    with pytest.raises(AssertionError):
        parse_line('{"return": "\u00e9"}'.encode())
