"""``sevmon check``: what it says on this machine (KVM, no SEV), on a faked SEV host tree, and about a running
QEMU (a real QEMU with a shared memfd backend, and a sevmon daemon standing in for an SEV QEMU's QMP)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from sevmon import check
from sevmon.sev.cpuid import LEAF, SEV, SEV_ES, SME

QEMU = shutil.which("qemu-system-x86_64")
on_kvm_without_sev = pytest.mark.skipif(not os.path.exists("/dev/kvm") or os.path.exists("/dev/sev"),
                                        reason="the sentence is for hosts with KVM and without SEV")
needs_qemu = pytest.mark.skipif(QEMU is None and os.environ.get("CI") != "true", reason="QEMU not installed")


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sevmon", "check", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})


@on_kvm_without_sev
def test_this_machine_kvm_without_sev():
    r = run_check()
    assert r.returncode == 1 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[-1] == "not ready: KVM is present but SEV is not (no /dev/sev, CPUID reports no SEV)"
    assert any(line.startswith("/dev/kvm") and " OK " in line for line in lines)
    assert any(line.startswith("/dev/sev") and "FAIL  /dev/sev does not exist" in line for line in lines)
    j = run_check("--json")
    assert j.returncode == 1
    doc = json.loads(j.stdout)
    assert doc["ready"] is False and doc["verdict"] == lines[-1]
    by = {c["name"]: c for c in doc["checks"]}
    assert by["/dev/sev"]["fix"].startswith("load ccp")
    assert by["QEMU guest policy"]["status"] == "skip"


def _fake_host(tmp_path, *, sev="Y", cbit=51, eax=SME | SEV | SEV_ES) -> check.Paths:
    params = tmp_path / "kvm_amd"
    params.mkdir()
    (params / "sev").write_text(sev + "\n")
    (params / "sev_es").write_text("Y\n")
    cpuid = tmp_path / "cpuid"
    with open(cpuid, "wb") as f:  # the cpuid driver reads leaf L at file offset L (a sparse file here)
        f.seek(LEAF)
        f.write(b"".join(x.to_bytes(4, "little") for x in (eax, (1 << 6) | cbit, 509, 100)))
    return check.Paths(kvm_amd=str(params), cpuid=str(cpuid), sev=str(tmp_path / "sev"))


def test_items_on_a_milan_like_host(tmp_path):
    p = _fake_host(tmp_path)
    assert [(i.name, i.status, i.detail) for i in check.check_kvm_amd(p)] == [
        ("kvm_amd sev", "ok", "sev=Y"), ("kvm_amd sev_es", "ok", "sev_es=Y")]
    c = check.check_cpuid(p)
    assert (c.status, c.detail) == ("ok", "SEV, SEV-ES; C-bit 51, reduced phys bits 1, ASIDs 100..509")
    s = check.check_dev_sev(p)
    assert (s.status, s.detail) == ("fail", f"{p.sev} does not exist")


def test_sev_off_in_kvm_amd_and_cpuid(tmp_path):
    p = _fake_host(tmp_path, sev="N", eax=SME)
    sev = check.check_kvm_amd(p)[0]
    assert (sev.status, sev.detail) == ("fail", "sev=N") and "kvm_amd sev=1" in sev.fix
    c = check.check_cpuid(p)
    assert c.status == "fail" and c.detail.startswith("SEV not reported")


def test_no_cpuid_driver_says_so(tmp_path):
    c = check.check_cpuid(check.Paths(cpuid=str(tmp_path / "nope")))
    assert c.status == "fail"
    assert "Python cannot execute the cpuid instruction itself" in c.detail and c.fix.startswith("modprobe cpuid")


def test_verdicts():
    item = check.Item
    ok = [item("/dev/kvm", "ok", ""), item("/dev/sev", "ok", ""), item("CPUID 0x8000001F", "ok", ""),
          item("x", "skip", "")]
    assert check.verdict(ok) == "ready: live SEV debugging can work on this host"
    assert check.verdict([*ok, item("memlock limit", "fail", "")]) == "not ready: memlock limit"
    assert check.verdict([item("/dev/kvm", "fail", ""), *ok[1:]]) == "not ready: KVM is not available"


def test_no_such_qemu_pid():
    items = check.check_qemu(check.Paths(), 999_999_999, None)
    assert [(i.name, i.status, i.detail) for i in items] == [("QEMU ptrace rights", "fail", "no process 999999999")]


def test_qemu_policy_from_qmp_of_a_debuggable_and_a_nodbg_guest(make_daemon):
    """sevmon's daemon answers query-sev as QEMU does: it stands in for an SEV QEMU's QMP socket."""
    d = make_daemon()
    items = {i.name: i for i in check.check_qemu(check.Paths(), d.proc.pid, d.qmp)}
    assert items["QEMU ptrace rights"].status == "ok"
    assert (items["QEMU VM fd"].status, items["QEMU RAM backend"].status) == ("fail", "fail")
    assert (items["QEMU guest policy"].status, items["QEMU guest policy"].detail) == (
        "ok", "policy 0x0: debugging allowed")
    nodbg = make_daemon("--policy", "0x1")
    pol = check._policy_item(nodbg.qmp)
    assert pol.status == "fail" and pol.detail.startswith("policy 0x1: NODBG set")
    assert check._policy_item(None).detail == "unknown: needs --qemu-qmp SOCKET to ask QEMU (query-sev)"


@needs_qemu
def test_real_qemu_with_a_shared_memfd_backend(tmp_path):
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen([QEMU, "-M", "pc", "-m", "16", "-S", "-display", "none", "-nodefaults",
                             "-object", "memory-backend-memfd,id=ram0,size=16M,share=on",
                             "-machine", "memory-backend=ram0", "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        r = run_check("--json", "--qemu-pid", str(proc.pid), "--qemu-qmp", str(sock))
        by = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
        assert r.returncode == 1
        assert by["QEMU ptrace rights"]["status"] == "ok"
        assert by["QEMU RAM backend"]["status"] == "ok" and "16 MiB" in by["QEMU RAM backend"]["detail"]
        assert by["QEMU VM fd"]["status"] == "fail"  # TCG: no KVM VM
        assert by["QEMU guest policy"]["status"] == "fail"  # no sev-guest
        assert by["QEMU guest policy"]["detail"] == "query-sev: SEV is not enabled for this guest"
    finally:
        proc.kill()
        proc.wait()
