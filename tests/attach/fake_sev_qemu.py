"""A stand-in for QEMU running an SEV guest under KVM, as far as sevmon's attach asks: QMP on a UNIX socket, a
16 MiB memfd RAM backend (share=on), query-sev enabled with policy 0x0, query-sev-capabilities C-bit 51. It has no
KVM VM; on a host without SEV sevmon stops before looking for one. Usage: python fake_sev_qemu.py SOCKET [snp]
(``snp``: query-sev answers as QEMU 9.1+ does for an SEV-SNP guest, with ``sev-type`` and ``snp-policy``; ``es``:
as QEMU 7.2 does for an SEV-ES guest, policy 0x5)."""

import json
import os
import socket
import sys

SIZE = 16 << 20
MTREE = ('FlatView #0\n AS "memory", root: system\n Root memory region: system\n'
         f"  0000000000000000-{SIZE - 1:016x} (prio 0, ram): ram0\n")
REPLIES = {
    "query-memdev": [{"id": "ram0", "size": SIZE, "merge": True, "dump": True, "prealloc": False, "share": True,
                      "host-nodes": [], "policy": "default"}],
    "query-cpus-fast": [{"cpu-index": 0, "qom-path": "/machine/unattached/device[0]", "thread-id": os.getpid(),
                         "target": "x86_64"}],
    "query-status": {"status": "paused", "running": False, "singlestep": False},
    "query-kvm": {"enabled": True, "present": True},
    "query-sev": {"enabled": True, "api-major": 0, "api-minor": 24, "build-id": 15, "policy": 0, "state": "running",
                  "handle": 1},
    "query-sev-capabilities": {"pdh": "", "cert-chain": "", "cpu0-id": "", "cbitpos": 51, "reduced-phys-bits": 1},
}


SNP_SEV = {"enabled": True, "api-major": 1, "api-minor": 55, "build-id": 21, "sev-type": "sev-snp",
           "snp-policy": 0x30000, "state": "running", "handle": 1}


def main(path: str, kind: str = "sev") -> None:
    if kind == "snp":
        REPLIES["query-sev"] = SNP_SEV
    elif kind == "es":   # QEMU 7.2's answer for an SEV-ES guest: no sev-type, the policy's ES bit (0x4)
        REPLIES["query-sev"] = {**REPLIES["query-sev"], "policy": 0x5}
    fd = os.memfd_create("memory-backend-memfd")
    os.ftruncate(fd, SIZE)
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    conn, _ = srv.accept()
    greeting = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
                        "capabilities": ["oob"]}}
    conn.sendall(json.dumps(greeting).encode() + b"\r\n")
    buf, dec = "", json.JSONDecoder()
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk.decode()
        while buf.strip():
            try:
                msg, end = dec.raw_decode(buf.lstrip())
            except ValueError:
                break  # QMP clients need not end a message with a newline: wait for the rest
            buf = buf.lstrip()[end:]
            cmd = msg.get("execute")
            args = msg.get("arguments", {})
            if cmd == "qom-get":
                ret = "memory-backend-memfd" if args.get("property") == "type" else ""
            elif cmd == "human-monitor-command":
                ret = MTREE if args.get("command-line") == "info mtree -f" else ""
            else:
                ret = REPLIES.get(cmd, {})
            reply = {"return": ret}
            if "id" in msg:
                reply["id"] = msg["id"]
            try:
                conn.sendall(json.dumps(reply).encode() + b"\r\n")
            except OSError:
                return
    os.close(fd)


if __name__ == "__main__":
    main(*sys.argv[1:3])
