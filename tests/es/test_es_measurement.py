"""An SEV-ES launch measures as guest owners compute it: ``sev-snp-measure --mode seves``.

QEMU 7.2's SEV-ES launch measures pflash unit 0 (LAUNCH_UPDATE_DATA), then each vCPU's VMSA (LAUNCH_UPDATE_VMSA:
the BSP at the reset vector, the APs at OVMF's SEV-ES reset block, RDX the ``-cpu`` model's CPUID signature),
then LAUNCH_MEASURE. The owner's tool gives the launch digest LD; the firmware's MEASURE is
HMAC-SHA-256(TIK, 0x04 || api || build || policy || LD || mnonce) with the all-zero TIK of a launch without a DH
session (sev-api.md §3.6). The tool is run as guest owners run it (a test dependency, pyproject's ``test`` extra).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import hmp, qmp_connect
from tests.sev.sev_helpers import measurement, owner_mac

OVMF = Path("/usr/share/OVMF")


def owner_digest(ovmf: Path, vcpus: int, model: str) -> bytes:
    tool = shutil.which("sev-snp-measure")
    assert tool, "sev-snp-measure is not installed (pip install -e '.[test]')"
    out = subprocess.run([tool, "--mode", "seves", "--vcpus", str(vcpus), "--vcpu-type", model,
                          "--ovmf", str(ovmf)], capture_output=True, text=True, timeout=120, check=True)
    return bytes.fromhex(out.stdout.strip())


@pytest.mark.parametrize("code,vcpus,model", [
    ("OVMF_CODE.fd", 1, "EPYC"),
    ("OVMF_CODE.fd", 4, "EPYC-Milan"),
    ("OVMF_CODE_4M.fd", 1, "EPYC-Milan"),
    ("OVMF_CODE_4M.fd", 4, "EPYC-Rome"),
])
def test_es_launch_measures_as_sev_snp_measure_computes(make_daemon, code, vcpus, model):
    path = OVMF / code
    assert path.exists(), f"{path}: Debian's ovmf package is needed"
    d = make_daemon("--pflash", str(path), "-S", "--policy", "0x4", "--smp", str(vcpus), "--cpu", model)
    sev, measure, mnonce = measurement(d)
    assert sev["state"] == "launch-secret" and sev["policy"] == 0x4
    assert measure == owner_mac(sev, owner_digest(path, vcpus, model), mnonce)
    # the VMSAs are measured: another CPU model, or another vCPU count, is another measurement
    other = "EPYC" if model != "EPYC" else "EPYC-Milan"
    assert measure != owner_mac(sev, owner_digest(path, vcpus, other), mnonce)
    assert measure != owner_mac(sev, owner_digest(path, vcpus + 1, model), mnonce)


def test_es_needs_the_reset_block_for_aps(tmp_path):
    """A pflash without OVMF's SEV information block: QEMU's sentence, not a launch with APs nowhere."""
    import subprocess as sp
    import sys
    flash = tmp_path / "flash.fd"
    flash.write_bytes(b"\xf4" * 65536)
    p = sp.run([sys.executable, "-m", "sevmon", "serve", "--qmp", str(tmp_path / "q.sock"), "--pflash", str(flash),
                "--policy", "0x4", "--smp", "2"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 1
    assert "SEV information block/Firmware GUID Table block not found in pflash rom" in p.stderr
    assert "Traceback" not in p.stderr


def test_unknown_cpu_model_is_qemus_sentence(tmp_path):
    import subprocess as sp
    import sys
    p = sp.run([sys.executable, "-m", "sevmon", "serve", "--qmp", str(tmp_path / "q.sock"), "--policy", "0x4",
                "--cpu", "EPYC-Genoa"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 1
    assert "unable to find CPU model 'EPYC-Genoa'" in p.stderr and "Traceback" not in p.stderr


def test_builtin_guest_runs_as_sev_es(make_daemon):
    d = make_daemon("--policy", "0x4", "--smp", "2")
    q = qmp_connect(d)
    try:
        sev = q.cmd_obj({"execute": "query-sev"})["return"]
        assert sev["state"] == "running" and sev["policy"] == 4
        # memory is still readable through DBG_DECRYPT: ES with debugging allowed is not refused
        out = hmp(q, "xp /16c 0x1000000")  # the kernel's first page: "kernel text +0x0"
        assert out.split(":")[1].strip().startswith("'k' 'e' 'r' 'n' 'e' 'l'"), out
    finally:
        q.close()
