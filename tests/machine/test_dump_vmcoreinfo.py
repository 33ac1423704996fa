"""A Linux guest's dump carries its VMCOREINFO as QEMU's does with ``-device vmcoreinfo``: one ``VMCOREINFO`` note
(type 0, the kernel's text) after the vCPU notes, read through the debug path. The built-in guest keeps a VMCOREINFO
page as Linux does; its 32-bit and PAE modes have none (no 64-bit Linux): their dumps stay as they were.
(tests/live/test_kernel_dumps.py opens such dumps of a real Linux guest with crash and drgn.)
"""

from __future__ import annotations

import struct

import pytest
from elftools.elf.elffile import ELFFile

from sevmon.machine.cbit_note import NOTE_NAME as SEVMON
from sevmon.machine.dump import vmcoreinfo_note
from tests.conftest import qmp_connect

MEM = "32"  # MiB


def notes(path) -> list[tuple[str, int, bytes]]:
    with open(path, "rb") as f:
        out = []
        for s in ELFFile(f).iter_segments():
            if s.header["p_type"] == "PT_NOTE":
                for n in s.iter_notes():
                    desc = n["n_desc"]
                    out.append((n["n_name"], n["n_type"] if isinstance(n["n_type"], int) else 1,
                                desc if isinstance(desc, bytes) else b""))
        return out


def note_segment(path) -> bytes:
    data = open(path, "rb").read()
    phoff = struct.unpack_from("<Q", data, 32)[0]
    _t, _f, off, _va, _pa, filesz, _m, _a = struct.unpack_from("<IIQQQQQQ", data, phoff)
    return data[off:off + filesz]


def dump(q, path, **args) -> dict:
    return q.cmd_obj({"execute": "dump-guest-memory", "arguments": {"paging": False, "protocol": f"file:{path}",
                                                                       **args}})


def test_note_is_linuxs_own_shape():
    """Linux's append_elf_note: namesz 11 (with the NUL), descsz the text's length, type 0, each part padded to 4."""
    text = b"OSRELEASE=6.1.0\nPAGESIZE=4096\n"  # 30 bytes: 2 bytes of padding
    assert vmcoreinfo_note(text) == struct.pack("<III", 11, 30, 0) + b"VMCOREINFO\0\0" + text + b"\0\0"


@pytest.mark.parametrize("sev", [["--sev"], ["--no-sev"]])
def test_dump_carries_the_guests_vmcoreinfo_after_the_vcpu_notes(make_daemon, tmp_path, sev):
    q = qmp_connect(make_daemon(*sev, "--no-workload", "--memory", MEM, hmp=False))
    q.cmd("stop")
    text = q.cmd("query-guest-kernel")["vmcoreinfo"].encode()
    core = tmp_path / "guest.elf"
    assert dump(q, core) == {"return": {}}
    got = notes(core)
    names = [n[0] for n in got]
    assert names == ["CORE", "QEMU", "VMCOREINFO"] + ([SEVMON] if sev == ["--sev"] else [])
    assert got[2][1] == 0 and got[2][2] == text
    assert vmcoreinfo_note(text) in note_segment(core)  # byte for byte, at a 4-byte boundary
    q.close()


def test_sev_es_dump_has_the_vmcoreinfo_and_no_register_notes(make_daemon, tmp_path):
    q = qmp_connect(make_daemon("--policy", "0x4", "--no-workload", "--memory", MEM, hmp=False))
    core = tmp_path / "es.elf"
    assert dump(q, core) == {"return": {}}
    got = notes(core)
    assert [n[0] for n in got] == ["VMCOREINFO", SEVMON]
    assert got[0][2].startswith(b"OSRELEASE=6.1.0-sevmon-builtin\n")
    q.close()


def test_the_scan_is_paid_once_while_the_guest_stays_paused(make_daemon, tmp_path):
    """The dump finds the kernel as the walkers do and keeps it: a second dump, and query-guest-kernel, scan
    nothing again (their round trips are the memory's only)."""
    q = qmp_connect(make_daemon("--no-workload", "--memory", MEM, hmp=False))
    q.cmd("stop")
    rt = lambda: q.cmd("query-sev-debug-stats")["round-trips"]  # noqa: E731
    before = rt()
    assert dump(q, tmp_path / "1.elf") == {"return": {}}
    first = rt() - before
    before = rt()
    q.cmd("query-guest-kernel")
    assert rt() == before
    assert dump(q, tmp_path / "2.elf") == {"return": {}}
    second = rt() - before
    assert 0 < second < first
    assert notes(tmp_path / "1.elf") == notes(tmp_path / "2.elf")
    q.close()


def test_the_note_is_kept_when_the_filter_leaves_its_page_out(make_daemon, tmp_path):
    """QEMU writes the guest note whatever begin/length select: the tools need it to read any of the memory."""
    q = qmp_connect(make_daemon("--no-workload", "--memory", MEM, hmp=False))
    q.cmd("stop")
    gpa = q.cmd("query-guest-kernel")["vmcoreinfo-gpa"]
    core = tmp_path / "low.elf"
    assert dump(q, core, begin=0, length=1 << 20) == {"return": {}}
    assert gpa >= 1 << 20
    assert "VMCOREINFO" in [n[0] for n in notes(core)]
    q.close()


@pytest.mark.parametrize("paging", ["pae", "32"])
def test_no_linux_found_no_note_and_the_dump_as_before(make_daemon, tmp_path, paging):
    q = qmp_connect(make_daemon("--paging", paging, "--no-workload", "--memory", MEM, hmp=False))
    q.cmd("stop")
    assert "no 64-bit Linux kernel was found" in q.cmd_obj({"execute": "query-guest-kernel"})["error"]["desc"]
    core = tmp_path / "guest.elf"
    assert dump(q, core) == {"return": {}}
    assert [n[0] for n in notes(core)] == ["CORE", "QEMU", SEVMON]
    q.close()


def phys(path, gpa: int, size: int) -> bytes:
    with open(path, "rb") as f:
        for s in ELFFile(f).iter_segments():
            h = s.header
            if h["p_type"] == "PT_LOAD" and h["p_paddr"] <= gpa < h["p_paddr"] + h["p_filesz"]:
                f.seek(h["p_offset"] + gpa - h["p_paddr"])
                return f.read(size)
    raise AssertionError(f"0x{gpa:x} is not in the dump")


def loads(path) -> list[tuple[int, int, int]]:
    with open(path, "rb") as f:
        return [(s.header["p_paddr"], s.header["p_offset"], s.header["p_filesz"]) for s in ELFFile(f).iter_segments()
                if s.header["p_type"] == "PT_LOAD"]


@pytest.mark.parametrize("es", [False, True])
def test_sev_dump_keeps_the_tables_and_describes_ram_at_the_cbit_too(make_daemon, tmp_path, es):
    """drgn takes the C-bit in a table entry as an address bit: the dump of an SEV guest describes every RAM run a
    second time at its C-bit address, the same file bytes (an alias, as the hardware sees it), and the tables keep
    the guest's bytes exactly; sevmon's loader takes the aliases for what they are."""
    q = qmp_connect(make_daemon(*(["--policy", "0x4"] if es else []), "--no-workload", "--memory", MEM, hmp=False))
    q.cmd("stop")
    k = q.cmd("query-guest-kernel")
    core = tmp_path / "guest.elf"
    assert dump(q, core) == {"return": {}}
    cbit = 1 << 47
    guest = q.cmd("human-monitor-command", **{"command-line": f"xp /512xg 0x{k['root']:x}"})
    guest_entries = [int(w, 16) for ln in guest.splitlines() for w in ln.split()[1:]]
    assert any(e & 1 and e & cbit for e in guest_entries)
    assert list(struct.unpack("<512Q", phys(core, k["root"], 4096))) == guest_entries  # the guest's own bytes
    ram = [h for h in loads(core) if not h[0] & cbit]
    assert ram and loads(core) == ram + [(gpa | cbit, off, size) for gpa, off, size in ram]
    lower = next(e for e in guest_entries if e & 1)  # an entry as drgn takes it, C-bit and all: readable
    assert phys(core, lower & 0x000FFFFFFFFFF000, 4096) == phys(core, lower & 0x00007FFFFFFFF000, 4096)
    info_mem = q.cmd("human-monitor-command", **{"command-line": "info mem"})
    q.close()
    # reopened, the aliases are not RAM: the guest's RAM and the same walk
    q2 = qmp_connect(make_daemon("--core", str(core), "--no-workload", hmp=False))
    assert q2.cmd("human-monitor-command", **{"command-line": "info mem"}) == info_mem
    assert q2.cmd("human-monitor-command", **{"command-line": f"xp /1xg 0x{(int(MEM) << 20) - 8:x}"}).startswith(
        f"{(int(MEM) << 20) - 8:016x}: 0x")
    assert "Cannot access memory" in q2.cmd("human-monitor-command",
                                            **{"command-line": f"xp /1xg 0x{int(MEM) << 20:x}"})
    q2.close()
