"""A real 5-level-paging Linux guest (tests/data/linux-5level, captured from QEMU 7.2):
sevmon's outputs equal QEMU's, plain and as an SEV guest; info mem (broken in QEMU 7.2
under LA57) equals the per-entry transcription of QEMU's loops with the fix applied."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sevmon.machine.images import apply_cpu_json, load_core
from tests.conftest import hmp, qmp_connect
from tests.x86.x86_reference import naive_mem

FX = Path(__file__).resolve().parent.parent / "data" / "linux-5level"


def _mmio(cmd: str, expected: dict) -> bool:
    if cmd.startswith("xp") and re.search(r" 0xfe[ce]0", cmd):
        return True
    gva = expected.get(f"gva2gpa {cmd.split()[-1]}", "") if cmd.startswith("x ") else ""
    return bool(re.match(r"gpa: 0xfe[ce]0", gva))


@pytest.mark.parametrize("sev", [False, True], ids=["plain", "sev"])
def test_real_5level_guest(make_daemon, sev):
    expected = json.loads((FX / "hmp.json").read_text())
    image = load_core(str(FX / "core.elf"))
    cpu = apply_cpu_json(image, str(FX / "cpu.json"))
    assert cpu.paging_mode() == "5level"
    reference_mem = naive_mem(image.ram, cpu)
    d = make_daemon("--core", str(FX / "core.elf"), "--cpu-state", str(FX / "cpu.json"),
                    *(["--sev", "--cbitpos", "47"] if sev else ["--no-sev"]), hmp=False)
    q = qmp_connect(d)
    checked = 0
    for cmd, want in expected.items():
        if not re.match(r"^(info tlb|gva2gpa |x |xp )", cmd):
            continue
        got = hmp(q, cmd)
        if _mmio(cmd, expected):
            assert got.endswith(": Cannot access memory\r\n") or got == want, cmd
            continue
        assert got == want, cmd
        checked += 1
    assert checked >= 30
    mem = hmp(q, "info mem")
    assert mem == "".join(line + "\r\n" for line in reference_mem)
    assert mem.count("\r\n") > 50 and mem.endswith("\r\n")
    q.close()
