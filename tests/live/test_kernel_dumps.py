"""crash and drgn on sevmon's dumps of a real Linux guest opened as an SEV and an SEV-ES guest, judged by the tools.

The session's paused Linux guest (tests/live/conftest.py ``paused_linux``: QEMU 7.2, TCG, 256 MiB, Debian's cloud
kernel) and QEMU's own ``dump-guest-memory`` of it (the truth). Then sevmon opens that capture as an SEV guest
(``--core --sev``: registers from QEMU's notes, the C-bit set in the tables, every page launched and read back
through DBG_DECRYPT) and as an SEV-ES guest (``--policy 0x4``: no register can be read, sevmon finds the kernel by
its VMCOREINFO alone), and writes its dump of each.

- ``crash`` (Debian's, ``crash -s VMLINUX DUMP``): ``sys`` and ``log`` of sevmon's dumps equal crash's on QEMU's
  dump. QEMU's dump carries no VMCOREINFO here (the guest never registers it: Debian builds ``qemu_fw_cfg`` as a
  module, and the busybox initramfs loads none, so ``-device vmcoreinfo`` would change nothing); crash finds the
  kernel there from the registers of QEMU's note. sevmon's SEV-ES dump has no registers: crash can only open it
  through the VMCOREINFO note.
- ``drgn -c DUMP -s VMLINUX`` (the command a user runs): the release, the task list (pid, comm) and dmesg of
  sevmon's dumps equal drgn's on QEMU's dump read through a custom ``drgn.Program``: QEMU's PT_LOADs as physical
  segments, and the VMCOREINFO text found by a scan of page heads (nothing of sevmon's code).

The debug vmlinux is Debian's ``linux-image-<release>-dbg`` (tests/live/build_guest.py caches it). Loading its
590 MB costs crash about 20 s per run: the three crash runs go at once; drgn runs twice (2 s each), its truth once
for the session.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
from pathlib import Path

import pytest

from sevmon.testing import SevmonDaemon
from tests.live.conftest import require_debug_vmlinux, require_tool
from tests.live.drgn_truth import SCRIPT, VIEW


@pytest.fixture(scope="module")
def dumps(paused_linux, module_tmp):
    """{"qemu": QEMU's own dump, "sev": sevmon's of it as an SEV guest, "es": as an SEV-ES guest}, and the
    guest kernel sevmon found (query-guest-kernel) on each."""
    files, kernels = {"qemu": paused_linux.dump}, {}
    for name, args in (("sev", ["--sev"]), ("es", ["--sev", "--policy", "0x4"])):
        with SevmonDaemon("--core", str(files["qemu"]), *args, start_timeout=600) as d:
            out = module_tmp / f"{name}.elf"
            assert d.qmp.cmd("dump-guest-memory", paging=False, protocol=f"file:{out}") == {}
            kernels[name] = d.qmp.cmd("query-guest-kernel")
            if name == "es":
                assert "registers not available" in d.qmp.hmp("info registers")
        files[name] = out
    yield files, kernels


def crash(vmlinux: Path, dump: Path, tmp: Path) -> dict[str, str]:
    """crash's ``sys`` and ``log`` of ``dump``, each redirected to a file of its own (crash's warnings stay out)."""
    crash_bin = require_tool("crash", "crash")
    outs = {cmd: tmp / f"{dump.stem}.{cmd}.txt" for cmd in ("sys", "log")}
    script = "".join(f"{cmd} > {path}\n" for cmd, path in outs.items()) + "quit\n"
    r = subprocess.run([crash_bin, "-s", str(vmlinux), str(dump)], input=script, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return {cmd: path.read_text() for cmd, path in outs.items()}


@pytest.fixture(scope="module")
def crash_views(dumps, module_tmp):
    """crash's ``sys`` and ``log`` of each dump, QEMU's (the truth) and sevmon's: the three runs at once, since each
    spends most of its time loading the vmlinux on one core."""
    files, _ = dumps
    vmlinux = require_debug_vmlinux()
    with concurrent.futures.ThreadPoolExecutor(len(files)) as pool:
        runs = {kind: pool.submit(crash, vmlinux, path, module_tmp) for kind, path in files.items()}
        return {kind: run.result() for kind, run in runs.items()}


@pytest.mark.parametrize("kind", ["sev", "es"])
def test_crash_sys_and_log_equal_crashs_on_qemus_dump(dumps, crash_views, kind):
    _, kernels = dumps
    ours, crash_truth = crash_views[kind], crash_views["qemu"]
    release = kernels[kind]["release"]
    assert f"     RELEASE: {release}\n" in crash_truth["sys"]
    assert crash_truth["log"].count("\n") > 300 and f"Linux version {release} " in crash_truth["log"]
    assert ours["log"] == crash_truth["log"]
    drop = lambda text: [ln for ln in text.splitlines() if not ln.lstrip().startswith("DUMPFILE:")]  # noqa: E731
    assert drop(ours["sys"]) == drop(crash_truth["sys"])


@pytest.mark.parametrize("kind", ["sev", "es"])
def test_drgn_release_tasks_and_dmesg_equal_drgns_on_qemus_dump(dumps, paused_linux, module_tmp, kind):
    files, kernels = dumps
    drgn = require_tool("drgn", "pip install 'sevmon[drgn]'")
    out = module_tmp / f"drgn-{kind}.json"
    r = subprocess.run([drgn, "-q", "-c", str(files[kind]), "-s", str(paused_linux.vmlinux), SCRIPT, str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    ours, truth = json.loads(out.read_text()), paused_linux.truth
    assert truth["release"] == kernels[kind]["release"]
    assert {"sh", "kthreadd", "sleep", "cat"} <= {comm for _, comm in truth["tasks"]}  # the guest's own processes
    assert len(truth["dmesg"]) > 300
    assert {k: ours[k] for k in VIEW} == truth


def test_sevmons_dumps_carry_the_vmcoreinfo_qemus_lacks(dumps):
    """QEMU's dump of this guest has only its vCPU notes; sevmon's add the guest's VMCOREINFO (the text the kernel
    wrote) after them, and its SEV-ES dump has no register notes at all."""
    from elftools.elf.elffile import ELFFile

    files, kernels = dumps

    def notes(path):
        with open(path, "rb") as f:
            return [(n["n_name"], n["n_desc"]) for s in ELFFile(f).iter_segments()
                    if s.header["p_type"] == "PT_NOTE" for n in s.iter_notes()]

    assert [n for n, _ in notes(files["qemu"])] == ["CORE", "QEMU"]
    for kind, names in (("sev", ["CORE", "QEMU", "VMCOREINFO", "SEVMON"]), ("es", ["VMCOREINFO", "SEVMON"])):
        got = notes(files[kind])
        assert [n for n, _ in got] == names
        desc = dict(got)["VMCOREINFO"]
        assert (desc if isinstance(desc, bytes) else desc.encode()) == kernels[kind]["vmcoreinfo"].encode()
