"""Live QEMU 7.2 for the attach tests: a real Linux guest with TWO QMP monitors.

``boot_qemu(tmp, ...)`` starts ``qemu-system-x86_64`` (TCG) with the cached guest of
``build_guest.py``, RAM in a shared backend (memfd, or a file under ``tmp``), monitor
``a.sock`` (for sevmon) and ``b.sock`` (for the test, QEMU's own answers), the serial
console in a file, and waits for the guest's ready marker. Without QEMU or the guest the
tests skip with the reason; under ``CI=true`` that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_guest import READY_MARKER, debug_vmlinux_file, guest_files  # noqa: E402

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 180


def _missing(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: these tests must run)")
    pytest.skip(reason)


def require_qemu() -> str:
    path = shutil.which(QEMU)
    if path is None:
        _missing(f"{QEMU} not installed (apt-get install qemu-system-x86)")
    return path


def require_guest() -> tuple[Path, Path]:
    kernel, initrd = guest_files()
    if not (kernel.exists() and initrd.exists()):
        _missing(f"live-test guest not built: run python tests/live/build_guest.py ({kernel.parent})")
    return kernel, initrd


def require_debug_vmlinux() -> Path:
    """The test kernel's debug vmlinux (for crash and drgn), cached by build_guest.py."""
    kernel, _ = require_guest()
    vmlinux = debug_vmlinux_file(kernel.parent)
    if not vmlinux.exists():
        _missing(f"the guest kernel's debug vmlinux is not cached: run python tests/live/build_guest.py ({vmlinux})")
    return vmlinux


def require_tool(name: str, package: str) -> str:
    """A program the tests drive for real (crash, ...): missing is a skip, or a failure under CI=true."""
    path = shutil.which(name)
    if path is None:
        _missing(f"{name} not installed (apt-get install {package})")
    return path


def require_drgn() -> None:
    """drgn's Python module (the test extra installs it): missing is a skip, or a failure under CI=true."""
    try:
        import drgn  # noqa: F401
    except ImportError:
        _missing("drgn is not installed (pip install 'sevmon[drgn]')")


class Qemu:
    """One QEMU process; ``a``/``b`` are its QMP socket paths."""

    def __init__(self, tmp: Path, *, mem: str = "4G", cpu: str = "max,la57=off", machine: str = "pc",
                 backend: str | None = "memfd", share: bool = True, smp: int = 1, guest: bool = True,
                 extra: list[str] | None = None):
        self.tmp = tmp
        self.a, self.b = str(tmp / "a.sock"), str(tmp / "b.sock")
        self.serial = tmp / "serial.log"
        ram: list[str] = []  # backend None: QEMU's default, private RAM
        if backend is not None:
            obj = f"memory-backend-{backend},id=ram0,size={mem},share={'on' if share else 'off'}"
            if backend == "file":
                self.mem_path = tmp / "guest-ram"
                obj += f",mem-path={self.mem_path}"
            ram, machine = ["-object", obj], f"{machine},memory-backend=ram0"
        cmd = [require_qemu(), "-machine", machine, "-accel", "tcg", "-cpu", cpu,
               "-m", mem, "-smp", str(smp), *ram, "-nodefaults", "-nographic", "-no-reboot",
               "-serial", f"file:{self.serial}",
               "-qmp", f"unix:{self.a},server=on,wait=off", "-qmp", f"unix:{self.b},server=on,wait=off",
               *(extra or [])]
        if guest:
            kernel, initrd = require_guest()
            cmd += ["-kernel", str(kernel), "-initrd", str(initrd), "-append", "console=ttyS0 panic=-1 quiet"]
        else:
            cmd += ["-S"]
        self.log = open(tmp / "qemu.log", "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait(guest)

    def _wait(self, guest: bool) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"QEMU exited {self.proc.returncode}: {self.log.read()}")
            ready = os.path.exists(self.b) and (
                not guest or (self.serial.exists() and READY_MARKER in self.serial.read_text(errors="replace")))
            if ready:
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the guest did not print its ready marker in time")

    def qmp(self, which: str = "b"):
        """qemu.qmp's synchronous client on monitor ``which``, negotiated."""
        from qemu.qmp.legacy import QEMUMonitorProtocol
        q = QEMUMonitorProtocol(self.a if which == "a" else self.b)
        q.connect(negotiate=True)
        return q

    def stop(self) -> None:
        _terminate(self.proc)
        self.log.close()


class Attached:
    """``sevmon serve --attach`` on QEMU's monitor ``a`` (``qemu_socket`` None: ``extra`` says where, e.g.
    ``--libvirt DOMAIN``)."""

    def __init__(self, tmp: Path, qemu_socket: str | None, *, hmp: bool = True, extra: list[str] | None = None):
        self.qmp_path = str(tmp / "sevmon-qmp.sock")
        self.hmp_path = str(tmp / "sevmon-hmp.sock") if hmp else None
        where = ["--attach", qemu_socket] if qemu_socket is not None else []
        cmd = [sys.executable, "-m", "sevmon", "serve", *where, "--qmp", self.qmp_path,
               *(["--hmp", self.hmp_path] if hmp else []), *(extra or [])]
        self.log = open(tmp / "sevmon.log", "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return  # start-up failed: the test reads output() and the exit status
            if os.path.exists(self.qmp_path) and (not hmp or os.path.exists(self.hmp_path)):
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(self.qmp_path)
                    return
                except OSError:
                    pass
                finally:
                    s.close()
            time.sleep(0.05)
        raise RuntimeError("sevmon did not start: " + self.output())

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def qmp(self):
        from qemu.qmp.legacy import QEMUMonitorProtocol
        q = QEMUMonitorProtocol(self.qmp_path)
        q.connect(negotiate=True)
        return q

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int:
        return _terminate(self.proc)


def _terminate(proc: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL after 20 s; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def hmp(q, line: str, cpu_index: int | None = None) -> str:
    args = {"command-line": line}
    if cpu_index is not None:
        args["cpu-index"] = cpu_index
    return q.cmd_obj({"execute": "human-monitor-command", "arguments": args})["return"]


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    # UNIX socket paths are limited to 108 bytes: keep them short
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="sevmon-live-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def paused_linux():
    """One real Linux guest for the kernel-tool tests (tests/live/test_kernel_dumps.py, test_drgn_live.py), booted once
    for the session (TCG boots are the expensive part): QEMU 7.2, 256 MiB (small: each SEV open of its dump encrypts
    all of it), RAM in a memfd (sevmon can attach), paused, and QEMU's own ``dump-guest-memory`` of it taken at once:
    the bytes the truth is read from (``truth``: drgn's view of that dump, tests/live/drgn_truth.py). A test that lets
    the guest run pauses it again; the dump stays as taken."""
    import tempfile
    from types import SimpleNamespace

    from tests.live.drgn_truth import truth_view
    require_drgn()
    vmlinux = require_debug_vmlinux()
    tmp = Path(tempfile.mkdtemp(prefix="sevmon-linux-"))
    qemu = Qemu(tmp, mem="256M")
    try:
        q = qemu.qmp("b")
        q.cmd("stop")
        dump = tmp / "qemu.elf"
        q.cmd("dump-guest-memory", paging=False, protocol=f"file:{dump}")
        yield SimpleNamespace(tmp=tmp, qemu=qemu, qmp=q, dump=dump, vmlinux=vmlinux,
                              truth=truth_view(dump, vmlinux, tmp / "truth.json"))
        with contextlib.suppress(Exception):
            q.close()
    finally:
        qemu.stop()
        shutil.rmtree(tmp, ignore_errors=True)
