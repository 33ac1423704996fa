"""SEV migration between two sevmon daemons over real UNIX sockets (SEND_*/RECEIVE_*)."""

from __future__ import annotations

import base64
import socket
import threading
import time

import pytest

from sevmon.testing import HMPSocket
from tests.conftest import hmp, qmp_connect


def wait_migration(q, *, source=True, limit=600):
    """Poll query-migrate until it leaves setup/active; returns (final, seen snapshots)."""
    seen = []
    for _ in range(limit):
        r = q.cmd_obj({"execute": "query-migrate"})["return"]
        st = q.cmd_obj({"execute": "query-status"})["return"]
        seen.append((r, st))
        if r.get("status") in ("completed", "failed"):
            return r, seen
        time.sleep(0.05)
    raise AssertionError(f"migration did not finish: {seen[-1]}")


def target_params(target) -> dict:
    q = qmp_connect(target)
    caps = q.cmd_obj({"execute": "query-sev-capabilities"})["return"]
    q.close()
    return {"sev-pdh": caps["pdh"], "sev-plat-cert": caps["cert-chain"],
            "sev-amd-cert": base64.b64encode(b"").decode()}


def start_pair(make_daemon, tmp_path, *source_args, target_args=()):
    inc = tmp_path / "incoming.sock"
    target = make_daemon("--incoming", f"unix:{inc}", *target_args, subdir="target")
    source = make_daemon(*source_args, subdir="source")
    return source, target, str(inc)


def test_two_daemons_same_guest_view(make_daemon, tmp_path):
    source, target, inc = start_pair(make_daemon, tmp_path, "--no-workload")
    qt = qmp_connect(target)
    assert qt.cmd_obj({"execute": "query-status"})["return"]["status"] == "inmigrate"
    qs = qmp_connect(source)
    try:
        assert qs.cmd_obj({"execute": "migrate", "arguments": {"uri": f"unix:{inc}"}})["error"]["desc"] \
            .startswith("SEV migration needs the target's PDH")
        assert qs.cmd_obj({"execute": "migrate-set-parameters", "arguments": target_params(target)}) == {"return": {}}
        qs.cmd_obj({"execute": "stop"})
        mem, x = hmp(qs, "info mem"), hmp(qs, "x /8xg 0x400000")
        ram_before = hmp(qs, "xp /4xg 0x1000000")
        qs.cmd_obj({"execute": "cont"})
        assert qs.cmd_obj({"execute": "migrate", "arguments": {"uri": f"unix:{inc}"}}) == {"return": {}}
        final, _ = wait_migration(qs)
        assert final["status"] == "completed", final
        assert final["ram"]["transferred"] > 0 and final["ram"]["remaining"] == 0
        assert qs.cmd_obj({"execute": "query-status"})["return"]["status"] == "postmigrate"
        events = [e["event"] for e in qs.get_events()]
        assert "MIGRATION" in events
        for _ in range(200):
            if qt.cmd_obj({"execute": "query-status"})["return"]["status"] == "running":
                break
            time.sleep(0.05)
        assert qt.cmd_obj({"execute": "query-sev"})["return"]["state"] == "running"
        qt.cmd_obj({"execute": "stop"})
        assert hmp(qt, "info mem") == mem
        assert hmp(qt, "x /8xg 0x400000") == x
        assert hmp(qt, "xp /4xg 0x1000000") == ram_before
    finally:
        qs.close()
        qt.close()


class Relay:
    """A UNIX-socket relay between source and target that can flip a byte or cut the stream."""

    def __init__(self, path: str, target: str, *, flip_at: int | None = None, cut_at: int | None = None):
        self.target, self.flip_at, self.cut_at = target, flip_at, cut_at
        self.ls = socket.socket(socket.AF_UNIX)
        self.ls.bind(path)
        self.ls.listen(1)
        self.data = bytearray()
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        a, _ = self.ls.accept()
        b = socket.socket(socket.AF_UNIX)
        b.connect(self.target)

        def back():
            try:
                while chunk := b.recv(65536):
                    a.sendall(chunk)
            except OSError:
                pass
            finally:
                a.close()
        threading.Thread(target=back, daemon=True).start()
        try:
            while chunk := a.recv(65536):
                start = len(self.data)
                chunk = bytearray(chunk)
                if self.flip_at is not None and start <= self.flip_at < start + len(chunk):
                    chunk[self.flip_at - start] ^= 0x40
                if self.cut_at is not None and start + len(chunk) >= self.cut_at:
                    b.sendall(chunk[:self.cut_at - start])
                    for s in (b, a):  # shutdown wakes the reader thread; close alone would not
                        s.shutdown(socket.SHUT_RDWR)
                        s.close()
                    return
                self.data += chunk
                b.sendall(chunk)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.mark.parametrize("how", ["flip", "cut"])
def test_tampered_or_truncated_stream_fails_and_source_runs_on(make_daemon, tmp_path, how):
    source, target, inc = start_pair(make_daemon, tmp_path)
    relay_path = str(tmp_path / "relay.sock")
    # byte 20000: inside the second or third page record's ciphertext
    Relay(relay_path, inc, **({"flip_at": 20000} if how == "flip" else {"cut_at": 20000}))
    qs, qt = qmp_connect(source), qmp_connect(target)
    try:
        qs.cmd_obj({"execute": "migrate-set-parameters", "arguments": target_params(target)})
        before = hmp(qs, "xp /4xg 0x1000000")
        assert "0x0000000000000000 0x0000000000000000\r\n0" not in before  # the source has data there
        assert qs.cmd_obj({"execute": "migrate", "arguments": {"uri": f"unix:{relay_path}"}}) == {"return": {}}
        final, _ = wait_migration(qs)
        assert final["status"] == "failed"
        if how == "flip":
            assert final["error-desc"] == \
                "sev_receive_update_data: RECEIVE_UPDATE_DATA ret=-1 fw_error=11 'Bad measurement'"
        st = qs.cmd_obj({"execute": "query-status"})["return"]
        assert st["status"] == "running"
        assert qs.cmd_obj({"execute": "query-sev"})["return"]["state"] == "running"
        assert hmp(qs, "xp /4xg 0x1000000") == before
        tq = qt.cmd_obj({"execute": "query-migrate"})["return"]
        for _ in range(100):
            if tq.get("status") == "failed":
                break
            time.sleep(0.05)
            tq = qt.cmd_obj({"execute": "query-migrate"})["return"]
        assert tq["status"] == "failed"
        assert qt.cmd_obj({"execute": "query-status"})["return"]["status"] == "inmigrate"
        # nothing half-applied: the target's RAM is as a fresh guest's, zeros, not the source's bytes
        assert hmp(qt, "xp /4xg 0x1000000") == ("0000000001000000: 0x0000000000000000 0x0000000000000000\r\n"
                                                 "0000000001000010: 0x0000000000000000 0x0000000000000000\r\n")
    finally:
        qs.close()
        qt.close()


def test_nosend_fails_and_source_keeps_running(make_daemon, tmp_path):
    source, target, inc = start_pair(make_daemon, tmp_path, "--policy", "0x8")
    qs = qmp_connect(source)
    try:
        qs.cmd_obj({"execute": "migrate-set-parameters", "arguments": target_params(target)})
        assert qs.cmd_obj({"execute": "migrate", "arguments": {"uri": f"unix:{inc}"}}) == {"return": {}}
        final, _ = wait_migration(qs)
        assert final == {"status": "failed",
                         "error-desc": "sev_send_start: SEND_START ret=-1 fw_error=7 'Policy is not allowed'"}
        assert qs.cmd_obj({"execute": "query-status"})["return"]["status"] == "running"
        assert qs.cmd_obj({"execute": "query-sev"})["return"]["state"] == "running"
        assert hmp(qs, "savevm s1") == "Error: SEV: Migration is not implemented\r\n"
    finally:
        qs.close()


def test_progress_while_the_source_runs_its_workload(make_daemon, tmp_path):
    source, target, inc = start_pair(make_daemon, tmp_path)
    qs = qmp_connect(source)
    try:
        qs.cmd_obj({"execute": "migrate-set-parameters",
                    "arguments": {**target_params(target), "max-bandwidth": 2 << 20}})
        assert qs.cmd_obj({"execute": "migrate", "arguments": {"uri": f"unix:{inc}"}}) == {"return": {}}
        final, seen = wait_migration(qs, limit=2000)
        assert final["status"] == "completed"
        active = [(r, st) for r, st in seen if r.get("status") == "active"]
        assert active, "query-migrate never showed the migration active"
        moving = [r["ram"]["transferred"] for r, st in active if st["status"] == "running"]
        assert len(set(moving)) >= 2, "no progress seen while the source was running"
        assert moving == sorted(moving) and moving[-1] <= final["ram"]["transferred"]
        # the running guest dirtied pages after they were sent: they went again at the end
        assert final["ram"]["total"] > active[0][0]["ram"]["total"]
    finally:
        qs.close()
    qt = qmp_connect(target)
    try:
        for _ in range(200):
            if qt.cmd_obj({"execute": "query-status"})["return"]["status"] == "running":
                break
            time.sleep(0.05)
        assert qt.cmd_obj({"execute": "query-status"})["return"]["status"] == "running"
        assert "0000000000400000" in hmp(qt, "info mem")
    finally:
        qt.close()


def test_exec_migration_to_a_file_and_back(make_daemon, tmp_path):
    stream = tmp_path / "guest.mig"
    source = make_daemon("--no-workload", subdir="source")
    other = make_daemon("--sev-platform", str(tmp_path / "target-platform.json"), subdir="probe")
    params = target_params(other)
    other.stop()
    qs = qmp_connect(source)
    try:
        qs.cmd_obj({"execute": "migrate-set-parameters", "arguments": params})
        qs.cmd_obj({"execute": "stop"})
        mem = hmp(qs, "info mem")
        assert qs.cmd_obj({"execute": "migrate", "arguments": {"uri": f"exec:cat > {stream}"}}) == {"return": {}}
        assert wait_migration(qs)[0]["status"] == "completed"
    finally:
        qs.close()
    data = stream.read_bytes()
    assert data.startswith(b"SEVMON-MIGRATION 1\n")
    for plaintext in (b"kernel text +0x1000", b"user page 0", b"stack page 1"):  # only TEK ciphertext crosses
        assert plaintext not in data
    target = make_daemon("--sev-platform", str(tmp_path / "target-platform.json"), "--incoming",
                         f"exec:cat {stream}", subdir="target")
    qt = qmp_connect(target)
    try:
        for _ in range(200):
            if qt.cmd_obj({"execute": "query-status"})["return"]["status"] == "running":
                break
            time.sleep(0.05)
        qt.cmd_obj({"execute": "stop"})
        assert hmp(qt, "info mem") == mem
    finally:
        qt.close()


@pytest.mark.parametrize("uri,text", [
    ("tcp:0:4444", "--incoming tcp:0:4444: sevmon receives over unix:PATH or exec:COMMAND only"),
    ("unix:{file}", "cannot listen on {file}: it exists and is not a socket"),
])
def test_bad_incoming_is_one_line(tmp_path, uri, text):
    import subprocess
    import sys
    taken = tmp_path / "taken"
    taken.write_text("not a socket")
    p = subprocess.run([sys.executable, "-m", "sevmon", "serve", "--qmp", str(tmp_path / "q.sock"),
                        "--incoming", uri.format(file=taken)], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert text.format(file=taken) in p.stderr


def _hmp_line(path: str, line: str) -> str:
    """One line on an HMP socket: its output, once the prompt is back."""
    with HMPSocket(path, timeout=120) as s:
        return s.run(line)


def test_hmp_migrate_without_d_waits_for_the_end(make_daemon, tmp_path):
    """QEMU's HMP migrate without -d suspends the monitor until the migration ends: the prompt comes back
    only then (nothing printed on success)."""
    source, target, inc = start_pair(make_daemon, tmp_path, "--no-workload")
    qs = qmp_connect(source)
    try:
        qs.cmd_obj({"execute": "migrate-set-parameters", "arguments": target_params(target)})
        assert _hmp_line(source.hmp, f"migrate unix:{inc}") == ""
        final = qs.cmd_obj({"execute": "query-migrate"})["return"]
        assert final["status"] == "completed", final
        assert qs.cmd_obj({"execute": "query-status"})["return"]["status"] == "postmigrate"
    finally:
        qs.close()


def test_hmp_migrate_over_qmp_continues_detached(make_daemon, tmp_path):
    """human-monitor-command's monitor cannot be suspended: QEMU says so and the migration goes on detached."""
    source, target, inc = start_pair(make_daemon, tmp_path, "--no-workload")
    qs = qmp_connect(source)
    try:
        qs.cmd_obj({"execute": "migrate-set-parameters", "arguments": target_params(target)})
        assert hmp(qs, f"migrate unix:{inc}") == \
            "terminal does not allow synchronous migration, continuing detached\r\n"
        final, _ = wait_migration(qs)
        assert final["status"] == "completed", final
    finally:
        qs.close()
