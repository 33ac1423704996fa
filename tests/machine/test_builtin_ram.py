"""The built-in guest's RAM is all RAM, as a QEMU guest's ``-m`` is: a frame the guest never wrote reads as
zeros (through DBG_DECRYPT on an SEV guest), only addresses past the RAM size are not RAM, and the firmware's
ROM copy below 1 MiB (QEMU's isa-bios, the reset vector at 0xffff0) shows its bytes as QEMU's ``xp`` does."""

from __future__ import annotations

import pytest

from tests.conftest import hmp, qmp_connect

ZEROS = "0x0000000000000000 0x0000000000000000"


def decrypted(q) -> int:
    stats = dict(line.split(": ") for line in hmp(q, "info sev-debug").splitlines())
    return int(stats["bytes-decrypted"])


def test_never_written_ram_is_zeros_through_dbg_decrypt(make_daemon):
    q = qmp_connect(make_daemon("--memory", "64", "--no-workload"))
    before = decrypted(q)
    assert hmp(q, "xp /2xg 0") == f"0000000000000000: {ZEROS}\r\n"
    assert decrypted(q) == before + 4096  # one page, decrypted by the firmware like any other
    # the direct map's first page, which info mem lists -rw
    assert "ffff888000000000-ffff888040000000 0000000040000000 -rw" in hmp(q, "info mem")
    assert hmp(q, "x /2xg 0xffff888000000000") == f"ffff888000000000: {ZEROS}\r\n"
    assert hmp(q, "xp /1xg 0x4000000") == "0000000004000000: Cannot access memory\r\n"  # past the RAM
    q.close()


def test_plain_guest_never_written_ram_is_zeros(make_daemon):
    q = qmp_connect(make_daemon("--no-sev", "--memory", "64"))
    assert hmp(q, "xp /2xg 0x10000") == f"0000000000010000: {ZEROS}\r\n"
    assert hmp(q, "xp /1xg 0x4000000") == "0000000004000000: Cannot access memory\r\n"
    q.close()


@pytest.mark.parametrize("sev", [[], ["--no-sev"]])
def test_reset_vector_rom_in_prelaunch_shows_the_bios_bytes(make_daemon, tmp_path, sev):
    bios = tmp_path / "bios.bin"
    image = bytes(range(256)) * 1024  # 256 KiB: the ROM copy below 1 MiB is its top 128 KiB
    bios.write_bytes(image)
    q = qmp_connect(make_daemon("-S", "--bios", str(bios), *sev))
    assert q.cmd("query-status")["status"] == "prelaunch"
    want = " ".join(f"0x{b:02x}" for b in image[-16:-8])
    assert hmp(q, "xp /8xb 0xffff0") == f"00000000000ffff0: {want}\r\n"
    want = " ".join(f"0x{b:02x}" for b in image[-0x20000:-0x20000 + 8])
    assert hmp(q, "xp /8xb 0xe0000") == f"00000000000e0000: {want}\r\n"
    q.close()
