"""HMP on a UNIX socket, as QEMU's -monitor unix:PATH,server: banner, prompt, commands,
several clients at once."""

from __future__ import annotations

import socket

from sevmon import __version__


class HmpClient:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(path)
        self.buf = b""

    def until_prompt(self) -> str:
        while not self.buf.endswith(b"(qemu) "):
            chunk = self.s.recv(65536)
            assert chunk, "connection closed"
            self.buf += chunk
        out, self.buf = self.buf[:-len(b"(qemu) ")], b""
        return out.decode()

    def run(self, line: str) -> str:
        self.s.sendall(line.encode() + b"\n")
        return self.until_prompt()


def test_banner_prompt_and_commands(daemon):
    c = HmpClient(daemon.hmp)
    assert c.until_prompt() == f"sevmon {__version__} monitor - type 'help' for more information\r\n"
    assert c.run("info status").startswith("VM status: ")
    assert c.run("stop") == ""  # no echo of the line (README, Differences from QEMU 7.2)
    assert c.run("info status") == "VM status: paused\r\n"
    assert c.run("nosuch") == "unknown command: 'nosuch'\r\n"


def test_two_clients_at_once(daemon):
    a, b = HmpClient(daemon.hmp), HmpClient(daemon.hmp)
    a.until_prompt()
    b.until_prompt()
    assert a.run("stop") == ""
    assert b.run("info status") == "VM status: paused\r\n"
    assert a.run("cont") == ""
    assert b.run("info status") == "VM status: running\r\n"
    b.s.sendall(b"info sta")  # b leaves half a line; a is not held up
    assert a.run("help quit") == "quit|q  -- quit the emulator\r\n"
    b.s.sendall(b"tus\r\n")
    assert b.until_prompt() == "VM status: running\r\n"
