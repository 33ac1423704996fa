"""An SEV-ES guest with NODBG (``--policy 0x5``) is refused from every entry point, as a plain SEV one is: the
firmware would refuse DBG_DECRYPT, so sevmon says why before asking it."""

from __future__ import annotations

from tests.conftest import hmp, qmp_connect
from tests.gdb.gdb_support import RspClient, need_gdb

NODBG = "the SEV guest policy 0x5 forbids debug access (NODBG): guest memory cannot be decrypted"


def test_nodbg_es_guest_is_refused_everywhere(make_daemon, tmp_path):
    need_gdb()
    d = make_daemon("--policy", "0x5", "--gdb", "unix:gdb.sock")
    q = qmp_connect(d)
    try:
        assert q.cmd_obj({"execute": "query-sev"})["return"]["policy"] == 5
        assert hmp(q, "xp /2xg 0x1000000") == "0000000001000000: Cannot access memory\r\n"  # QEMU's words
        assert hmp(q, f'pmemsave 0x1000000 4096 "{tmp_path / "p.bin"}"').strip() == f"Error: {NODBG}"
        for cmd, args in (("pmemsave", {"val": 0x1000000, "size": 4096, "filename": str(tmp_path / "q.bin")}),
                          ("dump-guest-memory", {"paging": False, "protocol": f"file:{tmp_path / 'core'}"})):
            r = q.cmd_obj({"execute": cmd, "arguments": args})
            assert r["error"]["desc"] == NODBG, (cmd, r)
        assert "debug: off" in hmp(q, "info sev")
    finally:
        q.close()
    c = RspClient(d.qmp.replace("qmp.sock", "gdb.sock"))
    try:
        c.send("Qqemu.PhyMemMode:1")  # physical reads: no CR3 needed, only the firmware's debug command
        assert c.recv() == "OK"
        c.send("m1000000,10")
        assert c.recv().startswith("E")
    finally:
        c.close()
