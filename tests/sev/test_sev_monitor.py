"""SEV on the monitor, end to end through a real daemon: query-sev*, info sev, info kvm,
the launch measurement verified independently, migration blockers, --kvm on this host,
debug refused under NODBG or --debug-policy off, and ciphertext at rest."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
import subprocess
import sys

from tests.conftest import FIXTURES, hmp, qmp_connect


def test_launch_with_bios_and_independent_measurement_check(make_daemon, tmp_path):
    bios = tmp_path / "bios.bin"
    bios.write_bytes(bytes(range(256)) * 256)
    d = make_daemon("--bios", str(bios))
    q = qmp_connect(d)
    info = q.cmd("query-sev")
    assert info["enabled"] is True and info["state"] == "running" and info["policy"] == 0
    assert info["handle"] >= 1
    blob = base64.b64decode(q.cmd("query-sev-launch-measure")["data"])
    assert len(q.cmd("query-sev-launch-measure")["data"]) == 64 and len(blob) == 48
    measure, mnonce = blob[:32], blob[32:]
    digest = hashlib.sha256(bios.read_bytes()).digest()
    msg = bytes([0x04, info["api-major"], info["api-minor"], info["build-id"]]) + struct.pack("<I", 0) + digest + mnonce
    assert hmac.new(bytes(16), msg, hashlib.sha256).digest() == measure
    assert hmp(q, "info kvm") == "kvm support: enabled\r\nmemory encryption: enabled\r\n"
    lines = hmp(q, "info sev").split("\r\n")
    assert lines[:2] == [f"handle: {info['handle']}", "state: running"]
    assert lines[3] == f"api version: {info['api-major']}.{info['api-minor']}"
    assert lines[4:6] == ["debug: on", "key-sharing: on"]
    caps = q.cmd("query-sev-capabilities")
    assert caps["cbitpos"] == 47 and caps["reduced-phys-bits"] == 1
    r = q.cmd_obj({"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:1"}})
    assert r["error"] == {"class": "GenericError", "desc": "sevmon migrates over unix: and exec: only, not tcp:"}
    assert hmp(q, "savevm s1") == "Error: SEV: Migration is not implemented\r\n"
    assert hmp(q, "migrate bogus") == "Error: Parameter 'uri' expects a valid migration protocol\r\n"
    r = q.cmd_obj({"execute": "query-sev-attestation-report", "arguments": {"mnonce": "AAAA"}})
    assert r["error"]["desc"] == "SEV: mnonce must be 16 bytes (got 3)"
    r = q.cmd_obj({"execute": "sev-inject-launch-secret", "arguments": {"packet-header": "AA==", "secret": "AA==",
                                                                         "gpa": 4096}})
    assert r["error"]["desc"] == "SEV: Not in correct state. (LSECRET) 3"
    q.close()


def test_info_sev_of_an_sev_es_guest_is_qemu_7_2s(make_daemon):
    """QEMU 7.2's hmp_info_sev and query-sev know no guest type (upstream's ``SEV type:`` line and ``sev-type`` came
    with SNP): an SEV-ES guest shows the same six lines and seven fields as an SEV one, its policy 0x4 the only
    sign."""
    q = qmp_connect(make_daemon("--policy", "0x4"))
    info = q.cmd("query-sev")
    assert info == {"enabled": True, "api-major": info["api-major"], "api-minor": info["api-minor"],
                    "build-id": info["build-id"], "policy": 4, "state": "running", "handle": info["handle"]}
    assert hmp(q, "info sev") == (f"handle: {info['handle']}\r\nstate: running\r\nbuild: {info['build-id']}\r\n"
                                  f"api version: {info['api-major']}.{info['api-minor']}\r\ndebug: on\r\n"
                                  "key-sharing: on\r\n")
    q.close()


def test_no_sev_answers_as_qemu_without_sev(make_daemon):
    q = qmp_connect(make_daemon("--no-sev"))
    assert q.cmd("query-sev") == {"enabled": False, "api-minor": 0, "handle": 0, "state": "uninit",
                                  "api-major": 0, "build-id": 0, "policy": 0}
    for cmd, args, desc in [("query-sev-launch-measure", {}, "SEV launch measurement is not available"),
                            ("query-sev-capabilities", {}, "KVM not enabled"),
                            ("query-sev-attestation-report", {"mnonce": "x"}, "SEV is not enabled"),
                            ("sev-inject-launch-secret", {"packet-header": "a", "secret": "b"},
                             "SEV not enabled for guest")]:
        assert q.cmd_obj({"execute": cmd, "arguments": args})["error"]["desc"] == desc
    assert hmp(q, "info sev") == "SEV is not enabled\r\n"
    assert hmp(q, "info kvm") == "kvm support: disabled\r\nmemory encryption: disabled\r\n"
    q.close()


def test_kvm_flag_on_a_host_without_sev_fails_with_one_sentence(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sevmon", "serve", "--kvm", "--qmp", str(tmp_path / "q.sock")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "SEV" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def _all_output(q, gva, gpa):
    outs = [hmp(q, c) for c in ("info mem", "info tlb", f"gva2gpa {gva:#x}", f"x /32xb {gva:#x}",
                                f"xp /32xb {gpa:#x}", f"xp /8c {gpa:#x}")]
    return outs


def test_debug_refused_under_nodbg_and_security_policy(make_daemon, tmp_path):
    fx = FIXTURES / "linux-4level"
    base = ["--core", str(fx / "core.elf"), "--cpu-state", str(fx / "cpu.json"), "--sev"]
    plain = qmp_connect(make_daemon(*base, hmp=False))
    secret_x = hmp(plain, "x /4xg 0x4000e8")
    assert "0x0000000600000001" in secret_x
    for extra in (["--policy", "0x1"], ["--debug-policy", "off"]):
        d = make_daemon(*base, *extra, hmp=False)
        q = qmp_connect(d)
        outs = _all_output(q, 0x4000E8, 0xB2A80E8)
        assert outs[3] == "00000000004000e8: Cannot access memory\r\n"
        assert outs[4] == "000000000b2a80e8: Cannot access memory\r\n"
        for o in (outs[0], outs[1], outs[2]):
            assert o.count("\r\n") == 1 and ("policy" in o), o
        for path_cmd in ("memsave", "pmemsave"):
            f = tmp_path / f"{path_cmd}-{extra[0]}.bin"
            addr = 0x4000E8 if path_cmd == "memsave" else 0xB2A80E8
            r = q.cmd_obj({"execute": path_cmd, "arguments": {"val": addr, "size": 4096, "filename": str(f)}})
            assert "error" in r and not f.exists()   # refused before any file was created
        dump = tmp_path / f"dump{extra[0]}.elf"
        r = q.cmd_obj({"execute": "dump-guest-memory", "arguments": {"paging": False, "protocol": f"file:{dump}"}})
        assert "error" in r and not dump.exists()
        stats = q.cmd("query-sev-debug-stats")
        assert stats["bytes-decrypted"] == 0
        q.close()
    plain.close()


def test_launch_secret_injected_by_the_guest_owner_under_prelaunch(make_daemon):
    """-S keeps the guest in launch-secret; the owner verifies the measurement, wraps a
    secret with the (all-zero, no DH session) TEK/TIK, and the guest sees it in its RAM."""
    import os

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    q = qmp_connect(make_daemon("-S", hmp=False))
    assert q.cmd("query-status") == {"status": "prelaunch", "singlestep": False, "running": False}
    assert q.cmd("query-sev")["state"] == "launch-secret"
    measure = base64.b64decode(q.cmd("query-sev-launch-measure")["data"])[:32]
    secret, iv, gpa = b"disk key: 0123456789abcdef012345", os.urandom(16), 0x800000
    wrapped = Cipher(algorithms.AES(bytes(16)), modes.CTR(iv)).encryptor().update(secret)
    mac = hmac.new(bytes(16), b"\x01" + struct.pack("<I", 0) + iv + struct.pack("<II", len(secret), len(wrapped))
                   + wrapped + measure, hashlib.sha256).digest()
    header = struct.pack("<I", 0) + iv + mac

    def inject(hdr: bytes):
        return q.cmd_obj({"execute": "sev-inject-launch-secret", "arguments": {
            "packet-header": base64.b64encode(hdr).decode(), "secret": base64.b64encode(wrapped).decode(),
            "gpa": gpa}})

    bad = inject(header[:-1] + bytes([header[-1] ^ 1]))
    assert bad["error"]["desc"].startswith("SEV: failed to inject secret ret=-1 fw_error=")
    assert inject(header) == {"return": {}}
    dump = hmp(q, f"xp /4xg {gpa:#x}")
    words = [int(w, 16) for w in dump.split() if w.startswith("0x")]
    assert b"".join(w.to_bytes(8, "little") for w in words) == secret
    assert hmp(q, "info mem") == "PG disabled\r\n"
    q.cmd("cont")
    assert q.cmd("query-sev")["state"] == "running"
    assert inject(header)["error"]["desc"] == "SEV: Not in correct state. (LSECRET) 3"
    assert hmp(q, "info mem").startswith("0000000000400000-")  # the guest booted on the first run
    q.close()
