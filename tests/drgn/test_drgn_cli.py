"""``sevmon drgn``'s refusals: one sentence on stderr, exit status 1, nothing on stdout (no guest data), before
drgn ever sees a byte. And drgn without symbols on the built-in guest (no vmlinux exists for it): memory by address,
through the kernel's own tables. Live runs on a real guest with Debian's vmlinux: tests/live/test_drgn_live.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sevmon.debug.refusal import SECURITY_POLICY
from tests.live.conftest import require_drgn


def sevmon_drgn(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"import sys\n{prelude}\nfrom sevmon.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "drgn", *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": os.getcwd()})


@pytest.fixture
def script(tmp_path):
    s = tmp_path / "tasks.py"
    s.write_text("print('guest data:', prog['init_task'].comm)\n")
    v = tmp_path / "vmlinux"
    v.write_bytes(b"\x7fELF")
    return str(s), str(v)


def assert_refused(r, sentence: str) -> None:
    assert r.returncode == 1, r
    assert r.stdout == ""
    assert r.stderr == f"sevmon drgn: {sentence}\n"


@pytest.mark.parametrize("args, reason", [
    (("--policy", "0x1"), "the SEV guest policy 0x1 forbids debug access (NODBG): guest memory cannot be decrypted"),
    (("--debug-policy", "off"), SECURITY_POLICY),
])
def test_debugging_refused(sevmon_daemon, script, args, reason):
    require_drgn()
    d = sevmon_daemon(*args)
    s0 = d.qmp.cmd("query-sev-debug-stats")
    assert_refused(sevmon_drgn(d.qmp_path, "-s", script[1], script[0]), reason)
    assert d.qmp.cmd("query-sev-debug-stats")["firmware-calls"] == s0["firmware-calls"]


def test_no_linux_in_the_guest(sevmon_daemon, script, tmp_path):
    require_drgn()
    (tmp_path / "ram.bin").write_bytes(bytes(1 << 20))
    d = sevmon_daemon("--raw", str(tmp_path / "ram.bin"), "--sev")
    assert_refused(sevmon_drgn(d.qmp_path, "-s", script[1], script[0]),
                   "no 64-bit Linux kernel was found in guest memory (no page starts with a usable VMCOREINFO text)")


def test_no_socket_no_vmlinux_no_drgn(script, tmp_path):
    require_drgn()
    sock = str(tmp_path / "none.sock")
    assert_refused(sevmon_drgn(sock, "-s", script[1], script[0]),
                   f"{sock}: no such socket (is sevmon serve running with --qmp {sock}?)")
    assert_refused(sevmon_drgn(sock, "-s", str(tmp_path / "nope"), script[0]),
                   f"{tmp_path / 'nope'}: no such file (the guest kernel's debug vmlinux)")
    assert_refused(sevmon_drgn(sock, "-s", script[1], script[0], prelude="sys.modules['drgn'] = None"),
                   "drgn is not installed: pip install 'sevmon[drgn]'")
    r = sevmon_drgn(sock, "-s")
    assert r.returncode == 2 and r.stderr.endswith("argument -s/--symbols: expected one argument\n")


def test_a_vmcoreinfo_drgn_cannot_use(sevmon_daemon, script, tmp_path):
    """A kernel sevmon can walk (init_top_pgt) whose VMCOREINFO lacks what drgn needs (swapper_pg_dir): drgn's
    words, in one sentence."""
    require_drgn()
    ram = bytearray(4 << 20)
    text = (b"OSRELEASE=6.1.0-test\nPAGESIZE=4096\nSYMBOL(init_top_pgt)=ffffffff80200000\nNUMBER(phys_base)=0\n"
            b"NUMBER(pgtable_l5_enabled)=0\nKERNELOFFSET=0\n")
    ram[0x100000:0x100000 + len(text)] = text
    (tmp_path / "ram.bin").write_bytes(bytes(ram))
    d = sevmon_daemon("--raw", str(tmp_path / "ram.bin"), "--sev")
    assert d.qmp.cmd("query-guest-kernel")["release"] == "6.1.0-test"
    assert_refused(sevmon_drgn(d.qmp_path, "-s", script[1], script[0]),
                   "drgn cannot use the guest's VMCOREINFO: VMCOREINFO does not contain valid swapper_pg_dir")


@pytest.mark.parametrize("policy", ["0x0", "0x4"], ids=["sev", "sev-es"])
def test_without_symbols_memory_by_address_on_the_built_in_guest(sevmon_daemon, policy):
    """No vmlinux exists for the built-in guest: drgn without one reads memory by address, a kernel virtual address
    through the kernel's own tables (an SEV-ES guest's registers are never needed), the bytes HMP x shows."""
    require_drgn()
    d = sevmon_daemon("--policy", policy, "--no-workload")
    d.qmp.cmd("stop")
    va = 0xffffffff81000000
    words = d.qmp.hmp(f"x /2gx {va:#x}").split()[1:3]
    want = b"".join(int(w, 16).to_bytes(8, "little") for w in words)
    r = subprocess.run([sys.executable, "-m", "sevmon", "drgn", d.qmp_path], input=f"print(prog.read({va:#x}, 16).hex())\n",
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert r.stdout == want.hex() + "\n"
    assert want.startswith(b"kernel text")
