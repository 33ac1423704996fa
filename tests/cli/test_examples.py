"""Each script in ``examples/`` run as a user would, against a real daemon."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from qemu.qmp import QMPClient

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args],
                          capture_output=True, text=True, timeout=timeout)


def qmp_commands(raw) -> set[str]:
    return {c["name"] for c in raw().cmd("query-commands")["return"]}


def query_commands(path: str) -> set[str]:
    async def ask():
        qmp = QMPClient("probe")
        await qmp.connect(path)
        try:
            return {c["name"] for c in await qmp.execute("query-commands")}
        finally:
            await qmp.disconnect()
    return asyncio.run(ask())


def require(raw, *commands: str) -> None:
    """The example needs these commands: their loss is a failure, never a skip."""
    missing = sorted(set(commands) - qmp_commands(raw))
    assert not missing, f"{', '.join(missing)} not in query-commands"


def test_inspect_guest(daemon, raw):
    require(raw, "query-sev", "query-sev-debug-stats")
    c = raw()
    c.cmd("stop")  # freeze the page tables so info mem is the same twice
    mem = c.cmd("human-monitor-command", {"command-line": "info mem"})["return"]
    assert not mem.startswith("unknown command"), mem
    p = run_example("inspect_guest.py", daemon.qmp)
    assert p.returncode == 0, p.stderr
    assert "enabled      True" in p.stdout and "api-major" in p.stdout
    for line in mem.splitlines():
        assert "  " + line in p.stdout
    assert "round-trips" in p.stdout


def test_verify_measurement(make_daemon, tmp_path):
    firmware = tmp_path / "bios.bin"
    firmware.write_bytes(bytes(range(256)) * 256)  # 64 KiB
    other = tmp_path / "other.bin"
    other.write_bytes(b"\x90" * 65536)
    d = make_daemon("--bios", str(firmware))
    assert {"query-sev", "query-sev-launch-measure"} <= query_commands(d.qmp)
    ok = run_example("verify_measurement.py", d.qmp, str(firmware))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK" in ok.stdout
    bad = run_example("verify_measurement.py", d.qmp, str(other))
    assert bad.returncode == 1
    assert "MISMATCH" in bad.stdout


def test_watch_events_until_shutdown(daemon, raw):
    p = subprocess.Popen([sys.executable, str(EXAMPLES / "watch_events.py"), daemon.qmp, "60"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().startswith("watching")  # connected: events now reach it
        c = raw()
        c.cmd("stop")
        c.cmd("cont")
        c.cmd("quit")
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 0, err
    names = [line.split()[1] for line in out.splitlines()]
    assert names == ["STOP", "RESUME", "SHUTDOWN"]
    assert '"reason": "host-qmp-quit"' in out


def test_watch_events_stops_after_n_seconds(daemon):
    start = time.monotonic()
    p = run_example("watch_events.py", daemon.qmp, "0.5")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == "time is up"
    assert time.monotonic() - start < 20


def test_dump_and_reopen(daemon, raw, tmp_path):
    require(raw, "dump-guest-memory", "query-sev")
    c = raw()
    assert not c.cmd("human-monitor-command", {"command-line": "info mem"})["return"].startswith("unknown command")
    core = tmp_path / "guest.core"
    p = run_example("dump_and_reopen.py", daemon.qmp, str(core))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SAME" in p.stdout
    assert core.read_bytes()[:4] == b"\x7fELF"
