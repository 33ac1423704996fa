"""A plaintext dump of an SEV guest names its C-bit in sevmon's own ELF note, and reopening
such a dump strips the C-bit, so the same guest shows the same `info mem` and `info tlb`
with or without --sev (before, without --sev `info mem` was empty, with no hint why)."""

from __future__ import annotations

import pytest
from elftools.elf.elffile import ELFFile

from sevmon.machine.cbit_note import NOTE_NAME, NT_SEVMON_CBIT
from tests.conftest import hmp, qmp_connect


def _notes(path):
    with open(path, "rb") as f:
        return [(n["n_name"], n["n_type"], n["n_desc"]) for s in ELFFile(f).iter_segments()
                if s.header["p_type"] == "PT_NOTE" for n in s.iter_notes()]


def _views(q):
    return {cmd: hmp(q, cmd) for cmd in ("info mem", "info tlb", "x /2xg 0x400000", "gva2gpa 0x400000")}


@pytest.mark.parametrize("cbitpos", ["47", "51"])
def test_sev_dump_reopens_plain_and_as_sev(make_daemon, tmp_path, cbitpos):
    q = qmp_connect(make_daemon("--no-workload", "--cbitpos", cbitpos, hmp=False))
    before = _views(q)
    assert before["info mem"].count("\n") > 5
    core = tmp_path / "guest.elf"
    assert hmp(q, f'dump-guest-memory "{core}"') == ""
    q.close()
    sevmon_notes = [n for n in _notes(core) if n[0] == NOTE_NAME]
    assert len(sevmon_notes) == 1 and sevmon_notes[0][1] == NT_SEVMON_CBIT
    assert int.from_bytes(sevmon_notes[0][2] if isinstance(sevmon_notes[0][2], bytes)
                          else bytes.fromhex(sevmon_notes[0][2]), "little") == int(cbitpos)
    for reopen in (["--no-sev"], ["--sev"], ["--sev", "--cbitpos", "51"]):
        q = qmp_connect(make_daemon("--core", str(core), *reopen, hmp=False))
        assert _views(q) == before, reopen
        q.close()


def test_plain_guest_dump_has_no_sevmon_note(make_daemon, tmp_path):
    q = qmp_connect(make_daemon("--no-sev", "--no-workload", hmp=False))
    core = tmp_path / "plain.elf"
    assert hmp(q, f'dump-guest-memory "{core}"') == ""
    q.close()
    names = [n[0] for n in _notes(core)]
    assert NOTE_NAME not in names and names.count("CORE") == names.count("QEMU") == 1
