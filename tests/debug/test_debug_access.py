"""The debug path on a live guest: cache coherence with the running workload, debug
writes through DBG_ENCRYPT, shared pages, dumps that load back, and the round-trip
counters a user reads with query-sev-debug-stats."""

from __future__ import annotations

import re
import time

from sevmon.machine.builtin_guest import LAYOUTS
from tests.conftest import hmp, qmp_connect


def tick_of(q, gpa):
    text = hmp(q, f"xp /8c {gpa:#x}")
    return "".join(re.findall(r"'(.)'", text))


def test_running_guest_is_never_stale_and_paused_cache_persists(daemon):
    q = qmp_connect(daemon)
    va = LAYOUTS["4level"].workload
    seen_mapped, seen_unmapped, ticks = 0, 0, set()
    deadline = time.monotonic() + 20
    while (seen_mapped < 2 or seen_unmapped < 2 or len(ticks) < 3) and time.monotonic() < deadline:
        out = hmp(q, f"gva2gpa {va:#x}")
        if out.startswith("gpa: "):
            seen_mapped += 1
            gpa = int(out.split()[1], 16)
            t = tick_of(q, gpa)
            assert t.startswith("tick "), t
            ticks.add(t)
        else:
            assert out == "Unmapped\r\n"
            seen_unmapped += 1
        time.sleep(0.06)
    assert seen_mapped >= 2 and seen_unmapped >= 2 and len(ticks) >= 3
    # paused: the guest does not run, the cache persists, repeats cost no round trip
    q.cmd("stop")
    first = hmp(q, "info tlb")
    s1 = q.cmd("query-sev-debug-stats")
    assert hmp(q, "info tlb") == first and hmp(q, "info mem")
    s2 = q.cmd("query-sev-debug-stats")
    assert s2["round-trips"] == s1["round-trips"] and s2["cache-hits"] > s1["cache-hits"]
    # cont invalidates: the next command decrypts again
    q.cmd("cont")
    hmp(q, "info tlb")
    assert q.cmd("query-sev-debug-stats")["round-trips"] > s2["round-trips"]
    q.close()


def test_shared_page_is_read_plain_and_private_pages_are_ciphertext_at_rest(make_daemon):
    d = make_daemon("--no-workload")
    q = qmp_connect(d)
    tlb = hmp(q, "info tlb")
    assert "user page" not in tlb
    gpa = int(hmp(q, "gva2gpa 0x400000").split()[1], 16)
    assert "user page 0" in "".join(re.findall(r"'(.)'", hmp(q, f"xp /12c {gpa:#x}")))
    shared_va = 0xFFFFC90000000000 + (64 << 21)
    sgpa = int(hmp(q, f"gva2gpa {shared_va:#x}").split()[1], 16)
    text = "".join(re.findall(r"'(.)'", hmp(q, f"x /6c {shared_va:#x}")))
    assert text.startswith("shared (unencrypted)")  # /c with sticky size w reads 4x (QEMU quirk)
    # xp decrypts (private): the plaintext shared page comes out as garbage
    assert "shared" not in "".join(re.findall(r"'(.)'", hmp(q, f"xp /6c {sgpa:#x}")))
    q.close()


def test_dump_detached_progress_event_and_reload(make_daemon, tmp_path):
    d = make_daemon("--no-workload")
    q = qmp_connect(d)
    before = hmp(q, "info mem")
    path = tmp_path / "guest.elf"
    q.cmd("dump-guest-memory", paging=False, protocol=f"file:{path}", detach=True)
    deadline = time.monotonic() + 60
    while q.cmd("query-dump")["status"] == "active" and time.monotonic() < deadline:
        time.sleep(0.05)
    result = q.cmd("query-dump")
    assert result["status"] == "completed" and result["completed"] == result["total"] > 0
    events = [e for e in q.get_events(wait=5) if e["event"] == "DUMP_COMPLETED"]
    assert events and events[0]["data"]["result"]["status"] == "completed"
    assert q.cmd("query-status")["status"] == "running"
    q.close()
    # The plaintext dump still holds the guest's own C-bits in its tables: reopen it as
    # an SEV guest (sevmon strips the C-bit) to see the same mappings.
    d2 = make_daemon("--core", str(path), "--sev", hmp=False)
    q2 = qmp_connect(d2)
    assert hmp(q2, "info mem") == before
    gpa = int(hmp(q2, "gva2gpa 0x400000").split()[1], 16)
    assert "user page 0" in "".join(re.findall(r"'(.)'", hmp(q2, f"xp /12c {gpa:#x}")))
    q2.close()


def test_memsave_pmemsave_errors_in_qemus_words(daemon, tmp_path):
    q = qmp_connect(daemon)
    r = q.cmd_obj({"execute": "pmemsave", "arguments": {"val": 0, "size": 16, "filename": "/nonexistent-dir/x"}})
    assert r["error"]["desc"] == "Could not open '/nonexistent-dir/x': No such file or directory"
    r = q.cmd_obj({"execute": "memsave", "arguments": {"val": -1, "size": 16, "filename": str(tmp_path / "m")}})
    assert r["error"]["desc"] == "Invalid addr 0xffffffffffffffff/size 16 specified"
    r = q.cmd_obj({"execute": "memsave", "arguments": {"val": 0, "size": 16, "filename": "/dev/null",
                                                        "cpu-index": 5}})
    assert r["error"]["desc"] == "Parameter 'cpu-index' expects a CPU number"
    f = tmp_path / "text.bin"
    q.cmd("memsave", val=0x400000, size=8192, filename=str(f))
    data = f.read_bytes()
    assert len(data) == 8192 and data.startswith(b"user page 0") and data[4096:].startswith(b"user page 1")
    q.close()


def test_debug_write_goes_through_dbg_encrypt_and_keeps_the_cache_coherent():
    from sevmon.machine.builder import build_machine
    from sevmon.machine.spec import GuestSpec

    m = build_machine(GuestSpec(workload=False))
    mem, sev = m.memory, m.sev
    gpa = 0x1000000 + 0x40
    before = mem.read(gpa, 16)                       # now cached
    at_rest = bytes(m.ram.frame(gpa >> 12))
    stats = sev.stats
    mem.write(gpa + 3, b"patched by the debugger")   # unaligned: sevmon's own read-modify-write
    after = sev.stats
    # one DBG_DECRYPT of the two 16-byte blocks it touches, one aligned DBG_ENCRYPT of both
    assert after.round_trips - stats.round_trips == 2
    assert (after.bytes_decrypted - stats.bytes_decrypted, after.bytes_encrypted - stats.bytes_encrypted) == (32, 32)
    assert mem.read(gpa, 26) == before[:3] + b"patched by the debugger"  # served from the patched cache
    assert sev.stats.round_trips == after.round_trips
    assert bytes(m.ram.frame(gpa >> 12)) != at_rest and b"patched" not in bytes(m.ram.frame(gpa >> 12))
    mem.invalidate()                                 # and the firmware agrees after a fresh decrypt
    assert mem.read(gpa + 3, 23) == b"patched by the debugger"


def test_a_failed_debug_write_leaves_guest_and_cache_as_they_were():
    import pytest

    from sevmon.debug.ops import DebugFailed
    from sevmon.machine.builder import build_machine
    from sevmon.machine.spec import GuestSpec

    m = build_machine(GuestSpec(workload=False))
    mem = m.memory
    gpa = 0x1000000 + 0xFF8                          # 2 pages: DBG_DECRYPT (2 commands), ENC page 0, ENC page 1
    before = mem.read(gpa, 32)                        # cached
    m.sev.kernel.fail_firmware_call(4, 0x10)          # the second page's DBG_ENCRYPT fails
    with pytest.raises(DebugFailed) as ei:
        mem.write(gpa, b"\xee" * 32)
    assert "DBG_ENCRYPT failed" in ei.value.reason
    assert mem.read(gpa, 32) == before                # what the cache holds now...
    mem.invalidate()
    assert mem.read(gpa, 32) == before                # ...is what the firmware decrypts


def test_a_virtual_write_whose_second_run_fails_puts_the_first_back():
    """gdb's M/X over two pages in different frames: two runs; the second fails, the first is restored."""
    import pytest

    from sevmon.debug.ops import DebugFailed
    from sevmon.debug.refusal import cbit_mask
    from sevmon.machine.builder import build_machine
    from sevmon.machine.spec import GuestSpec
    from sevmon.x86.translation import physical_runs, read_virtual, write_virtual

    m = build_machine(GuestSpec(workload=False))
    cpu, mask, va = m.cpus[0], cbit_mask(m), 0x400FF8
    assert len(physical_runs(m.memory, cpu, va, 16, mask)) == 2
    before = read_virtual(m.memory, cpu, va, 16, mask)       # the pages are cached now
    m.sev.kernel.fail_firmware_call(4, 0x10)                 # run 1: DEC + ENC; run 2: DEC + ENC <- fails
    with pytest.raises(DebugFailed):
        write_virtual(m.memory, cpu, va, b"\xee" * 16, mask)
    m.memory.invalidate()
    assert read_virtual(m.memory, cpu, va, 16, mask) == before
