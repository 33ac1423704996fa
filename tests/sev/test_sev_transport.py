"""The simulated classic Linux kernel: chunking and round trips (§2.1, §2.4, §7.9), errno and
the ``error`` field (§1.2), pinning, memlock, fault injection, and the real transport's refusal."""

from __future__ import annotations

import errno as E
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevmon.memory.ram import RAM
from sevmon.model import SimulatedHost, SimulatedKvm
from sevmon.model.sim_host import GUEST_HVA_BASE
from sevmon.sev import LinuxSevTransport, SevError, SevUnavailable, SevVm
from sevmon.sev.abi import (
    KVM_MEMORY_ENCRYPT_OP,
    KVM_MEMORY_ENCRYPT_REG_REGION,
    KvmEncRegion,
    KvmSevDbg,
    KvmSevGuestStatus,
    KvmSevLaunchStart,
    SevCmdId,
    SevRet,
)
from tests.sev.sev_helpers import IMAGE_GPA, new_vm, raw_op

A = IMAGE_GPA


class Spy:
    """Records every DBG command the kernel sends to the PSP as (kind, src, dst, length, commands)."""

    def __init__(self, vm: SevVm):
        self.calls = []
        psp = vm.kernel.host.psp
        real = psp.dbg_crypt

        def spy(**kw):
            self.calls.append(("ENC" if kw["encrypt"] else "DEC", kw["src"], kw["dst"], kw["length"],
                               kw.get("commands", 1)))
            return real(**kw)

        psp.dbg_crypt = spy


def guest_pa(vm: SevVm, gpa: int) -> int:
    return vm.kernel.mem.guest_hpa + gpa


# -- the §2.4 table ---------------------------------------------------------------------------
def test_dec_unaligned_two_pages_is_three_bounced_commands(image):
    vm = new_vm(image)
    spy, s0 = Spy(vm), vm.stats
    assert vm.dbg_decrypt(A + 8, 0x2000) == image[8:8 + 0x2000]
    d = vm.stats - s0
    assert (d.round_trips, d.firmware_calls) == (1, 3)
    assert [(k, src - guest_pa(vm, A), n) for k, src, _, n, _ in spy.calls] == \
        [("DEC", 0x0, 4096), ("DEC", 0x1000, 4096), ("DEC", 0x2000, 16)]
    assert d.bytes_decrypted == 4096 + 4096 + 16


def test_dec_aligned_three_pages_is_three_commands_one_engine_pass(image):
    vm = new_vm(image)
    spy, s0 = Spy(vm), vm.stats
    assert vm.dbg_decrypt(A, 0x3000) == image[:0x3000]
    d = vm.stats - s0
    assert (d.round_trips, d.firmware_calls, d.bytes_decrypted) == (1, 3, 0x3000)
    assert sum(c[4] for c in spy.calls) == 3


def test_dec_straddling_a_page_is_two_commands(image):
    vm = new_vm(image)
    spy, s0 = Spy(vm), vm.stats
    assert vm.dbg_decrypt(A + 0xFF8, 16) == image[0xFF8:0x1008]
    assert (vm.stats - s0).firmware_calls == 2
    assert [(src - guest_pa(vm, A), n) for _, src, _, n, _ in spy.calls] == [(0xFF0, 16), (0x1000, 16)]


def test_dec_both_unaligned_inside_a_block_is_one_command(image):
    vm = new_vm(image)
    k = vm.kernel
    buf = k.alloc(4096)
    spy, s0 = Spy(vm), vm.stats
    err, cmd, _ = raw_op(k, SevCmdId.DBG_DECRYPT, KvmSevDbg,
                         dict(src_uaddr=GUEST_HVA_BASE + A + 3, dst_uaddr=buf + 5, len=10))
    assert err == 0 and cmd.error == 0
    assert k.read(buf + 5, 10) == image[3:13]
    assert (vm.stats - s0).firmware_calls == 1
    assert [(src - guest_pa(vm, A), n) for _, src, _, n, _ in spy.calls] == [(0x0, 16)]


def classic_encrypt(vm: SevVm, gpa: int, data: bytes, *, dst_off: int | None = None) -> int:
    """One raw KVM_SEV_DBG_ENCRYPT as a naive caller would issue it: the whole request at once, the source buffer at
    page offset ``dst_off`` (default: the destination's). Returns the errno (0)."""
    k = vm.kernel
    off = (gpa & 4095) if dst_off is None else dst_off
    base = k.alloc(off + len(data))
    k.write(base + off, data)
    err, cmd, _ = raw_op(k, SevCmdId.DBG_ENCRYPT, KvmSevDbg,
                         dict(src_uaddr=base + off, dst_uaddr=GUEST_HVA_BASE + gpa, len=len(data)))
    k.free(base)
    return err


def test_the_simulated_kernel_drops_bytes_as_the_classic_rmw_does(image):
    """Bug (b): ENC 9 bytes to B+8 is DBG_DECRYPT(32) then DBG_ENCRYPT(16): byte 9 never reaches memory."""
    vm = new_vm(image)
    spy, s0 = Spy(vm), vm.stats
    assert classic_encrypt(vm, A + 8, b"ABCDEFGHI") == 0
    d = vm.stats - s0
    assert (d.firmware_calls, d.bytes_decrypted, d.bytes_encrypted) == (2, 32, 16)
    assert [(k, n) for k, _, _, n, _ in spy.calls] == [("DEC", 32), ("ENC", 16)]
    assert spy.calls[0][1] == spy.calls[1][2] == guest_pa(vm, A)
    got = vm.dbg_decrypt(A, 32)
    assert got[8:16] == b"ABCDEFGH"
    assert got[16] == image[16]              # dropped by bug (b)
    assert got[:8] == image[:8] and got[17:] == image[17:32]


def test_the_simulated_kernel_overruns_the_pinned_page_as_the_classic_one_does(image):
    """Bug (c) (the 2026 stable fix "Fix page overflow in sev_dbg_crypt() for ENCRYPT path"): chunks are cut at
    source pages only, so a destination at a larger page offset than its source is written past its pinned page."""
    vm = new_vm(image)
    host = vm.kernel.host
    assert classic_encrypt(vm, A + 0x800, bytes(0x1000), dst_off=0) == 0    # aligned: one command of 4 KiB
    assert host.dbg_overruns == [(GUEST_HVA_BASE + A + 0x800, 0x800)]
    host.dbg_overruns.clear()
    assert classic_encrypt(vm, A + 0xFF8, b"x" * 20, dst_off=0x10) == 0     # the RMW runs into the next page too
    assert host.dbg_overruns == [(GUEST_HVA_BASE + A + 0xFF8, 0x10)]


def test_sevmon_writes_exactly_with_its_own_read_modify_write(image):
    """The same 9 bytes through SevVm: one DBG_DECRYPT of the covering blocks, one aligned DBG_ENCRYPT of them."""
    vm = new_vm(image)
    spy, s0 = Spy(vm), vm.stats
    vm.dbg_encrypt(A + 8, b"ABCDEFGHI")
    d = vm.stats - s0
    assert (d.round_trips, d.firmware_calls, d.bytes_decrypted, d.bytes_encrypted) == (2, 2, 32, 32)
    assert [(k, n) for k, _, _, n, _ in spy.calls] == [("DEC", 32), ("ENC", 32)]
    assert vm.dbg_decrypt(A, 32) == image[:8] + b"ABCDEFGHI" + image[17:32]
    assert vm.kernel.host.dbg_overruns == []


@settings(max_examples=60, deadline=None)
@given(off=st.integers(0, 0x6000), data=st.binary(min_size=1, max_size=0x2400))
def test_every_sevmon_encrypt_is_exact_and_stays_inside_its_pages(off, data):
    """Any offset, any length up to 9 KiB, across pages: exactly the bytes written, nothing around them changed,
    and no request the classic kernel would let overrun a pinned page."""
    image = bytes(range(256)) * 256
    vm = new_vm(image)
    vm.dbg_encrypt(A + off, data)
    assert vm.dbg_decrypt(A, len(image)) == image[:off] + data + image[off + len(data):]
    assert vm.kernel.host.dbg_overruns == []


def test_a_failed_write_leaves_the_guest_as_it_was(image):
    """The third page's DBG_ENCRYPT fails: the two pages already written get their old plaintext back."""
    vm = new_vm(image)
    vm.kernel.fail_firmware_call(6, SevRet.INVALID_GUEST)   # DEC (3 pages: 3 commands), ENC p0, p1, p2 <- fails
    with pytest.raises(SevError) as ei:
        vm.dbg_encrypt(A + 8, b"\xee" * 0x2100)
    assert "DBG_ENCRYPT failed" in str(ei.value)
    assert vm.dbg_decrypt(A, len(image)) == image


@settings(max_examples=40, deadline=None)
@given(off=st.integers(0, 0xF000), n=st.integers(1, 0x3000))
def test_decrypt_any_alignment(off, n):
    image = os.urandom(0x10000)
    vm = new_vm(image)
    n = min(n, len(image) - off)
    s0 = vm.stats
    assert vm.dbg_decrypt(A + off, n) == image[off:off + n]
    d = vm.stats - s0
    assert d.round_trips == 1
    assert d.firmware_calls == ((A + off + n - 1) >> 12) - ((A + off) >> 12) + 1  # one per source page


def test_64_mib_aligned_read_is_one_ioctl():
    img = os.urandom(64 << 20)
    vm = new_vm(size=128 << 20)
    vm.launch([(0, img)])
    s0 = vm.stats
    assert vm.dbg_decrypt(0, 64 << 20) == img
    d = vm.stats - s0
    assert (d.round_trips, d.firmware_calls, d.bytes_decrypted) == (1, 16384, 64 << 20)


# -- errno and the error field ------------------------------------------------------------------
def test_policy_nodbg_is_eio_with_policy_failure(image):
    vm = new_vm(image, policy=0x1)
    with pytest.raises(SevError) as ei:
        vm.dbg_decrypt(A, 16)
    e = ei.value
    assert (e.errno, e.fw_error) == (E.EIO, SevRet.POLICY_FAILURE)
    assert str(e) == "SEV: DBG_DECRYPT failed: Policy is not allowed (fw error 7)"
    err, cmd, _ = raw_op(vm.kernel, SevCmdId.DBG_DECRYPT, KvmSevDbg,
                         dict(src_uaddr=GUEST_HVA_BASE + A, dst_uaddr=vm.kernel.alloc(16), len=16))
    assert err == E.EIO and cmd.error == 7  # the cmd is copied back on failure


def test_kernel_level_errors():
    k = SimulatedKvm()
    assert k.ioctl(k.vm_fd, KVM_MEMORY_ENCRYPT_OP, 0) == 0       # NULL: "is SEV enabled?"
    assert raw_op(k, SevCmdId.LAUNCH_START, KvmSevLaunchStart, {})[0] == E.ENOTTY   # before KVM_SEV_INIT
    reg = k.alloc(16)
    k.write(reg, KvmEncRegion.build(dict(addr=0x1000, size=0x1000)))
    with pytest.raises(OSError) as ei:
        k.ioctl(k.vm_fd, KVM_MEMORY_ENCRYPT_REG_REGION, reg)
    assert ei.value.errno == E.ENOTTY
    assert raw_op(k, SevCmdId.INIT)[0] == 0
    assert raw_op(k, SevCmdId.INIT)[0] == E.EINVAL               # already active
    assert raw_op(k, SevCmdId.ES_INIT)[0] == E.ENOTTY            # no SEV-ES ASIDs (min_asid 1)
    assert raw_op(k, SevCmdId.SEND_UPDATE_VMSA)[0] == E.EINVAL   # defined, never dispatched
    assert raw_op(k, 55)[0] == E.EINVAL
    assert raw_op(k, SevCmdId.SNP_LAUNCH_START)[0] == E.ENOTTY
    assert raw_op(k, SevCmdId.GUEST_STATUS, KvmSevGuestStatus, {})[0] == E.EBADF  # no /dev/sev fd stored yet
    assert raw_op(k, SevCmdId.LAUNCH_START, KvmSevLaunchStart, {}, sev_fd=99)[0] == E.EBADF
    err, cmd, out = raw_op(k, SevCmdId.LAUNCH_START, KvmSevLaunchStart, dict(policy=0))
    assert (err, cmd.error, out.handle) == (0, 0, 1)
    assert raw_op(k, SevCmdId.DBG_DECRYPT, KvmSevDbg, dict(src_uaddr=GUEST_HVA_BASE, dst_uaddr=reg, len=0))[0] \
        == E.EINVAL
    assert raw_op(k, SevCmdId.DBG_DECRYPT, KvmSevDbg, dict(src_uaddr=GUEST_HVA_BASE, dst_uaddr=0, len=16))[0] \
        == E.EINVAL
    assert raw_op(k, SevCmdId.DBG_DECRYPT, KvmSevDbg, dict(src_uaddr=2**64 - 8, dst_uaddr=reg, len=16))[0] \
        == E.EINVAL
    cmd = k.alloc(24)
    with pytest.raises(OSError) as ei:  # data points nowhere
        k.write(cmd, bytes(8) + (0xDEAD0000).to_bytes(8, "little") + bytes(8))
        k.write(cmd, (SevCmdId.DBG_DECRYPT).to_bytes(4, "little"))
        k.ioctl(k.vm_fd, KVM_MEMORY_ENCRYPT_OP, cmd)
    assert ei.value.errno == E.EFAULT
    with pytest.raises(OSError) as ei:
        k.ioctl(k.vm_fd, KVM_MEMORY_ENCRYPT_OP, 0xDEAD0000)
    assert ei.value.errno == E.EFAULT
    with pytest.raises(OSError) as ei:
        k.ioctl(k.vm_fd, 0x1234, 0)
    assert ei.value.errno == E.ENOTTY
    with pytest.raises(OSError) as ei:
        k.ioctl(12345, KVM_MEMORY_ENCRYPT_OP, 0)
    assert ei.value.errno == E.EBADF


def test_host_without_sev_says_enotty():
    k = SimulatedKvm(SimulatedHost(sev_enabled=False))
    with pytest.raises(OSError) as ei:
        k.ioctl(k.vm_fd, KVM_MEMORY_ENCRYPT_OP, 0)
    assert ei.value.errno == E.ENOTTY


def test_frame_that_is_not_ram_fails_to_pin(image):
    vm = new_vm(image)
    s0 = vm.stats
    with pytest.raises(SevError) as ei:
        vm.dbg_decrypt(A + len(image) - 16, 64)   # runs off the last frame of the image
    e = ei.value
    assert e.errno == E.ENOMEM and e.fw_error is None and e.gpa == A + len(image)
    assert "is not RAM" in str(e) and "0x110000" in str(e)
    d = vm.stats - s0
    assert (d.round_trips, d.firmware_calls) == (1, 1)  # the first chunk was decrypted before the pin failed
    with pytest.raises(SevError) as ei:
        vm.dbg_decrypt(0x500008, 8)                   # a frame never written
    assert ei.value.errno == E.ENOMEM and ei.value.gpa == 0x500008
    vm.ram.ensure((vm.ram.size >> 12) - 1)
    with pytest.raises(SevError) as ei:
        vm.dbg_decrypt(vm.ram.size - 16, 32)          # beyond guest RAM
    assert ei.value.errno == E.ENOMEM and ei.value.gpa == vm.ram.size


def test_memlock_leaves_no_room_for_dbg_pins():
    """REG_REGION pins all guest RAM; each DBG chunk needs 2 more pages of RLIMIT_MEMLOCK."""
    page = os.urandom(4096)
    ram = RAM(1 << 20)
    vm = SevVm(ram, kernel=SimulatedKvm(memlock_limit=ram.size + 4096))  # room for the 1-page launch only
    vm.launch([(0, page)])
    with pytest.raises(SevError) as ei:
        vm.dbg_decrypt(0, 16)
    assert ei.value.errno == E.ENOMEM
    vm2 = SevVm(RAM(1 << 20), kernel=SimulatedKvm(memlock_limit=(1 << 20) + 2 * 4096))
    vm2.launch([(0, page)])
    assert vm2.dbg_decrypt(0, 16) == page[:16]
    with pytest.raises(SevError) as ei:
        SevVm(RAM(1 << 20), kernel=SimulatedKvm(memlock_limit=4096))
    assert ei.value.errno == E.ENOMEM and "REG_REGION" in str(ei.value)


# -- fault injection --------------------------------------------------------------------------------
def test_fault_in_the_middle_of_a_batched_read(image):
    vm = new_vm(image)
    k = vm.kernel
    buf = k.alloc(0x10000)
    s0 = vm.stats
    k.fail_firmware_call(5, SevRet.HWSEV_RET_PLATFORM)
    err, cmd, _ = raw_op(k, SevCmdId.DBG_DECRYPT, KvmSevDbg,
                         dict(src_uaddr=GUEST_HVA_BASE + A, dst_uaddr=buf, len=0x10000))
    assert (err, cmd.error) == (E.EIO, SevRet.HWSEV_RET_PLATFORM)
    d = vm.stats - s0
    assert (d.firmware_calls, d.bytes_decrypted) == (5, 4 * 4096)
    assert k.read(buf, 4 * 4096) == image[:4 * 4096]      # commands 1-4 ran
    assert k.read(buf + 4 * 4096, 4096) == bytes(4096)     # command 5 failed, the loop stopped
    assert vm.dbg_decrypt(A, 0x10000) == image             # one-shot: the next read is fine


def test_fault_on_launch_start_and_on_the_rmw_encrypt(image):
    ram = RAM(1 << 20)
    kvm = SimulatedKvm()
    vm = SevVm(ram, kernel=kvm)
    kvm.fail_firmware_call(1, SevRet.RESOURCE_LIMIT)
    with pytest.raises(SevError) as ei:
        vm.launch([(0, image)])
    assert (ei.value.errno, ei.value.fw_error) == (E.EIO, 0x17)
    assert str(ei.value) == "sev_launch_start: LAUNCH_START ret=-1 fw_error=23 'Required firmware resource depleted'"
    assert vm.state_name == "uninit"
    vm.launch([(0, image)])
    kvm.fail_firmware_call(2, SevRet.INVALID_ADDRESS)  # the DBG_ENCRYPT after the RMW's DBG_DECRYPT
    with pytest.raises(SevError) as ei:
        vm.dbg_encrypt(3, b"xyz")
    assert ei.value.fw_error == SevRet.INVALID_ADDRESS
    assert vm.dbg_decrypt(0, 16) == image[:16]         # nothing was written
    with pytest.raises(ValueError):
        kvm.fail_firmware_call(0, 1)


# -- the real transport --------------------------------------------------------------------------
@pytest.mark.skipif(os.path.exists("/dev/sev"), reason="this host has /dev/sev")
def test_linux_transport_refuses_in_one_sentence():
    with pytest.raises(SevUnavailable) as ei:
        LinuxSevTransport()
    assert str(ei.value) == ("SEV is not available on this host: /dev/sev does not exist (needs an AMD EPYC "
                             "host with SEV enabled in the BIOS and the kvm_amd.sev=1 module parameter)")
    assert "\n" not in str(ei.value)


def test_linux_transport_names_the_missing_device(tmp_path):
    with pytest.raises(SevUnavailable) as ei:
        LinuxSevTransport(sev_path=str(tmp_path / "sev"))
    assert str(ei.value).startswith(f"SEV is not available on this host: {tmp_path / 'sev'} does not exist")


# -- ASIDs and teardown ------------------------------------------------------------------------------
def test_asids_are_recycled_only_after_df_flush(image):
    host = SimulatedHost(max_asid=2)
    a, b = new_vm(image, host=host), new_vm(image, host=host)
    assert {a.kernel.asid, b.kernel.asid} == {1, 2}
    with pytest.raises(SevError) as ei:
        new_vm(host=host)
    assert ei.value.errno == E.EBUSY                   # nothing to reclaim yet
    a.finish()
    a.close()                                           # DEACTIVATE + DECOMMISSION; ASID 1 to reclaim
    assert host.psp.guest_count == 1
    c = new_vm(image, host=host)                        # recycling runs DF_FLUSH, then ASID 1 is reused
    assert c.kernel.asid == 1 and c.dbg_decrypt(A, 64) == image[:64]


def test_linux_transport_plumbing_without_sev(tmp_path):
    """The real transport's own code (libc ioctl with pointer arguments, ctypes buffers, the
    guest RAM mapping) runs here; only the device is wrong, so the kernel says ENOTTY."""
    fake = tmp_path / "sev"
    fake.write_bytes(b"")
    null = os.open("/dev/null", os.O_RDWR)
    try:
        t = LinuxSevTransport(vm_fd=null, sev_path=str(fake))
        buf = t.alloc(24)
        t.write(buf, b"\x11" * 24)
        assert t.read(buf, 24) == b"\x11" * 24
        with pytest.raises(OSError) as ei:
            t.ioctl(t.vm_fd, KVM_MEMORY_ENCRYPT_OP, buf)
        assert ei.value.errno == E.ENOTTY
        ram = RAM(1 << 20)
        ram.write(0x3000, b"frame")
        base = t.map_guest_ram(ram)
        assert t.read(base + 0x3000, 5) == b"frame"
        with pytest.raises(SevUnavailable):
            t.guest_store(0, b"x")
        t.free(buf)
        t.close()
    finally:
        os.close(null)


def test_concurrent_debug_reads_are_serialised(image):
    import threading

    host = SimulatedHost()
    vms = [new_vm(image, host=host), new_vm(image, host=host)]
    errors = []

    def reader(vm):
        try:
            for i in range(30):
                off = (i * 4104) % (len(image) - 200)
                assert vm.dbg_decrypt(A + off, 200) == image[off:off + 200]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(vm,)) for vm in vms * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(vm.stats.round_trips for vm in vms) >= 120
