"""sevmon attached to a domain that a real libvirtd runs (``serve --libvirt DOMAIN``): QEMU 7.2 under TCG, its
RAM in libvirt's shared memfd backing, libvirt's own monitor left to libvirt. On the same paused guest sevmon's
memory commands equal ``virsh qemu-monitor-command --hmp``; ``virsh suspend``/``resume`` reach sevmon's clients
as STOP/RESUME; when sevmon goes the domain stays libvirt's; ``quit`` ends it. One boot for the module.

libvirtd comes from ``.ci/libvirt`` (which ``.ci/run`` calls); without it these tests skip, and under
``CI=true`` fail."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.live.conftest import (
    BOOT_TIMEOUT,
    READY_MARKER,
    Attached,
    _missing,
    hmp,
    require_guest,
    require_qemu,
)

URI = "qemu:///system"
MEMFD = "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True, check=check,
                          timeout=120)


def require_libvirt() -> None:
    if shutil.which("virsh") is None or shutil.which("virt-qemu-qmp-proxy") is None:
        _missing("libvirt not installed (bash .ci/libvirt installs and starts it)")
    if virsh("version", check=False).returncode != 0:
        _missing(f"libvirtd does not answer at {URI} (bash .ci/libvirt starts it)")


def domain_xml(name: str, tmp: Path, *, memfd: bool = True, guest: bool = True) -> Path:
    """A TCG domain, 1 GiB, direct kernel boot of the live tests' guest, serial console in a file."""
    boot = ""
    if guest:
        kernel, initrd = require_guest()
        boot = (f"<kernel>{kernel}</kernel><initrd>{initrd}</initrd>"
                "<cmdline>console=ttyS0 panic=-1 quiet</cmdline>")
    xml = f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>1024</memory>
  <vcpu>1</vcpu>
  {MEMFD if memfd else ''}
  <os><type arch='x86_64' machine='pc'>hvm</type>{boot}</os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>{require_qemu()}</emulator>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='{tmp / (name + ".serial")}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""
    path = tmp / f"{name}.xml"
    path.write_text(xml)
    return path


def boot_domain(name: str, tmp: Path) -> None:
    """``virsh create`` (a transient domain: gone once it ends) and wait for the guest's ready marker."""
    virsh("create", str(domain_xml(name, tmp)))
    serial = tmp / f"{name}.serial"
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        if serial.exists() and READY_MARKER in serial.read_text(errors="replace"):
            return
        time.sleep(0.2)
    virsh("destroy", name, check=False)
    raise RuntimeError("the libvirt domain's guest did not print its ready marker in time")


def their_hmp(name: str, line: str) -> str:
    """QEMU's own answer through libvirt's monitor (virsh ends it with one extra newline)."""
    out = virsh("qemu-monitor-command", "--hmp", name, line).stdout
    return out[:-1] if out.endswith("\n") else out


def ours(q, line: str) -> str:
    return hmp(q, line).replace("\r\n", "\n")


@pytest.fixture(scope="module")
def domain(module_tmp):
    require_libvirt()
    name = f"sevmon-test-{os.getpid()}"
    boot_domain(name, module_tmp)
    yield name
    virsh("destroy", name, check=False)


@pytest.fixture(scope="module")
def attached(domain, module_tmp):
    sevmon = Attached(module_tmp, None, extra=["--libvirt", domain, "--connect", URI])
    assert sevmon.proc.poll() is None, sevmon.output()
    q = sevmon.qmp()
    yield sevmon, q
    with contextlib.suppress(Exception):
        q.close()
    sevmon.stop()


def _events(q, name: str, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    seen: list[dict] = []
    while time.monotonic() < deadline:
        seen += q.get_events(wait=1.0) or []
        if any(e["event"] == name for e in seen):
            return seen
    raise AssertionError(f"no {name} event within {timeout} s (got {seen})")


def test_memory_commands_equal_qemus_through_libvirt(domain, attached):
    sevmon, q = attached
    assert q.cmd_obj({"execute": "query-version"})["return"]["qemu"]["major"] == 7  # QEMU's, not libvirt's 9
    virsh("suspend", domain)
    assert [e for e in _events(q, "STOP") if e["event"] == "STOP"]
    assert q.cmd_obj({"execute": "query-status"})["return"]["status"] == "paused"
    tlb = their_hmp(domain, "info tlb")
    assert tlb.count("\n") > 1000
    assert ours(q, "info tlb") == tlb
    assert ours(q, "info mem") == their_hmp(domain, "info mem")
    lines = [ln for ln in tlb.split("\n") if ln and int(ln.split(": ")[1].split()[0], 16) < 1 << 30]
    for ln in (lines[0], lines[len(lines) // 2], lines[-1]):
        va, rest = ln.split(": ")
        gpa = int(rest.split()[0], 16)
        for line in (f"gva2gpa 0x{va}", f"x /8xg 0x{va}", f"x /16xb 0x{int(va, 16) + 0x7f8:x}",
                     f"xp /4xw 0x{gpa:x}", f"xp /2xg 0x{gpa + 0xff8:x}"):
            assert ours(q, line) == their_hmp(domain, line), line
    virsh("resume", domain)
    assert [e for e in _events(q, "RESUME") if e["event"] == "RESUME"]
    assert q.cmd_obj({"execute": "query-status"})["return"]["status"] == "running"


def test_device_memory_is_read_by_qemu(domain, attached):
    """Not RAM: the local APIC (at its fixmap VA too), the IOAPIC, the HPET; QEMU reads them, as its own x/xp
    do, and the answer is QEMU's byte for byte; past the end of everything, QEMU's Cannot access memory."""
    sevmon, q = attached
    virsh("suspend", domain)
    _events(q, "STOP")
    try:
        assert "fee00000" in ours(q, "gva2gpa 0xffffffffff5fd000")  # Linux maps the APIC there
        for line in ("x /4xw 0xffffffffff5fd000", "x /8xw 0xffffffffff5fd020", "xp /4xw 0xfee00000",
                     "xp /8xw 0xfee00030", "xp /2xw 0xfec00000", "xp /2xg 0xfed00000", "xp /16xb 0xfed000f0",
                     "xp /2xg 0xffffff000000"):
            theirs = their_hmp(domain, line)
            assert ours(q, line) == theirs, line
        assert "Cannot access memory" not in ours(q, "xp /4xw 0xfee00000")
        assert "Cannot access memory" in ours(q, "xp /2xg 0xffffff000000")
    finally:
        virsh("resume", domain)
        _events(q, "RESUME")


def _proxies(domain: str) -> list[str]:
    out = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if "virt-qemu-qmp-proxy" in ln and domain in ln]


def test_detach_leaves_the_domain_to_libvirt(domain, attached, module_tmp):
    sevmon, q = attached
    assert _proxies(domain)
    assert sevmon.stop() == 0, sevmon.output()
    assert not os.path.exists(sevmon.qmp_path)
    assert not _proxies(domain)  # sevmon's proxy went with it
    assert virsh("domstate", domain).stdout.strip() == "running"
    virsh("suspend", domain)  # libvirt still manages it
    assert virsh("domstate", domain).stdout.strip() == "paused"
    virsh("resume", domain)
    assert virsh("domstate", domain).stdout.strip() == "running"


def test_attach_through_any_proxy_needs_qemus_pid(domain, module_tmp):
    """``--attach SOCKET`` on a proxy's socket: the socket's peer is the proxy, so sevmon says to name QEMU's
    process; with ``--qemu-pid`` it attaches as ``--libvirt`` does."""
    sock = module_tmp / "proxy.sock"
    python = sys.executable if importlib.util.find_spec("libvirt") else "/usr/bin/python3"
    proxy = subprocess.Popen([python, shutil.which("virt-qemu-qmp-proxy"), "--connect", URI, domain, str(sock)])
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        err = _refused(module_tmp, "--attach", str(sock))
        assert f"the process behind {sock}, {proxy.pid}" in err and "--qemu-pid PID" in err
        pid = _qemu_pid(domain)  # libvirt's own record of it
        sevmon = Attached(module_tmp, str(sock), extra=["--qemu-pid", str(pid)])
        try:
            assert sevmon.proc.poll() is None, sevmon.output()
            q = sevmon.qmp()
            virsh("suspend", domain)
            _events(q, "STOP")
            assert ours(q, "info mem") == their_hmp(domain, "info mem")
            virsh("resume", domain)
            q.close()
        finally:
            assert sevmon.stop() == 0, sevmon.output()
    finally:
        proxy.terminate()
        proxy.wait()
    assert virsh("domstate", domain).stdout.strip() == "running"


def _qemu_pid(domain: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text())


def test_quit_ends_the_domain_and_sevmon(domain, module_tmp):
    sevmon = Attached(module_tmp, None, extra=["--libvirt", domain, "--connect", URI])
    assert sevmon.proc.poll() is None, sevmon.output()
    q = sevmon.qmp()
    assert q.cmd_obj({"execute": "quit"}) == {"return": {}}
    shutdown = [e for e in _events(q, "SHUTDOWN") if e["event"] == "SHUTDOWN"]
    assert shutdown[0]["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert sevmon.wait() == 0, sevmon.output()
    with contextlib.suppress(Exception):
        q.close()
    assert not os.path.exists(sevmon.qmp_path)
    assert virsh("domstate", domain, check=False).returncode != 0  # a transient domain: gone
    assert not _proxies(domain)


def _refused(tmp: Path, *args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "sevmon", "serve", *args, "--qmp",
                        str(tmp / "r.sock")], capture_output=True, text=True, timeout=120, cwd=tmp)
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert not (tmp / "r.sock").exists()
    return p.stderr


def test_refusals_each_in_one_sentence(module_tmp):
    require_libvirt()
    tmp = module_tmp
    assert "no domain 'sevmon-nosuch'" in _refused(tmp, "--libvirt", "sevmon-nosuch", "--connect", URI)
    err = _refused(tmp, "--libvirt", "x", "--connect", "qemu+unix:///system?socket=/nonexistent/sock")
    assert "libvirt is unreachable at qemu+unix:///system?socket=/nonexistent/sock" in err
    name = f"sevmon-off-{os.getpid()}"
    virsh("define", str(domain_xml(name, tmp, guest=False)))
    try:
        assert f"domain '{name}' is not running (shut off)" in _refused(tmp, "--libvirt", name, "--connect", URI)
    finally:
        virsh("undefine", name, check=False)
    name = f"sevmon-private-{os.getpid()}"
    virsh("create", "--paused", str(domain_xml(name, tmp, memfd=False, guest=False)))
    try:
        err = _refused(tmp, "--libvirt", name, "--connect", URI)
        assert MEMFD in err and f"virsh edit {name}" in err
    finally:
        virsh("destroy", name, check=False)
