"""crash and drgn on sevmon's dumps of a real Linux guest opened as an SEV and an SEV-ES guest, judged by the tools.

One QEMU 7.2 boot (TCG, 256 MiB, Debian's cloud kernel): pause, QEMU's own ``dump-guest-memory`` (the truth), quit.
Then sevmon opens that capture as an SEV guest (``--core --sev``: registers from QEMU's notes, the C-bit set in the
tables, every page launched and read back through DBG_DECRYPT) and as an SEV-ES guest (``--policy 0x4``: no
register can be read, sevmon finds the kernel by its VMCOREINFO alone), and writes its dump of each.

- ``crash`` (Debian's, ``crash -s VMLINUX DUMP``): ``sys`` and ``log`` of sevmon's dumps equal crash's on QEMU's
  dump. QEMU's dump carries no VMCOREINFO here (the guest never registers it: Debian builds ``qemu_fw_cfg`` as a
  module, and the busybox initramfs loads none, so ``-device vmcoreinfo`` would change nothing); crash finds the
  kernel there from the registers of QEMU's note. sevmon's SEV-ES dump has no registers: crash can only open it
  through the VMCOREINFO note.
- ``drgn -c DUMP -s VMLINUX`` (the command a user runs): the release, the task list (pid, comm) and dmesg of
  sevmon's dumps equal drgn's on QEMU's dump read through a custom ``drgn.Program``: QEMU's PT_LOADs as physical
  segments, and the VMCOREINFO text found by a scan of page heads (nothing of sevmon's code).

The debug vmlinux is Debian's ``linux-image-<release>-dbg`` (tests/live/build_guest.py caches it). Loading its
590 MB costs crash several seconds per run: the module runs crash three times and drgn three times, all on files
the module fixtures make once.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sevmon.testing import SevmonDaemon
from tests.live.conftest import Qemu, _missing, require_debug_vmlinux, require_tool

MEM = "256M"

#: run by ``drgn -c DUMP -s VMLINUX`` (``prog`` given) or by python with ``--qemu-core CORE VMLINUX`` (the truth:
#: a custom Program over QEMU's dump). Prints the release, the tasks and dmesg as JSON.
DRGN_SCRIPT = r'''
import json, mmap, sys

def custom_program(core, vmlinux):
    """QEMU's physical dump as drgn segments, and the VMCOREINFO text found at the head of a page."""
    import drgn
    from elftools.elf.elffile import ELFFile
    f = open(core, "rb")
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    loads = [s.header for s in ELFFile(f).iter_segments() if s.header["p_type"] == "PT_LOAD" and s.header["p_filesz"]]
    vmcoreinfo = None
    for h in loads:
        for off in range(h["p_offset"], h["p_offset"] + h["p_filesz"], 4096):
            if mm[off:off + 10] == b"OSRELEASE=":
                page = mm[off:off + 4096]
                text = page.split(b"\0", 1)[0]
                if b"SYMBOL(init_top_pgt)=" in text and b"KERNELOFFSET=" in text:
                    vmcoreinfo = text
                    break
        if vmcoreinfo:
            break
    assert vmcoreinfo, "no VMCOREINFO page in QEMU's dump"
    prog = drgn.Program(drgn.Platform(drgn.Architecture.X86_64,
                                      drgn.PlatformFlags.IS_64_BIT | drgn.PlatformFlags.IS_LITTLE_ENDIAN))
    for h in loads:
        base = h["p_offset"]
        prog.add_memory_segment(h["p_paddr"], h["p_filesz"],
                                lambda addr, count, offset, physical, base=base: mm[base + offset:base + offset + count],
                                physical=True)
    prog.set_linux_kernel_custom(vmcoreinfo, False)
    prog.load_debug_info([vmlinux])
    return prog

if "prog" not in globals():
    prog = custom_program(sys.argv[2], sys.argv[3])

from drgn.helpers.linux.pid import for_each_task
from drgn.helpers.linux.printk import get_dmesg

print(json.dumps({
    "release": prog["UTS_RELEASE"].string_().decode(),
    "tasks": sorted((int(t.pid), t.comm.string_().decode()) for t in for_each_task(prog)),
    "dmesg": get_dmesg(prog).decode(errors="replace"),
}))
'''


def require_drgn() -> str:
    drgn = require_tool("drgn", "pip install drgn")
    try:
        import drgn as _  # noqa: F401
    except ImportError:
        _missing("drgn's Python module is not installed (pip install drgn)")
    return drgn


@pytest.fixture(scope="module")
def dumps(module_tmp):
    """{"qemu": QEMU's own dump, "sev": sevmon's of it as an SEV guest, "es": as an SEV-ES guest}, and the
    guest kernel sevmon found (query-guest-kernel) on each."""
    require_debug_vmlinux()
    qemu = Qemu(module_tmp, mem=MEM, backend=None)
    try:
        q = qemu.qmp("b")
        q.cmd("stop")
        q.cmd("dump-guest-memory", paging=False, protocol=f"file:{module_tmp / 'qemu.elf'}")
        with contextlib.suppress(Exception):
            q.close()
    finally:
        qemu.stop()
    files, kernels = {"qemu": module_tmp / "qemu.elf"}, {}
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
def crash_truth(dumps, module_tmp):
    files, _ = dumps
    return crash(require_debug_vmlinux(), files["qemu"], module_tmp)


@pytest.mark.parametrize("kind", ["sev", "es"])
def test_crash_sys_and_log_equal_crashs_on_qemus_dump(dumps, crash_truth, module_tmp, kind):
    files, kernels = dumps
    ours = crash(require_debug_vmlinux(), files[kind], module_tmp)
    release = kernels[kind]["release"]
    assert f"     RELEASE: {release}\n" in crash_truth["sys"]
    assert crash_truth["log"].count("\n") > 300 and f"Linux version {release} " in crash_truth["log"]
    assert ours["log"] == crash_truth["log"]
    drop = lambda text: [ln for ln in text.splitlines() if not ln.lstrip().startswith("DUMPFILE:")]  # noqa: E731
    assert drop(ours["sys"]) == drop(crash_truth["sys"])


@pytest.fixture(scope="module")
def drgn_truth(dumps, module_tmp):
    files, _ = dumps
    require_drgn()
    script = module_tmp / "view.py"
    script.write_text(DRGN_SCRIPT)
    r = subprocess.run([sys.executable, str(script), "--qemu-core", str(files["qemu"]), str(require_debug_vmlinux())],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.parametrize("kind", ["sev", "es"])
def test_drgn_release_tasks_and_dmesg_equal_drgns_on_qemus_dump(dumps, drgn_truth, module_tmp, kind):
    files, kernels = dumps
    drgn = require_drgn()
    script = module_tmp / "view.py"
    r = subprocess.run([drgn, "-q", "-c", str(files[kind]), "-s", str(require_debug_vmlinux()), str(script)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout.splitlines()[-1])
    assert drgn_truth["release"] == kernels[kind]["release"]
    comms = {comm for _, comm in drgn_truth["tasks"]}
    assert {"sh", "kthreadd", "sleep", "cat"} <= comms  # the guest's own processes, from QEMU's dump
    assert drgn_truth["dmesg"].count("\n") > 300
    assert ours == drgn_truth


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
