"""``sevmon shell``: the real interactive shell in a pseudo-terminal, ``--command`` mode,
and the completer fed with a real daemon's ``help``/``info`` tables.

The interactive cases run ``python -m sevmon.shell SOCKET`` on the slave side of
``os.openpty()`` (no tmux, no pexpect) and read what it draws; escape sequences are
stripped before matching. Cases that need a daemon feature assert it is there: its loss
is a failure, never a skip.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from sevmon.shell.completion import HelpEntry, MonitorCompleter, file_arg_index, parse_help
from sevmon.shell.events import format_event
from sevmon.shell.progress import format_bar, watch_dump, with_detach

SHELL = [sys.executable, "-m", "sevmon.shell"]
ANSI = re.compile(r"\x1b(\[[0-9;?<=>]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|[=>78DEM])")


# -- helpers -------------------------------------------------------------------------------
class Terminal:
    """The shell on a pseudo-terminal: keys in, the text it draws (escapes removed) out."""

    def __init__(self, argv: list[str], env: dict, rows: int = 50, cols: int = 200):
        self.fd, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        # A session of its own with the terminal as its controlling tty, so that Ctrl-C
        # typed while a command runs (the terminal is cooked then) is SIGINT, as in a shell.
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True, close_fds=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.raw = b""
        self.pos = 0  # expect() looks from here on

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode(errors="replace"))

    def _pump(self, timeout: float) -> bool:
        """Read what is there; False once the child has closed the terminal."""
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return True
        try:
            data = os.read(self.fd, 1 << 16)
        except OSError:  # EIO: no process has the slave open any more
            return False
        self.raw += data
        return bool(data)

    def expect(self, needle: str, timeout: float = 20) -> str:
        """Wait for ``needle`` after the previous match; return the text between."""
        deadline = time.monotonic() + timeout
        alive = True
        while True:
            text = self.text
            i = text.find(needle, self.pos)
            if i >= 0:
                between, self.pos = text[self.pos:i], i + len(needle)
                return between
            if time.monotonic() > deadline or not alive:
                raise AssertionError(f"{needle!r} not shown; the terminal shows:\n{text[self.pos:]}")
            alive = self._pump(0.05)

    def skip(self) -> None:
        """Forget what has been shown so far: expect() looks only at what comes next."""
        self.pos = len(self.text)

    def settle(self, seconds: float = 0.3) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and self._pump(0.02):
            pass

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._pump(0.05)
        self.settle(0.2)
        return self.proc.wait(1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


@pytest.fixture
def terminal(tmp_path):
    terms = []

    def start(socket: str) -> Terminal:
        env = dict(os.environ, TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1",
                   XDG_STATE_HOME=str(tmp_path / "state"), HOME=str(tmp_path))
        t = Terminal([*SHELL, socket], env)
        terms.append(t)
        t.expect("(qemu)")
        return t

    yield start
    for t in terms:
        t.close()


def run_shell(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*SHELL, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def hmp(raw, line: str) -> str:
    """The daemon's own answer to an HMP line, via a raw QMP client."""
    return raw.cmd("human-monitor-command", {"command-line": line})["return"]


def info_names(raw) -> set[str]:
    return {n for e in parse_help(hmp(raw, "info"), prefix="info ") for n in e.names}


def qmp_commands(raw) -> set[str]:
    return {c["name"] for c in raw.cmd("query-commands")["return"]}


# -- the interactive shell -----------------------------------------------------------------
def test_typed_info_kvm_shows_the_daemon_output(daemon, raw, terminal, tmp_path):
    expected = hmp(raw(), "info kvm").replace("\r\n", "\n")
    sev = "query-sev" in qmp_commands(raw())
    t = terminal(daemon.qmp)
    t.type("info kvm\r")
    t.expect("kvm support:")
    t.expect("(qemu)")
    shown = t.text
    for line in expected.splitlines():
        assert line in shown
    if sev:  # the built-in guest is an SEV guest once SEV has landed
        assert "memory encryption: enabled" in shown
    t.type("\x04")  # Ctrl-D leaves
    assert t.wait() == 0
    history = tmp_path / "state" / "sevmon" / "history"
    assert "info kvm" in history.read_text()
    assert os.stat(history).st_mode & 0o777 == 0o600  # typed lines can hold secrets


def test_banner_as_qemus_hmp(daemon, terminal):
    from sevmon import __version__

    t = terminal(daemon.qmp)
    assert f"sevmon {__version__} monitor - type 'help' for more information\n" in t.text.replace("\r", "")
    t.type("\x04")
    assert t.wait() == 0


def test_existing_history_file_is_made_private(daemon, terminal, tmp_path):
    history = tmp_path / "state" / "sevmon" / "history"
    history.parent.mkdir(parents=True)
    history.write_text("\n# 2026-01-01 00:00:00\n+info version\n")
    history.chmod(0o644)
    t = terminal(daemon.qmp)
    t.type("\x04")
    assert t.wait() == 0
    assert os.stat(history).st_mode & 0o777 == 0o600 and "+info version" in history.read_text()


def test_tab_completes_an_info_subcommand(daemon, terminal):
    t = terminal(daemon.qmp)
    t.type("info ver\t")
    t.expect("info version")
    t.type("\r")
    t.expect("sevmon")  # info version: 7.2.x (sevmon ...)
    t.expect("(qemu)")


def test_tab_completes_info_mem(daemon, raw, terminal):
    c = raw()
    assert "mem" in info_names(c)
    c.cmd("stop")  # the built-in guest maps pages while it runs: freeze info mem
    first_line = hmp(c, "info mem").splitlines()[0]
    t = terminal(daemon.qmp)
    t.type("info me\t")
    t.expect("info mem")
    t.type("\r")
    t.expect(first_line)
    assert "unknown command" not in t.text


def test_event_shown_while_a_line_is_half_typed(daemon, raw, terminal):
    version = hmp(raw(), "info version").strip()
    t = terminal(daemon.qmp)
    t.type("info ver")
    t.expect("info ver")
    t.settle()
    raw().cmd("stop")  # another client stops the guest: STOP reaches every client
    t.expect("[event] STOP")
    t.expect("info ver")  # the prompt is redrawn below the event with the line kept
    t.type("sion\r")  # finish the line: it runs as typed before the event
    t.expect(version)
    t.expect("(qemu)")
    t.type("\x04")
    assert t.wait() == 0


def test_ctrl_c_drops_the_line_and_the_shell_goes_on(daemon, raw, terminal):
    version = hmp(raw(), "info version").strip()
    t = terminal(daemon.qmp)
    t.type("info version")
    t.expect("info version")
    t.type("\x03")  # Ctrl-C
    t.expect("(qemu)")
    t.type("info status\r")
    t.expect("VM status:")
    t.expect("(qemu)")
    assert version not in t.text
    t.type("\x04")
    assert t.wait() == 0


def test_ctrl_c_abandons_a_command_that_hangs(daemon, terminal):
    t = terminal(daemon.qmp)
    os.kill(daemon.proc.pid, signal.SIGSTOP)  # the daemon stops answering
    try:
        t.type("info status\r")
        t.expect("info status")
        t.settle(0.5)
        t.skip()  # past the redrawn "(qemu) info status" of the accepted line
        t.type("\x03")  # the terminal is cooked while a command runs: this is SIGINT
        t.expect("^C")
        t.expect("(qemu)")
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    t.type("info version\r")  # the late reply to the abandoned command is dropped
    t.expect("sevmon")
    t.expect("(qemu)")
    assert "VM status" not in t.text
    t.type("\x04")
    assert t.wait() == 0


def test_lost_connection_is_one_sentence_and_status_1(daemon, terminal):
    t = terminal(daemon.qmp)
    t.type("info st")
    t.settle()
    daemon.stop()
    t.expect(f"sevmon shell: lost the connection to {daemon.qmp}")
    assert t.wait() == 1
    assert "Traceback" not in t.text


def test_quit_ends_the_shell_with_status_0(daemon, terminal):
    t = terminal(daemon.qmp)
    t.type("quit\r")
    assert t.wait() == 0
    assert daemon.proc.wait(15) == 0
    assert "lost the connection" not in t.text


def test_dump_guest_memory_runs_detached_with_a_progress_bar(daemon, raw, terminal, tmp_path):
    assert {"dump-guest-memory", "query-dump"} <= qmp_commands(raw())
    core = tmp_path / "guest.core"
    t = terminal(daemon.qmp)
    t.type(f"dump-guest-memory {core}\r")
    t.expect("dump-guest-memory [")
    t.expect("100%")
    t.expect("[event] DUMP_COMPLETED")  # after the bar's 100%, never above a bar still short of it
    t.expect("(qemu)")
    assert core.read_bytes()[:4] == b"\x7fELF"
    assert raw().cmd("query-dump")["return"]["status"] == "completed"


# -- --command mode ------------------------------------------------------------------------
def test_command_mode_prints_the_outputs_and_exits_0(daemon, raw):
    c = raw()
    lines = ["info kvm", "info version", "xp /1xg 0x7ff00000000"]  # Cannot access memory is an answer, as in QEMU
    expected = "".join(hmp(c, line) for line in lines).replace("\r\n", "\n")
    p = run_shell(daemon.qmp, *(a for line in lines for a in ("-c", line)))
    assert (p.returncode, p.stderr) == (0, "")
    assert p.stdout == expected


@pytest.mark.parametrize("line, words", [
    ("no-such-command", "unknown command: 'no-such-command'"),
    ("info no-such-thing", "unknown command: 'info no-such-thing'"),
    ('memsave 0x400000 4096 "/nonexistent/dir/x"', "Error: "),          # a failed memsave
    ("pmemsave 0 4096 /tmp/x", 'Try "help pmemsave" for more information'),  # a bad argument
])
def test_command_mode_hmp_failure_gives_status_1(daemon, raw, line, words):
    version = hmp(raw(), "info version").replace("\r\n", "\n")
    p = run_shell(daemon.qmp, "-c", line, "-c", "info version")
    assert p.returncode == 1, p.stdout
    assert words in p.stdout
    assert p.stdout.endswith(version)  # later lines still run


def test_command_mode_qmp_error_gives_status_1(daemon, raw):
    version = hmp(raw(), "info version").replace("\r\n", "\n")
    p = run_shell(daemon.qmp, "-c", '{"execute": "no-such-command"}', "-c", "info version")
    assert p.returncode == 1
    assert "CommandNotFound" in p.stderr
    assert p.stdout == version  # later lines still run


def test_standard_input_script(daemon, raw):
    c = raw()
    expected = (hmp(c, "info kvm") + hmp(c, "info version")).replace("\r\n", "\n")
    p = subprocess.run([*SHELL, daemon.qmp], input="info kvm\n\ninfo version\n",
                       capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout, p.stderr) == (0, expected, "")


def test_command_mode_raw_qmp_command(daemon):
    p = run_shell(daemon.qmp, "-c", '{"execute": "query-status"}')
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["status"] in ("running", "paused")


def test_command_mode_socket_missing(tmp_path):
    path = tmp_path / "nothing.sock"
    p = run_shell(str(path), "-c", "info kvm")
    assert p.returncode == 1
    assert p.stdout == ""
    assert p.stderr == f"sevmon shell: cannot connect to {path}: No such file or directory\n"


def test_hmp_socket_is_not_a_qmp_server(daemon):
    p = run_shell(daemon.hmp, "-c", "info kvm")
    assert p.returncode == 1
    assert p.stderr.startswith(f"sevmon shell: cannot connect to {daemon.hmp}: not a QMP server")
    assert p.stderr.count("\n") == 1


def test_command_mode_lost_connection(daemon):
    # QMP quit (not HMP quit, after which the shell expects the link to close), then more
    # lines: the daemon may still answer a few while it shuts down, not 2000.
    p = run_shell(daemon.qmp, "-c", '{"execute": "quit"}', *["-c", "info version"] * 2000)
    assert p.returncode == 1
    assert p.stderr == f"sevmon shell: lost the connection to {daemon.qmp}\n"


def test_command_mode_hmp_quit_is_status_0(daemon):
    p = run_shell(daemon.qmp, "-c", "quit")
    assert (p.returncode, p.stderr) == (0, "")
    assert daemon.proc.wait(15) == 0


def test_cpu_selects_the_vcpu_index(daemon):
    p = run_shell(daemon.qmp, "-c", "cpu 99", "-c", "cpu 0", "-c", "info status")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("invalid CPU index\nVM status:")


def test_sevmon_shell_subcommand(daemon):
    p = subprocess.run([sys.executable, "-m", "sevmon", "shell", daemon.qmp, "-c", "info status"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("VM status:")


# -- completion, from the daemon's own tables ----------------------------------------------
def completions(completer, text: str) -> list[str]:
    return [c.text for c in completer.get_completions(Document(text, len(text)), CompleteEvent(True))]


@pytest.fixture
def completer(raw):
    c = raw()
    return MonitorCompleter(parse_help(hmp(c, "help")), parse_help(hmp(c, "info"), prefix="info "))


def test_completer_learns_commands_from_help(completer, raw):
    help_text = hmp(raw(), "help")
    names = completer.command_names()
    assert "info" in names and "stop" in names and "s" in names  # aliases too
    for line in help_text.splitlines():
        if line and not line[0].isspace():
            assert line.split()[0].split("|")[0] in names
    assert completions(completer, "inf") == ["info "]
    assert completions(completer, "help sto") == ["stop "]


def test_completer_info_subcommands(completer, raw):
    assert {c.rstrip() for c in completions(completer, "info ")} == info_names(raw())
    assert completions(completer, "info ver") == ["version "]
    assert completions(completer, "info version ") == []


def test_completer_registers_after_dollar(completer):
    assert completions(completer, "print $ri") == ["rip"]
    assert set(completions(completer, "x /4gx $cr")) == {"cr0", "cr2", "cr3", "cr4"}
    assert "rsp" in completions(completer, "p $rsp+8-$rs")


def test_completer_file_argument(completer, raw, tmp_path):
    assert {"memsave", "pmemsave", "dump-guest-memory"} <= set(completer.command_names())
    (tmp_path / "core.bin").write_bytes(b"")
    (tmp_path / "cpu.json").write_bytes(b"")
    d = f"{tmp_path}/"
    assert completions(completer, f"memsave 0x1000 4096 {d}co") == ["re.bin"]
    assert completions(completer, f"pmemsave $cr3 4096 {d}cp") == ["u.json"]
    assert completions(completer, f"dump-guest-memory -p -z {d}core") == [".bin"]
    assert completions(completer, f"dump-guest-memory {d}c") == ["ore.bin", "pu.json"]
    assert completions(completer, f"memsave 0x1000 {d}co") == []  # the size, not the file


def test_parse_help_and_file_argument_from_qemu_lines():
    text = ("dump-guest-memory [-p] [-d] [-z|-l|-s|-w] filename [begin length] -- dump guest memory\r\n"
            "\t\t\t-p: do paging -- continuation\r\n"
            "memsave addr size file -- save to disk virtual memory dump\r\n"
            "cont|c  -- resume emulation\r\n")
    entries = parse_help(text)
    assert [e.names for e in entries] == [("dump-guest-memory",), ("memsave",), ("cont", "c")]
    assert [file_arg_index(e) for e in entries] == [0, 2, None]
    assert file_arg_index(HelpEntry(("pmemsave",), "", "")) == 2  # fallback without params


# -- the helpers behind the interactive output ---------------------------------------------
def test_with_detach_puts_d_in_qemu_flag_order():
    assert with_detach("dump-guest-memory f.core") == "dump-guest-memory -d f.core"
    assert with_detach("dump-guest-memory -p f.core 0 4096") == "dump-guest-memory -p -d f.core 0 4096"
    assert with_detach("dump-guest-memory -z f") == "dump-guest-memory -d -z f"
    assert with_detach("dump-guest-memory -p -d f") == "dump-guest-memory -p -d f"


def test_format_event_is_one_line():
    assert format_event({"event": "STOP", "data": {}}) == "[event] STOP"
    assert format_event({"event": "SHUTDOWN", "data": {"guest": False, "reason": "host-qmp-quit"}}) == \
        "[event] SHUTDOWN guest=false reason=host-qmp-quit"
    line = format_event({"event": "DUMP_COMPLETED",
                         "data": {"result": {"status": "failed"}, "error": "disk\nfull \x1b[2J"}})
    assert "\n" not in line and "\x1b" not in line
    assert line.startswith('[event] DUMP_COMPLETED result={"status": "failed"} error="disk')


def test_watch_dump_polls_until_completed():
    replies = iter([{"status": "active", "completed": 0, "total": 8 << 20},
                    {"status": "active", "completed": 4 << 20, "total": 8 << 20},
                    {"status": "completed", "completed": 8 << 20, "total": 8 << 20}])
    drawn = []

    async def query():
        return next(replies)

    import asyncio
    last = asyncio.run(watch_dump(query, drawn.append))
    assert last["status"] == "completed"
    assert drawn == [format_bar(0, 8 << 20), format_bar(4 << 20, 8 << 20), format_bar(8 << 20, 8 << 20)]
    assert " 50%" in drawn[1] and "100%" in drawn[2]


def test_history_path_follows_xdg(monkeypatch, tmp_path):
    from sevmon.shell.app import history_path

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert history_path() == tmp_path / "sevmon" / "history"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert history_path() == Path(tmp_path) / ".local" / "state" / "sevmon" / "history"
