"""Attaching fails with one sentence and exit status 1, nothing half-started (no socket
of sevmon's left, QEMU's monitor released); losing QEMU is one sentence too; a signal
detaches and leaves QEMU running. QEMU runs without a guest here (-S): no boot needed."""

from __future__ import annotations

import os
import signal
import socket
import threading

from tests.live.conftest import Attached, Qemu, require_qemu


def _failed(tmp, target: str, *extra: str) -> str:
    s = Attached(tmp, target, extra=list(extra))
    assert s.wait(30) == 1
    out = s.output().strip()
    assert len(out.splitlines()) == 1, out
    assert "Traceback" not in out
    assert not os.path.exists(s.qmp_path) and not os.path.exists(s.hmp_path)
    return out


def test_no_such_socket(tmp_path):
    out = _failed(tmp_path, str(tmp_path / "nope.sock"))
    assert "no such socket" in out and "-qmp unix:" in out


def test_no_qmp_greeting(tmp_path):
    path = str(tmp_path / "notqmp.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def talk():
        c, _ = srv.accept()
        c.sendall(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ")
        c.recv(100)
        c.close()
    threading.Thread(target=talk, daemon=True).start()
    assert "no QMP greeting" in _failed(tmp_path, path)
    srv.close()


def test_ram_not_shared_names_the_options(tmp_path):
    require_qemu()
    qemu = Qemu(tmp_path, mem="128M", share=False, guest=False)
    try:
        out = _failed(tmp_path, qemu.a)
        assert "not shared" in out and "share=on" in out and "-machine memory-backend=ram0" in out
        qemu.qmp("a").close()  # QEMU's monitor was released
    finally:
        qemu.stop()


def test_default_private_ram_names_the_options(tmp_path):
    require_qemu()
    qemu = Qemu(tmp_path, mem="128M", backend=None, guest=False)
    try:
        out = _failed(tmp_path, qemu.a)
        assert "memory-backend-memfd" in out and "share=on" in out
    finally:
        qemu.stop()


def test_monitor_busy(tmp_path):
    require_qemu()
    qemu = Qemu(tmp_path, mem="128M", guest=False)
    holder = qemu.qmp("a")
    try:
        out = _failed(tmp_path, qemu.a)
        assert "another client" in out
    finally:
        holder.close()
        qemu.stop()


def test_qemu_killed_is_one_sentence_and_a_signal_detaches(tmp_path):
    require_qemu()
    qemu = Qemu(tmp_path, mem="128M", guest=False)
    try:
        s = Attached(tmp_path, qemu.a)
        assert s.proc.poll() is None, s.output()
        q = s.qmp()
        assert q.cmd("query-status")["status"] == "prelaunch"
        s.proc.send_signal(signal.SIGTERM)  # sevmon goes, QEMU stays, its monitor is free again
        assert s.wait(30) == 0
        said = s.output().strip().splitlines()[-2:]  # and it says so
        assert said == ["sevmon: SIGTERM: detaching from QEMU, which keeps running",
                        f"sevmon: detached from QEMU ({qemu.a}): QEMU keeps running the guest"], said
        q.close()
        assert qemu.proc.poll() is None
        qemu.qmp("a").close()
        s = Attached(tmp_path, qemu.a)
        assert s.proc.poll() is None, s.output()
        qemu.proc.kill()
        assert s.wait(30) == 1
        out = s.output().strip().splitlines()
        assert len(out) == 2 and "lost QEMU's monitor socket" in out[-1], out
        assert not os.path.exists(s.qmp_path)
    finally:
        qemu.stop()

