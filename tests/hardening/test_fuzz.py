"""Fuzzing one long-lived daemon: QMP byte streams (random, and mutated from QEMU's own
transcripts), random HMP lines through ``human-monitor-command`` and the HMP socket.

After every case the daemon must be alive, the fuzzed connection must resynchronise by
QEMU's own rule (a control character ends whatever the lexer was in the middle of with
exactly one ``stray`` error; the next object is then parsed normally), every line it sent
must be a well-formed QMP message, and a well-behaved client that stayed connected the
whole time must still get exact replies.

Hypothesis runs with ``database=None`` (nothing written outside this directory) and a
bounded number of examples; the ``*_soak`` variants run many more with ``--run-slow``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from sevmon.qmp.json_stream import JSONStreamParser
from tests.hardening.support import (
    NEGOTIATION_DESC,
    PROMPT,
    CheckedClient,
    Watcher,
    alive,
    log_mark,
    no_tracebacks,
    transcript_entries,
    transcript_sends,
)

NONCE = uuid.uuid4().hex
FAST, SOAK = 300, 5000


def fuzz_settings(n: int):
    # No shrinking in the quick runs: a failure reports the generated case at once
    # (shrinking multi-megabyte streams can take minutes); the soaks do shrink.
    phases = [Phase.explicit, Phase.generate] if n <= FAST else list(Phase)
    return settings(max_examples=n, deadline=None, database=None, phases=phases,
                    suppress_health_check=list(HealthCheck))


@dataclass
class Case:
    """A QMP fuzz case; its repr stays short however big the stream is."""

    data: bytes
    negotiate: bool
    splits: list[int]
    pause: bool

    def __repr__(self) -> str:
        d = self.data
        shown = repr(d) if len(d) <= 600 else (
            f"<{len(d)} bytes, sha1 {hashlib.sha1(d).hexdigest()}: {d[:300]!r} ... {d[-300:]!r}>")
        return f"Case(data={shown}, negotiate={self.negotiate}, splits={self.splits}, pause={self.pause})"


# --------------------------------------------------------------------------- safety
# The fuzzers must never make the daemon quit, nor write files anywhere (tests may run as
# root). A case is dropped when the daemon would run such a command; the daemon's own
# stream parser tells which messages a byte string holds (the same code the daemon runs).

HMP_DENY = {"q", "quit", "memsave", "pmemsave", "dump-guest-memory", "migrate", "savevm", "loadvm",
            "delvm", "screendump", "logfile", "drive_add", "device_add", "migrate_set_parameter", "sev-mem-map"}
SAFE_FILE = re.compile(r"\A(?:/dev/null|/nonexistent-dir/.*)\Z", re.S)


def _first_word(line: str) -> str:
    p = 0
    while p < len(line) and (line[p].isspace() or line[p] in "\x00\x1c\x1d\x1e\x1f"):
        p += 1
    s = p
    while p < len(line) and line[p] != "/" and not line[p].isspace():
        p += 1
    return line[s:p]


def unsafe_hmp(line: str) -> bool:
    return any(_first_word(v) in HMP_DENY or _first_word(v).strip("\x00") in HMP_DENY
               for v in (line, line.split("\x00")[0]))


def unsafe_message(msg: object) -> bool:
    if not isinstance(msg, dict):
        return False
    args = msg.get("arguments")
    args = args if isinstance(args, dict) else {}
    for key in ("execute", "exec-oob"):
        name = msg.get(key)
        if not isinstance(name, str):
            continue
        if name in ("quit", "migrate"):
            return True
        if name in ("memsave", "pmemsave", "sev-mem-map"):
            f, size = args.get("filename"), args.get("size")
            if isinstance(f, str) and not SAFE_FILE.match(f):
                return True
            if isinstance(size, int) and size > 1 << 20:
                return True
        if name == "dump-guest-memory":
            proto = args.get("protocol")
            if isinstance(proto, str) and not proto.startswith("file:/nonexistent-dir/"):
                return True
        if name == "human-monitor-command":
            line = args.get("command-line")
            if isinstance(line, str) and unsafe_hmp(line):
                return True
    return False


def unsafe_stream(data: bytes) -> bool:
    return any(unsafe_message(m) for m in JSONStreamParser().feed(data))


# --------------------------------------------------------------------------- strategies

SENDS = transcript_sends()
EXTRA = [
    b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}',
    b'{"exec-oob":"query-status","id":1}',
    b'{"execute":"x","exec-oob":"y"}',
    b'{"execute":"query-status","id":"a","id":"b"}',
    b"{'execute':'query-kvm','id':'single'}",
    b'{"execute":"query-kvm","id":"\\ud83d\\ude00\\u0000\\u001f\xc3\xa9"}',
    b'{"execute":"query-kvm","id":12345678901234567890123}',
    b'{"execute":"query-kvm","id":-0.0}',
    b'{"execute":"query-cpus-fast"}',
    b'{"execute":"query-qmp-schema"}',
    b'{"execute":"query-sev"}',
    b'{"execute":"query-sev-attestation-report","arguments":{"mnonce":"AAAA"}}',
    b'{"execute":"sev-inject-launch-secret","arguments":{"packet-header":"a","secret":"b","gpa":1}}',
    b'{"execute":"human-monitor-command","arguments":{"command-line":"info registers","cpu-index":0}}',
    b'{"execute":"human-monitor-command","arguments":{"command-line":"x /8xb $pc"}}',
    b"[" * 1100,
    b"\x00",
    b"%d",
]
BASE = SENDS + EXTRA
INTERESTING = [b"\x00", b"\x01", b"\x08", b"\x1f", b"\x7f", b"\x80", b"\xbf", b"\xc0\x80", b"\xc3",
               b"\xed\xa0\x80", b"\xef\xbf\xbf", b"\xf4\x90\x80\x80", b"\xfe", b"\xff", b"{", b"}",
               b"[", b"]", b'"', b"'", b"\\", b":", b",", b"\\u", b"\\ud800", b"\\u0000", b"%d", b"-",
               b"0", b"01", b"1e999", b"-1e999", b"1.", b"true", b"nul", b"\r\n", b"\t", b" "]


@st.composite
def mutated_stream(draw) -> bytes:
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(BASE), min_size=1, max_size=4))))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "replace", "insert", "delete", "truncate", "splice",
                                   "brackets", "string", "controls"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "replace" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.sampled_from(INTERESTING))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        elif op == "splice":
            other = draw(st.sampled_from(BASE))
            a = draw(st.integers(0, len(other)))
            data[pos:pos] = other[a:a + draw(st.integers(1, len(other)))]
        elif op == "brackets":
            unit = draw(st.sampled_from([b"[", b"{", b'{"a":', b"]", b"}", b"[{", b'{"arguments":']))
            data[pos:pos] = unit * draw(st.integers(1, 1500))
        elif op == "string":
            q = draw(st.sampled_from([b'"', b"'"]))
            body = draw(st.sampled_from([b"A", b"\\u00e9", b"\xc3\xa9", b"\\\\", b"\xff"]))
            # every 0xFF is an error reply of its own: keep those runs short
            n = draw(st.sampled_from([10, 1000] if body == b"\xff" else [10, 1000, 100_000, 1 << 20]))
            data[pos:pos] = q + body * (n // len(body)) + draw(st.sampled_from([q, b""]))
        elif op == "controls":
            data[pos:pos] = bytes(draw(st.lists(st.sampled_from([0, 1, 2, 0x1B, 0x7F, 0xFE, 0xFF]),
                                                min_size=1, max_size=8)))
    return bytes(data)


JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda ch: st.lists(ch, max_size=4)
                           | st.dictionaries(st.text(max_size=8), ch, max_size=4), max_leaves=10)
ARG_NAMES = ["val", "size", "filename", "cpu-index", "command-line", "enable", "mnonce", "packet-header",
             "secret", "gpa", "paging", "protocol", "detach", "begin", "length", "format", "name", "x"]
ARG_VALUES = JSON_VALUES | st.sampled_from(["/dev/null", "/nonexistent-dir/x", "oob", "info version",
                                            "file:/nonexistent-dir/d", 0, 16, -1, 2 ** 64, ["oob"], "AAAA"])


@st.composite
def envelope_stream(draw, commands: list[str]) -> bytes:
    """Syntactically valid JSON with a random QMP envelope: exercises dispatch and handlers."""
    msg: dict = {}
    for key in draw(st.lists(st.sampled_from(["execute", "execute", "exec-oob", "arguments", "arguments",
                                               "id", "id", "control", "x"]), max_size=5, unique=True)):
        if key in ("execute", "exec-oob"):
            msg[key] = draw(st.sampled_from(commands) | st.text(max_size=10) | JSON_SCALARS)
        elif key == "arguments":
            msg[key] = draw(st.dictionaries(st.sampled_from(ARG_NAMES) | st.text(max_size=6), ARG_VALUES,
                                            max_size=4) | JSON_VALUES)
        else:
            msg[key] = draw(JSON_VALUES)
    top = draw(st.sampled_from([msg, msg, msg, [msg], "str", 7]))
    seps = draw(st.sampled_from([(",", ":"), (", ", ": "), ("\n,\t", "\r\n:")]))
    return json.dumps(top, separators=seps, ensure_ascii=draw(st.booleans())).encode("utf-8")


@st.composite
def qmp_case(draw, commands: list[str]):
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "envelope", "random"]))
    if kind == "mutated":
        data = draw(mutated_stream())
    elif kind == "envelope":
        data = b"".join(draw(st.lists(envelope_stream(commands), min_size=1, max_size=4)))
    else:
        data = draw(st.binary(max_size=4096))
    assume(not unsafe_stream(data))
    splits = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=8))))
    return Case(data, draw(st.booleans()), splits, draw(st.booleans()))


ARG_TOKENS = ["/4xg", "/x", "/i", "/s", "/1xb", "/0xg", "/64c", "/3dw", "/zz", "/", "/-1", "$pc", "$rip",
              "$eax", "$cr3", "$nosuch", "$", "0", "0x1000", "-1", "0xffffffffffffffff",
              "0x10000000000000000", "1+2*3", "(1", "1)", "~0", "!", "1/0", "1%0", "-(-9223372036854775808)",
              "1<<70", "'", '"', '"unterminated', '"a\\"b"', '"\\q"', "\\", "%", "on", "off", "-n", "-p",
              "-v", "cpu0", "\t", "\x01", "\u00e9", "\U0001F600", "#"]


@st.composite
def hmp_line(draw, vocab: list[str]) -> str:
    kind = draw(st.sampled_from(["vocab", "vocab", "vocab", "text"]))
    if kind == "text":
        line = draw(st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)),
                            max_size=60))
    else:
        words = [draw(st.sampled_from(vocab))]
        for _ in range(draw(st.integers(0, 4))):
            words.append(draw(st.sampled_from(ARG_TOKENS)
                              | st.integers(-(2 ** 65), 2 ** 65).flatmap(
                                  lambda v: st.sampled_from([str(v), hex(v)]))
                              | st.from_regex(r"/[0-9]{0,2}[xduocsiab]?[bhwg]?", fullmatch=True)
                              | st.text(max_size=6)))
        sep = draw(st.sampled_from([" ", "  ", "\t", ""]))
        line = sep.join(words)
    assume(not unsafe_hmp(line))
    return line


# --------------------------------------------------------------------------- helpers

def runtime_vocab(w: Watcher) -> tuple[list[str], list[str], int]:
    """Command names (QMP) and HMP words the daemon itself lists, minus the unsafe ones."""
    qmp = [c["name"] for c in w.c.cmd("query-commands")["return"]]
    qmp = [n for n in qmp if not unsafe_message({"execute": n}) and n not in HMP_DENY]
    qmp += ["no-such-command", "query-status", "qmp_capabilities"]
    hmp = ["", "info", "help", "?"]
    for text in (w.c.cmd("human-monitor-command", {"command-line": "help"})["return"],
                 w.c.cmd("human-monitor-command", {"command-line": "help info"})["return"]):
        for line in text.split("\r\n"):
            if line[:1].isspace():
                continue
            words = line.split(" -- ")[0].split()
            if not words:
                continue
            if words[0] == "info" and len(words) > 1:
                hmp += [f"info {n}" for n in words[1].split("|")]
            else:
                hmp += words[0].split("|")
    hmp = sorted({h for h in hmp if _first_word(h) not in HMP_DENY})
    ncpus = len(w.c.cmd("query-cpus-fast")["return"])
    return qmp, hmp, ncpus


class Drain(threading.Thread):
    """Reads (and checks) a connection's lines until the reply carrying ``sid`` arrives.

    Reading runs while the fuzz data is still being sent: a client that does not read
    gets disconnected once its unread replies pass the daemon's backlog limit, and a
    megabyte of 0xFF bytes is a million error replies.
    """

    def __init__(self, client: CheckedClient, sid):
        super().__init__(daemon=True)
        self.client, self.sid = client, sid
        self.last = self.final = self.exc = None

    def run(self) -> None:
        try:
            while True:
                msg = self.client.recv()
                if msg.get("id") == self.sid:
                    self.final = msg
                    return
                self.last = msg
        except BaseException as e:  # reported by the main thread
            self.exc = e


def run_qmp_case(d, w: Watcher, case: Case, k: int) -> None:
    c = CheckedClient(d.qmp, timeout=120)
    try:
        if case.negotiate:
            c.negotiate()
        sid = {"sync": k, "nonce": NONCE}
        drain = Drain(c, sid)
        drain.start()
        prev = 0
        for s in [*case.splits, len(case.data)]:
            if s > prev:
                c.send(case.data[prev:s])
                if case.pause:
                    time.sleep(0.001)
            prev = s
        # QEMU's resynchronisation: a control character ends any token or message in
        # progress with exactly one "stray" error; the next object is then read normally.
        c.send(b"\x01" + json.dumps({"execute": "query-kvm", "id": sid}).encode())
        drain.join(180)
        assert not drain.is_alive(), "no reply to the resync command: the connection hangs"
        if drain.exc is not None:
            raise drain.exc
        last, msg = drain.last, drain.final
        assert last is not None and set(last) == {"error"}, last
        assert last["error"]["class"] == "GenericError", last
        desc = last["error"]["desc"]
        assert desc.startswith("JSON parse error, stray '") and desc.endswith("\x01'"), desc[-300:]
        ok = {"return": w.kvm, "id": sid}
        if case.negotiate:
            assert msg == ok
        else:  # the fuzz data may have negotiated by itself
            assert msg in (ok, {"error": {"class": "CommandNotFound", "desc": NEGOTIATION_DESC}, "id": sid})
    finally:
        c.close()
    assert alive(d), d.output()[-3000:]
    w.ping()


def qmp_fuzz(d, n: int) -> None:
    mark = log_mark(d)
    w = Watcher(d.qmp)
    commands, _, _ = runtime_vocab(w)
    counter = itertools.count()

    @fuzz_settings(n)
    @given(case=qmp_case(commands))
    def run(case):
        run_qmp_case(d, w, case, next(counter))

    run()
    assert next(counter) >= n // 2, "most generated cases were rejected"
    w.ping()
    fresh = CheckedClient(d.qmp)
    fresh.negotiate()
    assert fresh.cmd("query-kvm", id="fresh") == {"return": w.kvm, "id": "fresh"}
    fresh.close()
    w.close()
    assert alive(d)
    no_tracebacks(d, since=mark)


def test_qmp_stream_fuzz(module_daemon):
    qmp_fuzz(module_daemon, FAST)


@pytest.mark.slow
def test_qmp_stream_fuzz_soak(module_daemon):
    qmp_fuzz(module_daemon, SOAK)


# --------------------------------------------------------------------------- framing

def _protocol_level(recv: list) -> bool:
    for r in recv:
        if "error" in r:
            if not r["error"]["desc"].startswith(("QMP input", "JSON parse error", "The command ",
                                                  "Capabilities negotiation")):
                return False
        elif not (isinstance(r.get("return"), str) and r["return"].startswith("unknown command: ")):
            return False
    return True


def _after_negotiation(entries):
    first = next(i for i, (_, recv) in enumerate(entries)
                 if recv and recv[0].get("error", {}).get("desc", "").startswith("Capabilities negotiation"))
    return [e for e in entries[first:] if _protocol_level(e[1])]


PROTOCOL_ENTRIES = _after_negotiation(transcript_entries())


def test_transcript_selection_is_not_empty():
    assert len(PROTOCOL_ENTRIES) >= 10, PROTOCOL_ENTRIES


def framing_fuzz(d, n: int) -> None:
    mark = log_mark(d)
    c = CheckedClient(d.qmp)
    c.negotiate()
    counter = itertools.count()

    @fuzz_settings(n)
    @given(picks=st.lists(st.tuples(st.sampled_from(PROTOCOL_ENTRIES),
                                    st.sampled_from([b"", b" ", b"\n", b"\r\n", b"\t\t"])),
                          min_size=1, max_size=12),
           cuts=st.lists(st.integers(0, 1 << 16), max_size=10))
    def run(picks, cuts):
        data = b"".join(send + ws for (send, _), ws in picks)
        expected = [r for (_, recv), _ in picks for r in recv]
        k = next(counter)
        prev = 0
        for s in sorted({x % (len(data) + 1) for x in cuts} | {len(data)}):
            if s > prev:
                c.send(data[prev:s])
            prev = s
        c.send(json.dumps({"execute": "query-kvm", "id": ["frame", k]}))
        got = [c.recv() for _ in expected]
        assert got == expected
        assert c.recv()["id"] == ["frame", k]

    run()
    assert next(counter) >= n // 2, "most generated cases were rejected"
    c.close()
    assert alive(d)
    no_tracebacks(d, since=mark)


def test_transcript_replies_survive_any_framing(module_daemon):
    """QEMU's own protocol-level replies, whatever the write boundaries and whitespace."""
    framing_fuzz(module_daemon, FAST)


@pytest.mark.slow
def test_transcript_replies_survive_any_framing_soak(module_daemon):
    framing_fuzz(module_daemon, SOAK)


# --------------------------------------------------------------------------- HMP

def _noncharacter(ch: str) -> bool:
    cp = ord(ch)
    return 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE


def check_hmp_text(text: str) -> None:
    assert "internal error" not in text and "Traceback" not in text, text
    assert "\n" not in text.replace("\r\n", ""), f"bare LF in {text!r}"
    assert text == "" or text.endswith("\r\n"), text


def hmp_over_qmp_fuzz(d, n: int) -> None:
    mark = log_mark(d)
    w = Watcher(d.qmp)
    _, vocab, ncpus = runtime_vocab(w)
    c = CheckedClient(d.qmp)
    c.negotiate()
    counter = itertools.count()

    @fuzz_settings(n)
    @given(line=hmp_line(vocab), cpu=st.none() | st.integers(-3, ncpus + 3), ascii_only=st.booleans())
    def run(line, cpu, ascii_only):
        k = next(counter)
        args = {"command-line": line}
        if cpu is not None:
            args["cpu-index"] = cpu
        c.send(json.dumps({"execute": "human-monitor-command", "arguments": args, "id": k},
                          ensure_ascii=ascii_only).encode())
        r = c.recv()
        bad = next((ch for ch in line if _noncharacter(ch)), None)
        if bad is not None:
            # QEMU's parser refuses Unicode noncharacters in strings, raw or escaped
            # (json-parser.c parse_string, util/unicode.c is_valid_codepoint)
            why = (json.dumps(bad)[1:-1] + " is not a valid Unicode character" if ascii_only
                   else "invalid UTF-8 sequence in string")
            assert r == {"error": {"class": "GenericError", "desc": "JSON parse error, " + why}}
        elif cpu is not None and not 0 <= cpu < ncpus:
            assert r == {"error": {"class": "GenericError", "desc": "Parameter 'cpu-index' expects a CPU number"},
                         "id": k}
        else:
            assert set(r) == {"return", "id"} and r["id"] == k, r
            assert isinstance(r["return"], str)
            check_hmp_text(r["return"])
        assert alive(d)

    run()
    assert next(counter) >= n // 2, "most generated cases were rejected"
    w.ping()
    c.close()
    w.close()
    no_tracebacks(d, since=mark)


def test_hmp_over_qmp_fuzz(module_daemon):
    hmp_over_qmp_fuzz(module_daemon, FAST)


@pytest.mark.slow
def test_hmp_over_qmp_fuzz_soak(module_daemon):
    hmp_over_qmp_fuzz(module_daemon, SOAK)


class HmpConn:
    def __init__(self, path: str):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(30)
        self.s.connect(path)
        self.buf = b""
        banner = self.until(PROMPT)
        assert banner.startswith(b"sevmon ") and banner.endswith(b"\r\n" + PROMPT), banner

    def until(self, suffix: bytes) -> bytes:
        while not self.buf.endswith(suffix):
            chunk = self.s.recv(1 << 16)
            assert chunk, f"HMP connection closed; got {self.buf[-500:]!r}"
            self.buf += chunk
        out, self.buf = self.buf, b""
        return out


def hmp_socket_fuzz(d, n: int) -> None:
    mark = log_mark(d)
    w = Watcher(d.qmp)
    _, vocab, _ = runtime_vocab(w)
    h = HmpConn(d.hmp)
    counter = itertools.count()

    @fuzz_settings(n)
    @given(line=hmp_line(vocab).map(lambda s: s.encode("utf-8").replace(b"\n", b""))
           | st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")),
           eol=st.sampled_from([b"\n", b"\r\n"]))
    def run(line, eol):
        assume(not unsafe_hmp(line.decode("utf-8", "replace").rstrip("\r\n")))
        k = next(counter)
        sync = f"sync-{NONCE}-{k}".encode()
        tail = PROMPT + b"unknown command: '" + sync + b"'\r\n" + PROMPT
        h.s.sendall(line + eol + sync + b"\n")
        out = h.until(tail)[:-len(tail)]
        # one prompt per line: the fuzz line's output, its prompt, the sync line's output
        text = out.decode("utf-8")  # the server encodes its text as UTF-8
        check_hmp_text(text)
        assert alive(d)

    run()
    assert next(counter) >= n // 2, "most generated cases were rejected"
    w.ping()
    h.s.close()
    w.close()
    no_tracebacks(d, since=mark)


def test_hmp_socket_fuzz(module_daemon):
    hmp_socket_fuzz(module_daemon, FAST)


@pytest.mark.slow
def test_hmp_socket_fuzz_soak(module_daemon):
    hmp_socket_fuzz(module_daemon, SOAK)


def test_daemon_survived_the_module(module_daemon):
    """Whatever ran before in this module: alive, answering, quitting cleanly."""
    w = Watcher(module_daemon.qmp)
    w.ping()
    w.close()
    assert module_daemon.stop() == 0
