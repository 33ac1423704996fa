"""QEMU-exact launch measurement with ``--pflash`` (QEMU's ``-drive if=pflash,unit=N``).

The expected value is what guest owners' tooling computes for QEMU's SEV (not ES) launch
of an OVMF file: sev-snp-measure ``--mode sev`` gives LD = SHA-256(file), then MEASURE =
HMAC-SHA-256(TIK, 0x04 || api || build || policy || LD || mnonce) (sev-api.md §3.6), with
the all-zero TIK of a launch without a DH session. Computed here with hashlib/hmac only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import hmp, qmp_connect
from tests.sev.sev_helpers import measurement, owner_mac

OVMF = Path("/usr/share/OVMF")
BUILDS = [("OVMF_CODE.fd", "OVMF_VARS.fd"), ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd")]


def ovmf(name: str) -> Path:
    path = OVMF / name
    if not path.exists():   # under CI a missing tool is a failure, as for QEMU and gdb (.ci/run installs ovmf)
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} not installed (Debian package ovmf)")
        pytest.skip(f"{path} not installed (Debian package ovmf)")
    return path


def owner_expected(sev: dict, code: bytes, mnonce: bytes, tik: bytes = bytes(16)) -> bytes:
    return owner_mac(sev, hashlib.sha256(code).digest(), mnonce, tik)  # sev-snp-measure --mode sev --ovmf FILE


def xp_bytes(q, n: int, gpa: int) -> bytes:
    """``xp /Nxb gpa`` as bytes (QEMU prints 8 per line, each line "addr: 0x.. 0x..")."""
    out = hmp(q, f"xp /{n}xb {gpa:#x}")
    assert out.split(":")[0] == f"{gpa:016x}", out
    return bytes(int(b, 16) for line in out.splitlines() if ":" in line for b in line.split(":")[1].split())


@pytest.mark.parametrize("code,vars_", BUILDS)
def test_debian_ovmf_measures_as_owner_tooling_computes(make_daemon, code, vars_):
    code_path, vars_path = ovmf(code), ovmf(vars_)
    d = make_daemon("--pflash", str(code_path), "--pflash", str(vars_path), "-S", "--policy", "0x1")
    sev, measure, mnonce = measurement(d)
    assert sev["state"] == "launch-secret" and sev["policy"] == 1
    assert measure == owner_expected(sev, code_path.read_bytes(), mnonce)


def test_unit0_ends_at_4gib_and_vars_below_it_plain(make_daemon):
    code_path, vars_path = ovmf("OVMF_CODE.fd"), ovmf("OVMF_VARS.fd")
    code, vars_ = code_path.read_bytes(), vars_path.read_bytes()
    d = make_daemon("--pflash", str(code_path), "--pflash", str(vars_path), "-S")
    q = qmp_connect(d)
    try:
        # the reset vector: the last 16 bytes of unit 0 at 0xfffffff0, through DBG_DECRYPT
        assert xp_bytes(q, 16, 0xFFFFFFF0) == code[-16:]
        assert xp_bytes(q, 16, (1 << 32) - len(code)) == code[:16]
        # unit 1 is plain at rest, and read as stored (as QEMU's xp shows it), not through DBG_DECRYPT, which
        # would turn it into garbage: its firmware-volume header (a non-zero GUID at 16) comes out as in the file
        vars_gpa = (1 << 32) - len(code) - len(vars_)
        assert vars_[16:32] != bytes(16)
        assert xp_bytes(q, 64, vars_gpa) == vars_[:64]
        # the guest runs from there as usual
        q.cmd_obj({"execute": "cont"})
        assert q.cmd_obj({"execute": "query-sev"})["return"]["state"] == "running"
        assert hmp(q, "info mem").strip()
    finally:
        q.close()


def test_only_unit0_is_measured_and_bios_is_not(make_daemon, tmp_path):
    code_path = ovmf("OVMF_CODE.fd")
    bios = tmp_path / "bios.bin"
    bios.write_bytes(b"\xcc" * 65536)
    other_vars = tmp_path / "vars.fd"
    other_vars.write_bytes(b"\x5a" * 8192)
    d = make_daemon("--bios", str(bios), "--pflash", str(code_path), "--pflash", str(other_vars), "-S")
    sev, measure, mnonce = measurement(d)
    assert measure == owner_expected(sev, code_path.read_bytes(), mnonce)


def test_bios_keeps_its_meaning(make_daemon, tmp_path):
    bios = tmp_path / "bios.bin"
    bios.write_bytes(bytes(range(256)) * 256)
    d = make_daemon("--bios", str(bios), "-S")
    sev, measure, mnonce = measurement(d)
    assert measure == owner_expected(sev, bios.read_bytes(), mnonce)


def test_secret_area_from_the_ovmf_table(make_daemon):
    """Without ``gpa`` QEMU injects into OVMF's advertised secret area (base 0 in Debian's build)."""
    code_path = ovmf("OVMF_CODE.fd")
    d = make_daemon("--pflash", str(code_path), "-S")
    sev, measure, mnonce = measurement(d)
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    secret, iv = b"owner secret 16b", bytes(range(16))
    trans = Cipher(algorithms.AES(bytes(16)), modes.CTR(iv)).encryptor().update(secret)
    msg = (b"\x01" + bytes(4) + iv + len(secret).to_bytes(4, "little") * 2 + trans + measure)
    header = bytes(4) + iv + hmac.new(bytes(16), msg, hashlib.sha256).digest()
    q = qmp_connect(d)
    try:
        r = q.cmd_obj({"execute": "sev-inject-launch-secret", "arguments": {
            "packet-header": base64.b64encode(header).decode(), "secret": base64.b64encode(trans).decode()}})
        assert r == {"return": {}}
        assert xp_bytes(q, 16, 0) == secret
    finally:
        q.close()


def test_bios_without_footer_has_no_secret_area(make_daemon):
    d = make_daemon("-S")
    q = qmp_connect(d)
    try:
        r = q.cmd_obj({"execute": "sev-inject-launch-secret", "arguments": {
            "packet-header": base64.b64encode(bytes(52)).decode(), "secret": base64.b64encode(bytes(16)).decode()}})
        assert r["error"]["desc"] == "SEV: no secret area found in OVMF, gpa must be specified."
    finally:
        q.close()


@pytest.mark.parametrize("size,text", [
    (5000, "system firmware block device pflash0 has invalid size 5000 "
           "(its size must be a non-zero multiple of 0x1000)"),
    (9 << 20, "combined size of system firmware exceeds 8388608 bytes"),
])
def test_bad_flash_is_one_line_in_qemus_words(tmp_path, size, text):
    bad = tmp_path / "flash.fd"
    bad.write_bytes(bytes(size))
    p = subprocess.run([sys.executable, "-m", "sevmon", "serve", "--qmp", str(tmp_path / "q.sock"),
                        "--pflash", str(bad)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 1
    assert text in p.stderr and "Traceback" not in p.stderr
