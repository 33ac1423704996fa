"""The real gdb against QEMU 7.2's fixtures run as SEV guests: registers, virtual and physical
memory and ``monitor`` equal QEMU's own outputs; a NODBG guest gives gdb errors and no plaintext."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FIXTURE_NAMES, FIXTURES
from tests.gdb.gdb_support import gdb_values, gdb_x_words, need_gdb, run_gdb

CBIT = 1 << 47
ARCH = {"linux-4level": "i386:x86-64", "linux-pae": "i386", "linux-32bit": "i386"}


def _xp_words(text: str) -> list[int]:
    return [int(w, 16) for line in text.splitlines() for w in line.partition(":")[2].split()]


def _is_mmio(gpa: int) -> bool:
    return (gpa & ~0xFFFFF) in (0xFEE00000, 0xFEC00000)


def _samples(expected: dict):
    """(virtual samples [(va, words)], physical samples [(gpa, words)]) from QEMU's outputs."""
    virt, phys = {}, {}
    for cmd, out in expected.items():
        if cmd.startswith("xp /4xg "):
            gpa = int(cmd.split()[-1], 16)
            if not _is_mmio(gpa):
                phys[gpa] = _xp_words(out)
        elif cmd.startswith("x /4xg "):
            virt[int(cmd.split()[-1], 16)] = _xp_words(out)
        elif cmd.startswith("gva2gpa ") and out.startswith("gpa: "):
            va, gpa = int(cmd.split()[-1], 16), int(out.split()[1], 16)
            xp = expected.get(f"xp /4xg {gpa:#x}")
            if xp and not _is_mmio(gpa) and (va & 0xFFF) + 32 <= 0x1000:  # same page as the gpa
                virt[va] = _xp_words(xp)
    return sorted(virt.items()), sorted(phys.items())


def _fixture_daemon(make_daemon, name: str, *extra: str):
    fx = FIXTURES / name
    d = make_daemon("--core", str(fx / "core.elf"), "--cpu-state", str(fx / "cpu.json"),
                    "--sev", "--cbitpos", "47", *extra, "--gdb", "unix:gdb.sock", hmp=False)
    return d, str(fx.joinpath()), json.loads((fx / "hmp.json").read_text()), json.loads((fx / "cpu.json").read_text())


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_gdb_reads_the_sev_fixture_as_qemu_shows_it(make_daemon, name):
    need_gdb()
    d, _, expected, regs = _fixture_daemon(make_daemon, name, "--policy", "0")
    sock = d.qmp.replace("qmp.sock", "gdb.sock")
    virt, phys = _samples(expected)
    assert len(virt) >= 5 and len(phys) >= 10
    cmds = ["p/x $pc", "p/x $sp", "p/x $cr3"]
    cmds += [f"x/4gx {va:#x}" for va, _ in virt]
    cmds += ["maintenance packet Qqemu.PhyMemMode:1"]
    cmds += [f"x/4gx {gpa:#x}" for gpa, _ in phys]
    cmds += ["maintenance packet Qqemu.PhyMemMode:0", "monitor info mem"]
    out = run_gdb(sock, *cmds, arch=ARCH[name])

    vals = gdb_values(out)
    pc, sp = (regs["rip"], regs["rsp"]) if "rip" in regs else (regs["eip"], regs["esp"])
    assert int(vals["$1"], 16) == int(pc, 16), out
    assert int(vals["$2"], 16) == int(sp, 16)
    cr3 = int(vals["$3"], 16)
    assert cr3 & ~CBIT == int(regs["cr3"], 16)
    if name == "linux-4level":
        assert cr3 & CBIT, "a long-mode SEV guest's CR3 carries its C-bit"

    virtual_part, _, physical_part = out.partition('received: "OK"')
    for va, words in virt:
        assert gdb_x_words(virtual_part, va) == words, f"x/4gx {va:#x}\n{out}"
    for gpa, words in phys:
        assert gdb_x_words(physical_part, gpa) == words, f"phys x/4gx {gpa:#x}\n{out}"
    assert expected["info mem"].replace("\r\n", "\n") in out  # monitor info mem: QEMU's text
    assert "Remote communication error" not in out


def test_gdb_unmapped_address_is_cannot_access_memory(make_daemon):
    need_gdb()
    d, *_ = _fixture_daemon(make_daemon, "linux-4level", "--policy", "0")
    out = run_gdb(d.qmp.replace("qmp.sock", "gdb.sock"), "x/4gx 0xdead0000", "x/2gx 0x8000000000000000",
                  "maintenance packet Qqemu.PhyMemMode:1", "x/2gx 0x7ff00000000")
    assert "Cannot access memory at address 0xdead0000" in out
    assert "Cannot access memory at address 0x8000000000000000" in out   # non-canonical
    assert "Cannot access memory at address 0x7ff00000000" in out          # not RAM


@pytest.mark.parametrize("extra", [("--policy", "1"), ("--policy", "0", "--debug-policy", "off")],
                         ids=["nodbg", "debug-policy-off"])
def test_gdb_gets_errors_and_no_plaintext_when_debugging_is_forbidden(make_daemon, extra):
    need_gdb()
    d, _, expected, regs = _fixture_daemon(make_daemon, "linux-4level", *extra)
    virt, phys = _samples(expected)
    cmds = [f"x/4gx {va:#x}" for va, _ in virt] + ["monitor info mem", "monitor info tlb"]
    cmds += [f"monitor x /4xg {va:#x}" for va, _ in virt[:3]]
    cmds += ["maintenance packet Qqemu.PhyMemMode:1"] + [f"x/4gx {gpa:#x}" for gpa, _ in phys]
    cmds += [f"set {{long}}{phys[0][0]:#x} = 1"]
    out = run_gdb(d.qmp.replace("qmp.sock", "gdb.sock"), *cmds)
    assert out.count("Cannot access memory at address") >= len(virt) + len(phys) + 1, out
    assert "forbids debug access" in out or "debug access is disabled" in out
    registers = {int(v, 16) for v in regs.values()}
    secrets = {w for _, ws in virt + phys for w in ws} - registers - {0, 0xCCCCCCCCCCCCCCCC}
    assert len(secrets) >= 10
    text = out.lower()
    for w in secrets:   # no plaintext word in any spelling gdb or HMP would use
        assert f"{w:x}" not in text and f"{w:016x}" not in text, f"plaintext {w:#x} leaked"
    for line in expected["info mem"].splitlines()[:5]:
        assert line.strip() not in out
