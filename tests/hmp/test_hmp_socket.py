"""HMP on a UNIX socket, as QEMU's -monitor unix:PATH,server: banner, prompt, commands,
several clients at once."""

from __future__ import annotations

from sevmon import __version__
from sevmon.testing import HMPSocket


def test_banner_prompt_and_commands(daemon):
    c = HMPSocket(daemon.hmp, timeout=10)
    assert c.banner == f"sevmon {__version__} monitor - type 'help' for more information\r\n"
    assert c.run("info status").startswith("VM status: ")
    assert c.run("stop") == ""  # no echo of the line (README, Differences from QEMU 7.2)
    assert c.run("info status") == "VM status: paused\r\n"
    assert c.run("nosuch") == "unknown command: 'nosuch'\r\n"


def test_two_clients_at_once(daemon):
    a, b = HMPSocket(daemon.hmp, timeout=10), HMPSocket(daemon.hmp, timeout=10)
    assert a.run("stop") == ""
    assert b.run("info status") == "VM status: paused\r\n"
    assert a.run("cont") == ""
    assert b.run("info status") == "VM status: running\r\n"
    b.send(b"info sta")  # b leaves half a line; a is not held up
    assert a.run("help quit") == "quit|q  -- quit the emulator\r\n"
    b.send(b"tus\r\n")
    assert b.until_prompt() == "VM status: running\r\n"
