"""``sevmon check``: what it says on this machine (KVM, no SEV), on a faked SEV host tree, and about a running
QEMU (a real QEMU with a shared memfd backend, and a sevmon daemon standing in for an SEV QEMU's QMP)."""

from __future__ import annotations

import contextlib
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


def _check_qemu(tmp_path, backend: str):
    """``sevmon check --json`` against a real QEMU (TCG, 16 MiB, paused) whose RAM is ``backend``: (QEMU's
    process, for the caller to kill; check's result)."""
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen([QEMU, "-M", "pc", "-m", "16", "-S", "-display", "none", "-nodefaults",
                             "-object", backend, "-machine", "memory-backend=ram0",
                             "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        if sock.exists():
            break
        time.sleep(0.05)
    try:
        return proc, run_check("--json", "--qemu-pid", str(proc.pid), "--qemu-qmp", str(sock))
    except BaseException:
        proc.kill()
        proc.wait()
        raise


@needs_qemu
def test_real_qemu_with_a_shared_memfd_backend(tmp_path):
    proc, r = _check_qemu(tmp_path, "memory-backend-memfd,id=ram0,size=16M,share=on")
    try:
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


# -- issue 19, finding 5: sevmon check tells the truth ------------------------------------------------------
@pytest.mark.parametrize("release,status,words", [
    ("6.8.0-45-generic", "ok", "mirror VMs can issue debug commands (5.15 and later)"),
    ("5.15.0", "ok", "(5.15 and later)"),
    ("5.14.10-300.fc35.x86_64", "ok", "5.14.10+ stable carries 5.15's fixes"),
    ("5.14.9", "fail", "mirror VMs exist (5.13) but copy only the ASID, not the guest's handle and /dev/sev fd: "
                       "every command on a mirror fails with EINVAL"),
    ("5.13.0", "fail", "every command on a mirror fails with EINVAL"),
    ("5.10.0-28-amd64", "fail", "no mirror VMs before 5.13"),
])
def test_the_running_kernel_is_judged_by_what_mirror_vms_need(tmp_path, release, status, words):
    f = tmp_path / "osrelease"
    f.write_text(release + "\n")
    item = check.check_kernel(check.Paths(osrelease=str(f)))
    assert item.status == status and item.detail.startswith(f"Linux {release}: ") and words in item.detail
    if status == "fail":
        assert item.fix.startswith("Linux 5.15 or later, or a 5.14 stable from 5.14.10")


def test_this_machine_s_kernel_and_the_capability_probe_say_what_they_are():
    r = run_check("--json")
    by = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert by["running kernel"]["detail"].startswith(f"Linux {os.uname().release}: ")
    cap = by["KVM_CAP_VM_COPY_ENC_CONTEXT_FROM"]
    if cap["status"] == "ok":   # every x86 KVM of 5.13+ says 1, with or without SEV
        assert "this kernel knows mirror VMs (5.13 and later)" in cap["detail"]
        assert "it says nothing about SEV" in cap["detail"]
    assert by["memlock for --kvm"]["status"] == "ok" and "serve --kvm" in by["memlock for --kvm"]["detail"]


def test_memlock_for_kvm_without_cap_ipc_lock_gives_the_room_in_mib(tmp_path):
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "status").write_text("Name:\tx\nCapEff:\t0000000000000000\n")
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = 4 << 20 if hard == resource.RLIM_INFINITY else min(hard, 4 << 20)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, hard))
    try:
        item = check.check_kvm_memlock(check.Paths(proc=str(tmp_path)))
    finally:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))
    assert item.detail == (f"serve --kvm pins all of an image's RAM: under this limit ({limit >> 10} KiB, no "
                           f"CAP_IPC_LOCK) images of up to {(limit - 8192) >> 20} MiB of RAM fit; raise it with "
                           "ulimit -l")


def test_shm_and_hugetlbfs_file_backends_are_shared_memory(tmp_path):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "42").mkdir()
    (proc / "self" / "mounts").write_text("hugetlbfs /dev/hugepages1G hugetlbfs rw,pagesize=1024M 0 0\n")
    for path in ("/dev/shm/vm1-ram", "/dev/hugepages1G/libvirt/qemu/ram0"):
        (proc / "42" / "maps").write_text(
            "7f0000000000-7f0000100000 rw-p 00000000 00:00 0 \n"
            f"7f1000000000-7f1040000000 rw-s 00000000 00:1a 123 {path}\n")
        item = check._backend_item(check.Paths(proc=str(proc)), 42, {})
        assert (item.status, item.detail) == ("ok", f"shared mapping of 1024 MiB: {path}")
    (proc / "42" / "maps").write_text("7f1000000000-7f1040000000 rw-s 00000000 00:05 9 /dev/dri/card0\n")
    assert check._backend_item(check.Paths(proc=str(proc)), 42, {}).status == "fail"   # a device is not RAM


@needs_qemu
def test_real_qemu_with_a_dev_shm_file_backend(tmp_path):
    shm = f"/dev/shm/sevmon-check-{os.getpid()}"
    proc, r = _check_qemu(tmp_path, f"memory-backend-file,id=ram0,size=16M,mem-path={shm},share=on")
    try:
        by = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
        assert (by["QEMU RAM backend"]["status"], by["QEMU RAM backend"]["detail"]) == (
            "ok", f"shared mapping of 16 MiB: {shm}")
        assert (by["QEMU guest type"]["status"], by["QEMU guest type"]["detail"]) == ("fail", "not an SEV guest")
    finally:
        proc.kill()
        proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(shm)


def _fake_qemu_guest_items(tmp_path, kind: str) -> list:
    """check's guest items against the stand-in QEMU (tests/attach/fake_sev_qemu.py) answering for ``kind``."""
    sock = tmp_path / f"qemu-{kind}.sock"
    fake = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "..", "attach",
                                                          "fake_sev_qemu.py"), str(sock), kind])
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        return check._guest_items(str(sock))
    finally:
        fake.kill()
        fake.wait()


def test_guest_type_sev_and_sev_es_from_the_policy_bits(make_daemon, tmp_path):
    """QEMU 7.2 has no sev-type: the type comes from the policy's ES bit (sevmon's daemon stands in for SEV)."""
    sev = check._guest_items(make_daemon().qmp)
    assert [(i.name, i.status, i.detail) for i in sev] == [
        ("QEMU guest type", "ok", "SEV (policy 0x0, no ES bit)"),
        ("QEMU guest policy", "ok", "policy 0x0: debugging allowed")]
    es = _fake_qemu_guest_items(tmp_path, "es")[0]
    assert es.status == "fail" and es.detail.startswith("SEV-ES (policy 0x5, ES bit set): its registers are in "
                                                        "the encrypted VMSA")


def test_an_snp_guest_is_named_with_why_it_cannot_be_debugged(tmp_path):
    kind, policy = _fake_qemu_guest_items(tmp_path, "snp")
    assert (kind.status, kind.detail) == ("fail", "SEV-SNP (sev-type sev-snp): the guest is an SEV-SNP guest: "
                                                  "upstream KVM refuses the SEV debug commands (DBG_DECRYPT, "
                                                  "DBG_ENCRYPT) for SNP guests (-EPERM), so live debugging needs a "
                                                  "patched kernel")
    assert (policy.status, policy.detail) == ("skip", "snp-policy 0x30000: an SNP guest, see QEMU guest type")
