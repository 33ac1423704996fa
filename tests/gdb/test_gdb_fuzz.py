"""Protocol fuzz of the gdb stub over a raw socket: valid, damaged (bad checksums, bad hex),
oversized and cut-off packets, Ctrl-C and junk in any order, then a client that vanishes.

After every case the fuzzed connection must have received only well-framed bytes, and the
daemon must still serve a new gdb connection and a QMP client that stayed connected."""

from __future__ import annotations

import socket
import time

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sevmon.gdb.packets import PacketReader, checksum, escape, frame, unescape
from tests.conftest import qmp_connect
from tests.gdb.gdb_support import RspClient

VALID = [b"?", b"g", b"p0", b"p10", b"p45", b"m400000,8", b"m400000,800", b"mffffffffffffffff,10",
         b"M400100,4:01020304", b"X400104,2:\x7d\x03\x7d\x04", b"qSupported:multiprocess+", b"qC",
         b"qAttached", b"qfThreadInfo", b"qsThreadInfo", b"qXfer:features:read:target.xml:0,ffb",
         b"qXfer:features:read:target.xml:fff0,ff", b"qXfer:features:read:bogus.xml:0,10", b"Hg0", b"Hg1",
         b"Hc-1", b"Hg7", b"T1", b"vCont?", b"vCont;c", b"c", b"s", b"vCont;s:1", b"Z0,400000,1",
         b"z0,400000,1", b"Qqemu.PhyMemMode:1", b"Qqemu.PhyMemMode:0", b"qqemu.PhyMemMode",
         b"qRcmd," + b"info status".hex().encode(), b"qRcmd," + b"info mem".hex().encode(), b"vMustReplyEmpty",
         b"P10=0010400081ffffff", b"G00", b"m", b"M1,2:zz", b"X1,5:ab", b"Hzz", b"p", b"pffffffff", b"qRcmd,zz"]

chunk = st.one_of(
    st.sampled_from(VALID).map(frame),                                          # well-formed
    st.sampled_from(VALID).map(lambda p: b"$" + p + b"#00" if checksum(p) else b"$" + p + b"#01"),
    st.binary(max_size=64).map(lambda b: b"$" + b.replace(b"#", b"").replace(b"$", b"") + b"#zz"),
    st.integers(4097, 20000).map(lambda n: b"$" + b"m" * n + b"#00"),           # oversized
    st.binary(max_size=200).map(lambda b: frame(escape(b))),                    # random payloads
    st.just(b"\x03"), st.just(b"+"), st.just(b"-"),
    st.binary(max_size=100),                                                    # junk between packets
)
case = st.tuples(st.lists(chunk, max_size=12), st.integers(0, 40), st.booleans())


def _well_framed(data: bytes) -> None:
    i = 0
    while i < len(data):
        if data[i:i + 1] in (b"+", b"-"):
            i += 1
            continue
        assert data[i:i + 1] == b"$", data[i:i + 40]
        end = data.index(b"#", i)
        assert len(data) >= end + 3, "reply cut short"
        assert int(data[end + 1:end + 3], 16) == checksum(data[i + 1:end])
        assert b"*" not in data[i + 1:end]   # no run-length encoding, ever
        i = end + 3


def _fresh_client(path: str) -> RspClient:
    deadline = time.monotonic() + 20
    while True:
        c = RspClient(path)
        try:
            assert c.ask("?") == "T05thread:01;"
            return c
        except (EOFError, ConnectionError):   # the previous session is still finishing
            c.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_packet_reader_resynchronises_after_damage():
    r = PacketReader(max_payload=16)
    events = r.feed(b"junk$m0,4#a1+$" + b"x" * 40 + b"#00\x03$qC#b4")
    assert [type(e).__name__ for e in events] == ["Nack", "Nack", "Interrupt", "Packet"]
    assert events[-1].payload == b"qC"
    parts = [r.feed(bytes([b])) for b in frame(b"m400000,8")]   # one byte at a time
    assert [e.payload for p in parts for e in p] == [b"m400000,8"]
    assert unescape(escape(bytes(range(256)))) == bytes(range(256))


def test_fuzzed_gdb_connections_never_disturb_the_daemon(make_daemon):
    d = make_daemon("--no-workload", "--gdb", "unix:gdb.sock")
    path = d.qmp.replace("qmp.sock", "gdb.sock")
    q = qmp_connect(d)
    good = _fresh_client(path)
    expected = good.ask("m400000,8")
    assert good.ask("D") == "OK"
    good.close()

    @settings(max_examples=120, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case)
    def one(c):
        chunks, cut, half_close = c
        stream = b"".join(chunks)
        if cut and stream:
            stream = stream[:-cut]        # the client vanishes mid-packet
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(20)
        s.connect(path)
        got = b""
        try:
            s.sendall(stream)
            if half_close:
                s.shutdown(socket.SHUT_WR)
                while chunk := s.recv(65536):
                    got += chunk
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            s.close()
        if half_close:
            _well_framed(got)
        c2 = _fresh_client(path)
        assert c2.ask("qqemu.PhyMemMode") == "0"               # each session starts virtual
        assert c2.ask("m400000,8") == expected
        assert c2.ask("D") == "OK"
        c2.close()
        assert q.cmd("query-status")["status"] in ("running", "paused")

    one()
    assert d.proc.poll() is None
    assert "Traceback" not in d.output(), d.output()[-3000:]
    q.close()
