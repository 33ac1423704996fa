"""QEMU's own clients against the real daemon: qemu.qmp QMPClient, the legacy sync
client, and qmp-shell / qmp-shell -H as subprocesses. Plus concurrency and abuse."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.conftest import RawClient


def qmp_shell() -> list[str]:
    exe = shutil.which("qmp-shell") or str(Path(sys.executable).with_name("qmp-shell"))
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "qemu.qmp.qmp_shell"]


def test_qmpclient_execute_and_events(daemon):
    async def main():
        client = QMPClient("test")
        await client.connect(daemon.qmp)
        status = await client.execute("query-status")
        assert set(status) == {"running", "status", "singlestep"}
        with pytest.raises(ExecuteError) as ei:
            await client.execute("memsave", {"val": 0, "size": 16})
        assert ei.value.error_class == "GenericError" and str(ei.value) == "Parameter 'filename' is missing"
        listener = EventListener(("STOP", "RESUME"))
        with client.listen(listener):
            if status["running"]:
                await client.execute("stop")
                ev = await asyncio.wait_for(listener.get(), 5)
                assert ev["event"] == "STOP"
            await client.execute("cont")
            ev = await asyncio.wait_for(listener.get(), 5)
            assert ev["event"] == "RESUME"
        out = await client.execute("human-monitor-command", {"command-line": "info status"})
        assert out == "VM status: running\r\n"
        await client.disconnect()

    asyncio.run(main())


def test_legacy_client(daemon):
    qmp = QEMUMonitorProtocol(daemon.qmp)
    greeting = qmp.connect(negotiate=True)
    assert greeting["QMP"]["version"]["qemu"]["major"] == 7
    assert "status" in qmp.cmd("query-status")  # cmd() returns the value (raises on error)
    r = qmp.cmd_obj({"execute": "human-monitor-command", "arguments": {"command-line": "info kvm"}})
    assert r["return"].startswith("kvm support: ")
    qmp.cmd("stop")
    qmp.cmd("cont")
    names = [e["event"] for e in qmp.get_events(wait=5)]
    assert "RESUME" in names
    qmp.close()


def test_qmp_shell(daemon):
    out = subprocess.run([*qmp_shell(), daemon.qmp], input="query-status\nquery-kvm\n\n", text=True,
                         capture_output=True, timeout=60)
    assert "Connected to QEMU 7.2.22" in out.stdout, out.stdout + out.stderr
    assert '{"return": {"status": ' in out.stdout and '"enabled": ' in out.stdout


def test_qmp_shell_hmp_mode(daemon):
    out = subprocess.run([*qmp_shell(), "-H", daemon.qmp], input="info status\ninfo version\nbogus\n", text=True,
                         capture_output=True, timeout=60)
    assert "VM status: " in out.stdout, out.stdout + out.stderr
    assert "7.2.22sevmon" in out.stdout
    assert "unknown command: 'bogus'" in out.stdout


def test_fifty_clients_two_hundred_commands_each(daemon):
    async def one(i):
        c = QMPClient(f"c{i}")
        await c.connect(daemon.qmp)
        for j in range(200):
            if j % 2:
                r = await c.execute("query-kvm")
                assert set(r) == {"enabled", "present"}
            else:
                r = await c.execute("human-monitor-command", {"command-line": "help stop"})
                assert r == "stop|s  -- stop emulation\r\n"
        await c.disconnect()
        return i

    async def main():
        return await asyncio.gather(*(one(i) for i in range(50)))

    assert sorted(asyncio.run(main())) == list(range(50))


def test_ids_route_to_their_own_client(daemon):
    clients = [RawClient(daemon.qmp) for _ in range(10)]
    for c in clients:
        c.negotiate()
    for n in range(20):
        for i, c in enumerate(clients):
            c.send(f'{{"execute":"query-kvm","id":[{i},{n}]}}')
    for n in range(20):
        for i, c in enumerate(clients):
            assert c.recv()["id"] == [i, n]


def test_bad_clients_do_not_affect_others(daemon):
    good = RawClient(daemon.qmp)
    good.negotiate()
    # half an object, then stall forever
    stall = RawClient(daemon.qmp)
    stall.negotiate()
    stall.send('{"execute":"query-status", "arguments": {')
    # disconnect mid-command
    gone = RawClient(daemon.qmp)
    gone.negotiate()
    gone.send('{"execute":"human-monitor-command","arguments":{"command-line":"help"}}')
    gone.sock.close()
    # a flood of garbage from another
    flood = RawClient(daemon.qmp)
    flood.negotiate()
    junk = bytes(range(256)) * 1024  # 256 KiB: 41,984 parse errors, each one a reply
    for _ in range(4):  # the good client is answered between floods (recv fails on a hang: socket timeout)
        good.send('{"execute":"query-kvm","id":"alive"}')
        assert good.recv()["id"] == "alive"
        try:
            flood.sock.sendall(junk)
        except OSError:
            break
    # a client that never reads its replies
    deaf = socket.socket(socket.AF_UNIX)
    deaf.connect(daemon.qmp)
    deaf.sendall(b'{"execute":"qmp_capabilities"}' + b'{"execute":"query-qmp-schema"}' * 200)
    for k in range(20):
        good.send(f'{{"execute":"query-status","id":{k}}}')
        assert good.recv()["id"] == k
    stall.sock.close()
    flood.sock.close()
    deaf.close()
    good.send('{"execute":"query-kvm","id":"end"}')
    assert good.recv()["id"] == "end"


def test_state_queries_answer_while_another_client_runs_a_long_command(make_daemon, tmp_path):
    import json as _json

    raw = tmp_path / "ram.bin"
    raw.write_bytes(os.urandom(128 << 20))
    cpu = tmp_path / "cpu.json"
    cpu.write_text(_json.dumps({"cr0": "0x11"}))
    d = make_daemon("--raw", str(raw), "--cpu-state", str(cpu), "--sev", hmp=False)
    busy, quick = RawClient(d.qmp), RawClient(d.qmp)
    busy.negotiate()
    quick.negotiate()
    busy.send(_json.dumps({"execute": "pmemsave", "id": "long",
                           "arguments": {"val": 0, "size": 128 << 20, "filename": "/dev/null"}}))
    time.sleep(0.05)
    quick.send('{"execute":"query-status","id":"q"}')
    assert quick.recv()["id"] == "q"
    busy.sock.settimeout(0)  # the long command is still running: its reply is not there yet
    try:
        pending = busy.sock.recv(1 << 16)
    except BlockingIOError:
        pending = b""
    assert b'"long"' not in pending
    busy.sock.settimeout(60)
    busy.buf += pending
    assert busy.recv() == {"return": {}, "id": "long"}
