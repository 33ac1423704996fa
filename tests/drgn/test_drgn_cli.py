"""``sevmon drgn``'s refusals: one sentence on stderr, exit status 1, nothing on stdout (no guest data), before
drgn ever sees a byte. The built-in guest serves here (its VMCOREINFO has no ``swapper_pg_dir``, so drgn itself
refuses it: the last case). Live runs on a real guest: tests/live/test_drgn_live.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sevmon.debug.refusal import SECURITY_POLICY


def require_drgn() -> None:
    try:
        import drgn  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("drgn is not installed (pip install 'sevmon[drgn]'; CI=true: these tests must run)")
        pytest.skip("drgn is not installed (pip install 'sevmon[drgn]')")


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
    r = sevmon_drgn(sock, script[0])
    assert r.returncode == 2 and r.stderr.endswith("the following arguments are required: -s/--symbols\n")


def test_a_vmcoreinfo_drgn_cannot_use(sevmon_daemon, script):
    require_drgn()
    d = sevmon_daemon()
    assert_refused(sevmon_drgn(d.qmp_path, "-s", script[1], script[0]),
                   "drgn cannot use the guest's VMCOREINFO: VMCOREINFO does not contain valid swapper_pg_dir")
