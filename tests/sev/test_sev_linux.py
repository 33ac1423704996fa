"""The real-hardware transport (sevmon/sev/linux.py), driven on this machine as far as it goes: a real /dev/kvm VM,
page-aligned buffers, real ioctls; the kernel split rule it counts by, held equal to the simulated kernel's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sevmon.memory.ram import RAM
from sevmon.model.sim_host import GUEST_HVA_BASE
from sevmon.sev import LinuxSevTransport, SevError, SevUnavailable, SevVm
from sevmon.sev import linux as linux_mod
from sevmon.sev.abi import KVM_MEMORY_ENCRYPT_OP, PAGE_SIZE, KvmSevCmd, KvmSevDbg, SevCmdId
from sevmon.sev.cpuid import SevCpuid
from sevmon.sev.dbgsplit import classic_dbg_cost, crosses_destination_page
from tests.sev.sev_helpers import IMAGE_GPA, new_vm, raw_op


def _kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return True
    except OSError:
        return False


needs_kvm = pytest.mark.skipif(not _kvm_usable(), reason="this machine has no usable /dev/kvm")
no_sev = pytest.mark.skipif(os.path.exists("/dev/sev"), reason="this host has SEV: the no-SEV sentences do not apply")


@settings(max_examples=80, deadline=None)
@given(s_off=st.integers(0, 0x1FFF), d_off=st.integers(0, 0x1FFF), n=st.integers(1, 0x2100), encrypt=st.booleans())
def test_split_rule_counts_what_the_simulated_kernel_does(s_off, d_off, n, encrypt):
    """The hardware transport's firmware-call and byte counts equal the model's for any request geometry
    (requests whose destination would overrun a user page, bug (c), are left out: they corrupt the caller)."""
    image = os.urandom(0x6000)
    vm = new_vm(image)
    k = vm.kernel
    buf = k.alloc(0x2000 + n)
    if encrypt:
        src, dst = buf + s_off, GUEST_HVA_BASE + IMAGE_GPA + d_off
    else:
        src, dst = GUEST_HVA_BASE + IMAGE_GPA + s_off, buf + d_off
        assume(not crosses_destination_page(src, dst, n))
    s0 = k.stats.snapshot()
    err, cmd, _ = raw_op(k, SevCmdId.DBG_ENCRYPT if encrypt else SevCmdId.DBG_DECRYPT, KvmSevDbg,
                         dict(src_uaddr=src, dst_uaddr=dst, len=n))
    assert (err, cmd.error) == (0, 0)
    d = k.stats - s0
    assert (d.firmware_calls, d.bytes_decrypted, d.bytes_encrypted) == classic_dbg_cost(src, dst, n, encrypt=encrypt)


def test_libc_ioctl_is_bound_once():
    with pytest.raises(OSError):
        linux_mod._libc_ioctl(-1, 0, 0)
    fn = linux_mod._ioctl_fn
    with pytest.raises(OSError):
        linux_mod._libc_ioctl(-1, 0, 0)
    assert fn is not None and linux_mod._ioctl_fn is fn


@no_sev
def test_no_dev_sev_is_one_sentence():
    with pytest.raises(SevUnavailable) as ei:
        LinuxSevTransport()
    assert str(ei.value).startswith("SEV is not available on this host: /dev/sev does not exist")


@needs_kvm
def test_real_transport_on_real_kvm_without_sev(tmp_path):
    """Everything up to the PSP: a real VM from /dev/kvm, page-aligned mmap buffers, a real KVM_MEMORY_ENCRYPT_OP
    (which a host without SEV refuses), the counts, and SevVm's one-sentence failure. /dev/null stands in for
    /dev/sev, which this machine lacks."""
    t = LinuxSevTransport(sev_path="/dev/null")
    try:
        bufs = [t.alloc(n) for n in (1, 16, PAGE_SIZE, PAGE_SIZE + 1, 3 * PAGE_SIZE)]
        assert all(b % PAGE_SIZE == 0 for b in bufs)
        t.write(bufs[4] + PAGE_SIZE - 3, b"abcdef")
        assert t.read(bufs[4] + PAGE_SIZE - 3, 6) == b"abcdef"
        dbg, cmd = t.alloc(KvmSevDbg.sizeof()), t.alloc(KvmSevCmd.sizeof())
        t.write(dbg, KvmSevDbg.build(dict(src_uaddr=bufs[4], dst_uaddr=bufs[3], len=16)))
        t.write(cmd, KvmSevCmd.build(dict(id=SevCmdId.DBG_DECRYPT, data=dbg, sev_fd=t.sev_fd)))
        with pytest.raises(OSError) as ei:
            t.ioctl(t.vm_fd, KVM_MEMORY_ENCRYPT_OP, cmd)
        assert ei.value.errno != 0
        assert (t.stats.round_trips, t.stats.firmware_calls) == (1, 0)  # refused: no firmware command counted
        for b in bufs:
            t.free(b)
    finally:
        t.close()
    with pytest.raises((SevError, SevUnavailable)) as ei:  # the C-bit check (CPUID says 0 here), or no cpuid driver
        SevVm(RAM(1 << 20), kernel=LinuxSevTransport(sev_path="/dev/null"))
    msg = str(ei.value)
    assert "\n" not in msg and (msg.startswith("SEV: cbitpos check failed, host '0'")
                                or msg.startswith("cannot read CPUID Fn8000_001F"))


def test_kvm_cbitpos_comes_from_the_host(monkeypatch):
    import argparse

    from sevmon.cli import add_guest_options, guest_spec

    p = argparse.ArgumentParser()
    add_guest_options(p)
    monkeypatch.setattr(linux_mod, "host_cpuid", lambda path="": SevCpuid.make(cbitpos=51))
    assert guest_spec(p.parse_args(["--kvm", "--core", "x"])).sev is None  # an image without --sev is plain
    assert guest_spec(p.parse_args(["--kvm", "--core", "x", "--sev"])).sev.cbitpos == 51  # Milan/Genoa
    assert guest_spec(p.parse_args(["--kvm", "--core", "x", "--sev", "--cbitpos", "47"])).sev.cbitpos == 47
    assert guest_spec(p.parse_args([])).sev.cbitpos == 47  # the platform model
    monkeypatch.setattr(linux_mod, "host_cpuid", lambda path="": SevCpuid(0, 0, 0, 0))  # no SEV: keep 47
    assert guest_spec(p.parse_args(["--kvm"])).sev.cbitpos == 47


def test_builtin_guest_under_kvm_is_one_sentence(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sevmon", "serve", "--kvm", "--qmp", str(tmp_path / "q.sock")],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "sevmon: --kvm needs a guest image (--core or --raw): the built-in guest runs only on the SEV platform "
        "model, it has no vCPU on real KVM"]


def test_bench_latency_daemon_gets_kvm_too():
    import argparse

    from sevmon.bench.run import _guest_argv

    args = argparse.Namespace(core="c.elf", raw=None, cpu_state=None, sev=True, policy=0, cbitpos=None,
                              paging="4", kvm=True)
    argv = _guest_argv(args)
    assert "--kvm" in argv and "--cbitpos" not in argv
