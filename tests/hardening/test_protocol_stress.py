"""What a monitor must survive at the protocol level: deep pipelines read late, crowds of
clients (negotiated or not), byte-by-byte and interleaved writes, event fan-out, the
JSON limits, and every command that takes no argument answering without an internal
error (QMP and HMP)."""

from __future__ import annotations

import select
import socket
import time

import pytest

from tests.hardening.support import (
    NEGOTIATION_DESC,
    CheckedClient,
    Watcher,
    alive,
    fd_count,
    log_mark,
    no_tracebacks,
    split_lines,
    wait_fds_at_most,
)

GENERIC, CNF = "GenericError", "CommandNotFound"


def err(desc, cls=GENERIC, **rid):
    return {"error": {"class": cls, "desc": desc}, **rid}


def settle_fds(pid: int) -> int:
    prev, n = -1, fd_count(pid)
    while n != prev:
        time.sleep(0.2)
        prev, n = n, fd_count(pid)
    return n


# --------------------------------------------------------------------------- pipelines

def _request(i: int, kvm: dict) -> tuple[bytes, dict]:
    kind = i % 7
    if kind == 0:
        return b'{"execute":"query-kvm","id":%d}' % i, {"return": kvm, "id": i}
    if kind == 1:
        return b'{"execute":"no-such","id":%d}' % i, err("The command no-such has not been found", CNF, id=i)
    if kind == 2:
        return (b'{"execute":"query-status","arguments":{"x":1},"id":%d}' % i,
                err("Parameter 'x' is unexpected", id=i))
    if kind == 3:
        return b"[%d]" % i, err("QMP input must be a JSON object")
    if kind == 4:
        return b'{"execute":"query-kvm","id":%d,"id":0}' % i, err("JSON parse error, duplicate key")
    if kind == 5:
        return (b'{"execute":"human-monitor-command","arguments":{"command-line":"help stop"},"id":%d}' % i,
                {"return": "stop|s  -- stop emulation\r\n", "id": i})
    return b'{"exec-oob":"query-status","id":%d}' % i, err("QMP input member 'exec-oob' is unexpected", id=i)


def test_ten_thousand_pipelined_commands_read_late_come_back_in_order(daemon):
    w = Watcher(daemon.qmp)
    c = CheckedClient(daemon.qmp, timeout=60)
    c.negotiate()
    reqs = [_request(i, w.kvm) for i in range(10_000)]
    c.send(b"\n".join(r for r, _ in reqs))  # no reading meanwhile
    assert w.ping() < 2  # others are served while this pipeline is worked through
    time.sleep(0.5)
    got = [c.recv() for _ in reqs]
    assert got == [e for _, e in reqs]
    c.send(b'{"execute":"query-kvm","id":"end"}')
    assert c.recv() == {"return": w.kvm, "id": "end"}


def test_byte_by_byte_writes(daemon):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(daemon.qmp)
    data = b'{"execute":"qmp_capabilities"}' + b"".join(
        b'{ "execute" : "query-kvm" ,\r\n "id" : [%d, "\\u00e9"] }' % i for i in range(20))
    for i in range(len(data)):
        s.sendall(data[i:i + 1])
    s.shutdown(socket.SHUT_WR)
    buf = b""
    while True:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        buf += chunk
    msgs = split_lines(buf)
    assert "QMP" in msgs[0] and msgs[1] == {"return": {}}
    assert [m["id"] for m in msgs[2:]] == [[i, "\u00e9"] for i in range(20)]


def test_interleaved_partial_writes_from_many_clients_never_mix(daemon):
    clients = [CheckedClient(daemon.qmp) for _ in range(50)]
    for c in clients:
        c.negotiate()
    streams = [b"".join(b'{"execute":"query-kvm","id":[%d,%d]}' % (k, n) for n in range(10)) for k in range(50)]
    pos = [0] * 50
    step = 7
    while any(p < len(s) for p, s in zip(pos, streams, strict=True)):
        for k, c in enumerate(clients):  # 7 bytes from each client in turn
            if pos[k] < len(streams[k]):
                c.send(streams[k][pos[k]:pos[k] + step])
                pos[k] += step
    for k, c in enumerate(clients):
        assert [c.recv()["id"] for _ in range(10)] == [[k, n] for n in range(10)]
        c.close()


# --------------------------------------------------------------------------- crowds

def test_a_hundred_clients_that_never_negotiate(daemon):
    pid = daemon.proc.pid
    mark = log_mark(daemon)
    base = settle_fds(pid)
    socks = []
    for _ in range(100):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(daemon.qmp)
        socks.append(s)
    bufs = {}
    for s in socks:
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(4096)
            assert chunk
            data += chunk
        assert "QMP" in split_lines(data)[0]
        bufs[s] = b""
    # a negotiated client changes the run state: only it sees the events
    a = CheckedClient(daemon.qmp)
    a.negotiate()
    assert a.cmd("stop") == {"return": {}}
    assert a.cmd("cont") == {"return": {}}
    assert a.cmd("query-status")["return"]["running"] is True
    readable, _, _ = select.select(socks, [], [], 0.5)
    assert readable == [], "an un-negotiated client received something"
    for k, s in enumerate(socks):
        s.sendall(b'{"execute":"query-status","id":%d}' % k)
    for k, s in enumerate(socks):
        data = b""
        while not data.endswith(b"\r\n"):
            data += s.recv(4096)
        assert split_lines(data) == [err(NEGOTIATION_DESC, CNF, id=k)]
    for s in socks:
        s.close()
    a.close()
    assert alive(daemon)
    assert wait_fds_at_most(pid, base) <= base
    no_tracebacks(daemon, since=mark)


def test_events_reach_every_negotiated_client_once_in_order(daemon):
    listeners = [CheckedClient(daemon.qmp) for _ in range(30)]
    for c in listeners:
        c.negotiate()
    shy = [CheckedClient(daemon.qmp) for _ in range(10)]
    actor = CheckedClient(daemon.qmp)
    actor.negotiate()
    for _ in range(5):
        assert actor.cmd("stop") == {"return": {}}
        assert actor.cmd("cont") == {"return": {}}
    actor.send(b'{"execute":"query-kvm","id":"fence"}')
    assert actor.recv()["id"] == "fence"
    for c in listeners:
        evs = [c.recv(events=True) for _ in range(10)]
        assert [e["event"] for e in evs] == ["STOP", "RESUME"] * 5
        stamps = [(e["timestamp"]["seconds"], e["timestamp"]["microseconds"]) for e in evs]
        assert stamps == sorted(stamps)
        c.send(b'{"execute":"query-kvm","id":"after"}')
        assert c.recv(events=True)["id"] == "after"  # nothing else was queued
    for c in shy:
        readable, _, _ = select.select([c.sock], [], [], 0)
        assert readable == [] and c.buf == b""
    for c in [*listeners, *shy, actor]:
        c.close()


# --------------------------------------------------------------------------- JSON limits

def test_token_count_limit_then_resync(daemon):
    """json-streamer.c: the (2 Mi + 1)-th token of a message is refused with one error."""
    w = Watcher(daemon.qmp)
    c = CheckedClient(daemon.qmp, timeout=120)
    c.negotiate()
    c.send(b"[" + b"1," * (1 << 20))  # 1 + 2 Mi tokens: the last ',' is one too many
    c.send(b'\x01{"execute":"query-kvm","id":"after"}')
    assert c.recv() == err("JSON token count limit exceeded")
    assert c.recv() == err("JSON parse error, stray '\x01'")
    assert c.recv() == {"return": w.kvm, "id": "after"}


def test_object_nesting_limit_then_resync(daemon):
    w = Watcher(daemon.qmp)
    c = CheckedClient(daemon.qmp)
    c.negotiate()
    c.send(b'{"a":' * 1024 + b'{')  # depth 1025
    c.send(b'\x01{"execute":"query-kvm","id":"after"}')
    assert c.recv() == err("JSON nesting depth limit exceeded")
    assert c.recv() == err("JSON parse error, stray '\x01'")
    assert c.recv() == {"return": w.kvm, "id": "after"}


def test_deepest_legal_id_is_echoed(daemon):
    """1023 lists inside the request object: depth 1024, QEMU's limit, still accepted."""
    c = CheckedClient(daemon.qmp)
    c.negotiate()
    nested = b"[" * 1023 + b"0" + b"]" * 1023
    c.sock.sendall(b'{"execute":"query-kvm","id":' + nested + b"}")
    data = b""
    while not data.endswith(b"\r\n"):  # (too deep for Python's json module: bytes only)
        chunk = c.sock.recv(1 << 16)
        assert chunk
        data += chunk
    assert data.count(b"\r\n") == 1 and data.isascii()
    assert data.startswith(b'{"return": {') and data.endswith(b', "id": ' + nested + b"}\r\n")


# --------------------------------------------------------------------------- command sweep

def _argumentless_commands(c: CheckedClient) -> list[str]:
    schema = c.cmd("query-qmp-schema")["return"]
    types = {e["name"]: e for e in schema}
    out = []
    for e in schema:
        if e["meta-type"] != "command" or e["name"] in ("quit", "qmp_capabilities"):
            continue
        members = types[e["arg-type"]].get("members", [])
        if all("default" in m for m in members):  # introspection marks optional members
            out.append(e["name"])
    return out


def test_every_argumentless_qmp_command_answers_without_internal_error(daemon):
    """Whatever the machine's state, a command a user may type with no argument gets a
    return or a proper QEMU error, never 'internal error' (a Python exception)."""
    mark = log_mark(daemon)
    c = CheckedClient(daemon.qmp)
    c.negotiate()
    names = _argumentless_commands(c)
    assert "query-status" in names and "query-kvm" in names
    bad = {}
    for state in ("stop", "cont", "system_reset"):
        c.cmd(state)
        for name in names:
            if name in ("stop", "cont", "system_reset", "system_powerdown"):
                continue
            r = c.cmd(name, id=name)
            assert r.get("id") == name, r
            if "error" in r and "internal error" in r["error"]["desc"]:
                bad[name] = r["error"]["desc"]
    assert bad == {}, f"internal errors: {bad}"
    no_tracebacks(daemon, since=mark)


def test_every_argumentless_hmp_command_answers_without_internal_error(daemon):
    mark = log_mark(daemon)
    c = CheckedClient(daemon.qmp)
    c.negotiate()

    def hmp(line: str) -> str:
        r = c.cmd("human-monitor-command", {"command-line": line})
        assert set(r) == {"return"}, r
        return r["return"]

    lines = []
    for text in (hmp("help"), hmp("help info")):
        for row in text.split("\r\n"):
            if not row or row[0].isspace():
                continue
            head, _, _ = row.partition(" -- ")
            words = head.split()
            if words[0] == "info" and len(words) >= 2:
                lines += [f"info {n}" for n in words[1].split("|")]
            elif len(words) == 1 and words[0] not in ("quit|q",):
                lines += [n for n in words[0].split("|") if n not in ("q", "quit")]
    assert "info status" in lines and "stop" in lines
    bad = {line: out for line in lines for out in [hmp(line)] if "internal error" in out}
    assert bad == {}, bad
    no_tracebacks(daemon, since=mark)


@pytest.mark.slow
def test_a_thousand_concurrent_clients(daemon):
    pid = daemon.proc.pid
    base = settle_fds(pid)
    clients = []
    for _ in range(1000):
        c = CheckedClient(daemon.qmp)
        c.send(b'{"execute":"qmp_capabilities"}{"execute":"query-kvm","id":"x"}')
        clients.append(c)
    for c in clients:
        assert c.recv() == {"return": {}}
        assert c.recv()["id"] == "x"
    for c in clients:
        c.close()
    assert wait_fds_at_most(pid, base) <= base
