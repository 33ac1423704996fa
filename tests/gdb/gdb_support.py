"""Helpers for the gdb stub tests: the real gdb in batch mode, and a raw RSP client."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

GDB = "/usr/bin/gdb" if os.path.exists("/usr/bin/gdb") else shutil.which("gdb")


def need_gdb() -> str:
    """gdb's path; without gdb the test skips, except under CI where it must fail."""
    if GDB is None:
        if os.environ.get("CI") == "true":
            pytest.fail("gdb is not installed (CI must install it: apt-get install gdb)")
        pytest.skip("gdb is not installed")
    return GDB


def run_gdb(target: str, *commands: str, arch: str = "i386:x86-64", timeout: float = 60) -> str:
    """``gdb -batch`` connected to ``target``; its whole output (stdout and stderr)."""
    argv = [need_gdb(), "-batch", "-nx", "-ex", f"set architecture {arch}", "-ex", f"target remote {target}"]
    for c in commands:
        argv += ["-ex", c]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return out.stdout + out.stderr


def gdb_values(output: str) -> dict[str, str]:
    """``$N = value`` lines in order: {"$1": "0x..."}."""
    vals = {}
    for line in output.splitlines():
        if line.startswith("$") and " = " in line:
            k, _, v = line.partition(" = ")
            vals[k] = v.strip()
    return vals


def gdb_x_words(output: str, addr: int, count: int = 4) -> list[int] | None:
    """The ``count`` 8-byte words gdb's ``x/Ngx ADDR`` printed first for ``addr`` (two per line)."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"{addr:#x}:"):
            words = []
            for follow in lines[i:i + (count + 1) // 2]:
                words += [int(w, 16) for w in follow.partition(":")[2].split()]
            return words[:count]
    return None


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


class RspClient:
    """A raw Remote Serial Protocol client (acks handled), for what gdb -batch cannot script."""

    def __init__(self, path: str, timeout: float = 20):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, payload: str | bytes) -> None:
        p = payload.encode() if isinstance(payload, str) else payload
        self.sock.sendall(b"$" + p + b"#%02x" % checksum(p))

    def recv(self) -> str:
        """The next packet's payload (acks skipped; our own ack sent)."""
        while True:
            start = self.buf.find(b"$")
            end = self.buf.find(b"#", start) if start >= 0 else -1
            if start >= 0 and end >= 0 and len(self.buf) >= end + 3:
                payload = self.buf[start + 1:end]
                assert int(self.buf[end + 1:end + 3], 16) == checksum(payload)
                self.buf = self.buf[end + 3:]
                try:
                    self.sock.sendall(b"+")
                except OSError:   # the stub closed after its last packet (W00)
                    pass
                return payload.decode("latin-1")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("stub closed the connection")
            self.buf += chunk

    def ask(self, payload: str | bytes) -> str:
        self.send(payload)
        return self.recv()

    def close(self) -> None:
        self.sock.close()
