"""QMP on the wire: greeting, negotiation, envelope and argument errors, ids, events, framing.

Every case talks to a real daemon over a real UNIX socket with raw bytes and compares
parsed JSON against QEMU 7.2's replies (the transcripts in tests/data/*/qmp-transcript.json).
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.conftest import RawClient

GENERIC, CNF = "GenericError", "CommandNotFound"


def err(desc, cls=GENERIC, **rid):
    return {"error": {"class": cls, "desc": desc}, **rid}


def test_greeting_shape_and_crlf(daemon):
    s = socket.socket(socket.AF_UNIX)
    s.connect(daemon.qmp)
    s.settimeout(5)
    data = b""
    while not data.endswith(b"\r\n"):
        data += s.recv(4096)
    greeting = json.loads(data)
    assert greeting["QMP"]["capabilities"] == ["oob"]
    assert greeting["QMP"]["version"]["qemu"] == {"major": 7, "minor": 2, "micro": 22}
    assert greeting["QMP"]["version"]["package"].startswith("sevmon ")
    assert data.count(b"\r\n") == 1 and data.isascii()
    s.close()


def test_negotiation_mode(raw):
    c = raw(negotiate=False)
    assert c.cmd("query-status", id=1) == err("Expecting capabilities negotiation with 'qmp_capabilities'", CNF, id=1)
    assert c.cmd("nonexistent") == err("Expecting capabilities negotiation with 'qmp_capabilities'", CNF)
    assert c.cmd("qmp_capabilities", {"enable": ["bogus"]}) == err("Parameter 'null' does not accept value 'bogus'")
    assert c.cmd("qmp_capabilities", {"enable": "oob"}) == err("Invalid parameter type for 'enable', expected: array")
    assert c.cmd("qmp_capabilities", {"foo": 1}) == err("Parameter 'foo' is unexpected")
    # still negotiating after those failures
    assert c.cmd("query-kvm")["error"]["class"] == CNF
    assert c.cmd("qmp_capabilities", {"enable": []}) == {"return": {}}
    assert c.cmd("qmp_capabilities", id=7) == err(
        "Capabilities negotiation is already complete, command ignored", CNF, id=7)


def test_qemu_qmp_style_negotiation_without_newline(daemon):
    c = RawClient(daemon.qmp)
    c.send(b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}')
    assert c.recv() == {"return": {}}
    c.send(b'{"execute":"query-status","id":"__qmp#00000"}')
    r = c.recv()
    assert r["id"] == "__qmp#00000" and set(r["return"]) == {"running", "status", "singlestep"}


@pytest.mark.parametrize("rid", [None, True, 1.5, [1, "a"], {"a": [1, "x", None]}, "s", 0, -7])
def test_id_of_any_json_type_is_echoed(raw, rid):
    c = raw()
    r = c.cmd("query-kvm", id=rid)
    assert r["id"] == rid and set(r["return"]) == {"enabled", "present"}


def test_big_integer_id_is_a_double(raw):
    c = raw()
    c.send('{"execute":"query-kvm","id":12345678901234567890123}')
    assert c.recv()["id"] == 1.2345678901234568e+22


@pytest.mark.parametrize("request_, reply", [
    ("[1,2]", err("QMP input must be a JSON object")),
    ('"str"', err("QMP input must be a JSON object")),
    ("123", err("QMP input must be a JSON object")),
    ("null", err("QMP input must be a JSON object")),
    ('{"id":1}', err("QMP input lacks member 'execute'", id=1)),
    ("{}", err("QMP input lacks member 'execute'")),
    ('{"arguments":{}}', err("QMP input lacks member 'execute'")),
    ('{"execute":"query-status","foo":1}', err("QMP input member 'foo' is unexpected")),
    ('{"execute":1}', err("QMP input member 'execute' must be a string")),
    ('{"execute":"stop","arguments":[]}', err("QMP input member 'arguments' must be an object")),
    ('{"execute":"no-such-cmd","id":"x"}', err("The command no-such-cmd has not been found", CNF, id="x")),
    ('{"exec-oob":"query-status","id":1}', err("QMP input member 'exec-oob' is unexpected", id=1)),
    ('{"execute":"query-status","id":"a","id":"b"}', err("JSON parse error, duplicate key")),
    ('{"execute": }', err("JSON parse error, expecting value")),
    ("{bad}", err("JSON parse error, invalid keyword 'bad'")),
])
def test_envelope_errors(raw, request_, reply):
    c = raw()
    c.send(request_ + "\n")
    assert c.recv() == reply


@pytest.mark.parametrize("args, desc", [
    ({"val": 0, "size": 16}, "Parameter 'filename' is missing"),
    ({"val": 0, "size": 16, "filename": "/var/tmp/x", "bogus": 1}, "Parameter 'bogus' is unexpected"),
    ({"val": "0", "size": 16, "filename": "/dev/null"}, "Invalid parameter type for 'val', expected: integer"),
    ({"val": 1.5, "size": 16, "filename": "/dev/null"}, "Invalid parameter type for 'val', expected: integer"),
    ({"val": 0, "size": "16", "filename": "/dev/null"}, "Invalid parameter type for 'size', expected: integer"),
])
def test_argument_errors(raw, args, desc):
    assert raw().cmd("memsave", args) == err(desc)


def test_argument_errors_other_commands(raw):
    c = raw()
    assert c.cmd("query-status", {"x": 1}) == err("Parameter 'x' is unexpected")
    assert c.cmd("human-monitor-command", {"command-line": 1}) == err(
        "Invalid parameter type for 'command-line', expected: string")
    assert c.cmd("human-monitor-command", {"command-line": "info version", "cpu-index": "0"}) == err(
        "Invalid parameter type for 'cpu-index', expected: integer")
    assert c.cmd("sev-inject-launch-secret", {"packet-header": "a", "secret": "b", "gpa": "x"}) == err(
        "Parameter 'gpa' expects uint64")
    assert c.cmd("human-monitor-command", {"command-line": "info version", "cpu-index": 99}) == err(
        "Parameter 'cpu-index' expects a CPU number")
    assert c.cmd("query-status", {}) ["return"]["status"]  # empty arguments == absent


def test_oob_rules(daemon):
    c = RawClient(daemon.qmp)
    assert c.cmd("qmp_capabilities", {"enable": ["oob"]}) == {"return": {}}
    c.send('{"exec-oob":"query-status","id":1}')
    assert c.recv() == err("The command query-status does not support OOB", id=1)
    # QEMU 7.2 checks members in its QDict's hash order (exec-oob first), whatever the input order
    for clash in ('{"execute":"x","exec-oob":"y"}', '{"exec-oob":"y","execute":"x"}'):
        c.send(clash)
        assert c.recv() == err("QMP input member 'execute' clashes with 'exec-oob'")
    # ... and the first wrong member in that order is the one reported (QEMU 7.2's answers)
    c.send('{"control":1,"execute":1}')
    assert c.recv() == err("QMP input member 'control' is unexpected")
    c.send('{"zz":1,"execute":1}')
    assert c.recv() == err("QMP input member 'execute' must be a string")
    c.send('{"arguments":1,"zz":2,"execute":"x"}')
    assert c.recv() == err("QMP input member 'zz' is unexpected")


def test_parse_error_recovery(raw):
    c = raw()
    c.send(b'{"execute":"query-status"\x01 {"execute":"query-kvm"}')
    assert c.recv() == err("JSON parse error, stray '\x01'")
    assert "enabled" in c.recv()["return"]
    c.send(b'\xff{"execute":"query-kvm"}')
    assert c.recv() == err("JSON parse error, stray '\ufffd'")
    assert "enabled" in c.recv()["return"]


def test_output_is_ascii_with_qemu_escapes(raw):
    c = raw()
    c.send(b'{"execute":"query-kvm","id":"\xc3\xa9\\u0001\xf0\x9f\x98\x80"}')
    line = c.recv_line()
    assert b'"\\u00E9\\u0001\\uD83D\\uDE00"' in line
    assert json.loads(line)["id"] == "\u00e9\u0001\U0001F600"


def test_pipelining_and_split_objects(raw):
    c = raw()
    c.send('{"execute":"query-status","id":1}{"execute":"query-kvm","id":2}')
    assert c.recv()["id"] == 1 and c.recv()["id"] == 2
    c.send('{"execute":"query-sta')
    time.sleep(0.2)
    c.send('tus","id":3')
    time.sleep(0.2)
    c.send("}\n")
    assert c.recv()["id"] == 3
    c.send("\r\n \t\n")  # whitespace gets no reply
    c.send('{"execute":"query-kvm","id":4}')
    assert c.recv()["id"] == 4


def test_two_mib_string_and_deep_nesting(raw):
    c = raw()
    big = "a" * (2 << 20)
    c.send(json.dumps({"execute": "query-kvm", "id": big}))
    assert c.recv()["id"] == big
    c.send("[" * 2000)
    assert c.recv() == err("JSON nesting depth limit exceeded")
    # As in QEMU, the brackets after the limit open a new message; a control character
    # (the QMP spec's way to resynchronise) ends it with one error, then all is well.
    c.send(b"\x01")
    assert c.recv() == err("JSON parse error, stray '\x01'")
    c.send('{"execute":"query-kvm","id":5}')
    assert c.recv()["id"] == 5


def test_events_and_state(make_daemon):
    d = make_daemon()
    a, b, un = RawClient(d.qmp), RawClient(d.qmp), RawClient(d.qmp)
    a.negotiate()
    b.negotiate()
    assert a.cmd("query-status")["return"]["running"] is True  # the built-in guest runs
    a.send('{"execute":"stop","id":"s"}')
    ev = a.recv(events=True)
    assert ev["event"] == "STOP" and "data" not in ev
    assert set(ev["timestamp"]) == {"seconds", "microseconds"}
    assert a.recv() == {"return": {}, "id": "s"}
    assert b.recv(events=True)["event"] == "STOP"
    assert a.cmd("query-status")["return"] == {"status": "paused", "singlestep": False, "running": False}
    a.send('{"execute":"stop","id":"s2"}')
    assert a.recv(events=True) == {"return": {}, "id": "s2"}  # no second STOP
    a.send('{"execute":"cont"}')
    assert a.recv(events=True)["event"] == "RESUME"
    assert a.recv(events=True) == {"return": {}}
    a.send('{"execute":"system_reset"}')
    ev = a.recv(events=True)
    assert ev["event"] == "RESET" and ev["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
    a.recv()
    a.send('{"execute":"system_powerdown"}')
    ev = a.recv(events=True)
    assert ev["event"] == "POWERDOWN" and "data" not in ev
    assert a.recv() == {"return": {}}
    # the un-negotiated client saw nothing at all
    un.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        un.recv_line()
    a.send('{"execute":"quit","id":"q"}')
    ev = a.recv(events=True)
    assert ev["event"] == "SHUTDOWN" and ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert a.recv() == {"return": {}, "id": "q"}
    assert d.proc.wait(10) == 0


def test_hmp_over_qmp(raw):
    c = raw()
    hmp = lambda line, **kw: c.cmd("human-monitor-command", {"command-line": line, **kw})  # noqa: E731
    assert hmp("bogus") == {"return": "unknown command: 'bogus'\r\n"}
    assert hmp("info bogus") == {"return": "unknown command: 'info bogus'\r\n"}
    assert hmp("")["return"] == ""
    assert hmp("info version")["return"].startswith("7.2.22sevmon ")
    assert hmp("help stop") == {"return": "stop|s  -- stop emulation\r\n"}
    assert hmp("help nosuch") == {"return": "unknown command: 'nosuch'\r\n"}
    text = hmp("help")["return"]
    assert text.endswith("\r\n")
    for line in text.split("\r\n")[:-1]:
        assert " -- " in line or line.startswith(("\t", "[")), line
    for line in hmp("info")["return"].split("\r\n")[:-1]:
        assert line.startswith("info ") and len(line.split()) >= 2, line
    assert hmp("x /4zg 0") == {"return": "invalid char in format: 'z'\r\nTry \"help x\" for more information\r\n"}


def test_query_qmp_schema_has_qemus_schemainfo_shapes(raw):
    c = raw()
    schema = c.cmd("query-qmp-schema")["return"]
    by_name = {e["name"]: e for e in schema}
    status = by_name["query-status"]
    assert status["meta-type"] == "command" and status["arg-type"] == "0"
    ret = by_name[status["ret-type"]]
    assert ret["meta-type"] == "object"
    assert {m["name"] for m in ret["members"]} == {"running", "singlestep", "status"}
    runstate = by_name[next(m["type"] for m in ret["members"] if m["name"] == "status")]
    assert runstate["meta-type"] == "enum" and "prelaunch" in runstate["values"]
    assert by_name["0"] == {"name": "0", "members": [], "meta-type": "object"}
    assert by_name["int"] == {"name": "int", "json-type": "int", "meta-type": "builtin"}
    hmc = by_name[by_name["human-monitor-command"]["arg-type"]]
    assert {"name": "cpu-index", "type": "int", "default": None} in hmc["members"]
    assert by_name["STOP"]["meta-type"] == "event"
    commands = {e["name"] for e in schema if e["meta-type"] == "command"}
    assert commands == {e["name"] for e in c.cmd("query-commands")["return"]}
