"""``sevmon shell [QMP_SOCKET]``: an HMP prompt over QMP, like QEMU's monitor console.

The shell is a ``qemu.qmp`` client. Each line typed at ``(qemu)`` goes to the daemon as
``human-monitor-command`` and the reply is printed as the daemon wrote it (its ``\\r\\n``
line ends become ``\\n``). Besides HMP lines it understands, as ``qmp-shell -H`` does:

* ``cpu N`` -- choose the vCPU later commands run on (QMP's ``cpu-index``), kept here
  because every ``human-monitor-command`` starts a fresh monitor;
* ``{"execute": ..., "arguments": {...}}`` -- one raw QMP command, reply printed as JSON.

Events are printed above the prompt as they arrive (``[event] STOP``) without disturbing
the line being typed; ``dump-guest-memory`` runs detached with a progress bar; Tab
completes from the daemon's own ``help``/``info`` tables (:mod:`.completion`). History
lives in ``$XDG_STATE_HOME/sevmon/history`` (mode 0600). A banner greets, as QEMU's HMP. Ctrl-C drops the current line (or stops
watching a running dump), Ctrl-D leaves.

``-c LINE`` (repeatable) runs lines without a prompt, as does a standard input that is
not a terminal (``sevmon shell SOCK < script``); the exit status is 0, or 1 if a line
failed: a QMP error, or an HMP reply that says so (:func:`hmp_failed`). Whatever the mode, a missing socket or a lost connection ends the
shell with one sentence on stderr and status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError
from qemu.qmp.protocol import Runstate
from qemu.qmp.qmp_client import GreetingError, NegotiationError

from sevmon.shell.banner import banner
from sevmon.shell.completion import HelpEntry, MonitorCompleter, parse_help
from sevmon.shell.events import format_event
from sevmon.shell.history import open_private
from sevmon.shell.progress import is_dump_line, watch_dump, with_detach

__all__ = ["PROMPT", "ConnectionLost", "Monitor", "Shell", "history_path", "run_shell"]

PROMPT = "(qemu) "
CONNECT_TIMEOUT = 15.0  # seconds for the socket to answer with a QMP greeting
QUIT_WAIT = 2.0  # seconds to let the daemon close the socket after ``quit``


def hmp_failed(out: str) -> bool:
    """Whether an HMP reply says the command failed. ``human-monitor-command`` succeeds whatever the command did
    (QEMU's HMP has no status), so the reply's words are all there is: QEMU's ``Error: ...`` (hmp_handle_error),
    ``unknown command: ...``, and an argument error's ``Try "help CMD" for more information``."""
    lines = out.replace("\r\n", "\n").split("\n")
    return (out.startswith(("Error: ", "unknown command: "))
            or any(x.startswith('Try "help ') and x.endswith('" for more information') for x in lines))


class ShellExit(Exception):
    """Ends the shell with ``str()`` as the one sentence on stderr and status 1."""


class ConnectionLost(ShellExit):
    def __init__(self, path: str):
        super().__init__(f"lost the connection to {path}")


class _Quit(Exception):
    """The user quit the daemon: the connection closing is expected."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class Monitor:
    """The QMP connection seen as a human monitor. Any failure of the link is ConnectionLost."""

    def __init__(self, path: str):
        self.path = path
        self.client = QMPClient("sevmon-shell")
        self.qmp_commands: set[str] = set()
        self.commands: list[HelpEntry] = []
        self.info: list[HelpEntry] = []
        self.cpu_index = 0

    @property
    def connected(self) -> bool:
        return self.client.runstate == Runstate.RUNNING

    async def connect(self) -> None:
        """Connect, then learn the daemon's QMP commands and its HMP ``help``/``info`` tables."""
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self.client.connect(self.path)
        except TimeoutError:
            raise ShellExit(f"cannot connect to {self.path}: no QMP greeting within {CONNECT_TIMEOUT:g} s") from None
        except ConnectError as e:
            reason = _reason(e.exc)
            if isinstance(e.exc, GreetingError | NegotiationError):
                reason = f"not a QMP server ({reason.rstrip('.')})"  # an HMP socket, say
            raise ShellExit(f"cannot connect to {self.path}: {reason}") from None
        except (OSError, QMPError) as e:
            raise ShellExit(f"cannot connect to {self.path}: {_reason(e)}") from None
        self.qmp_commands = {c["name"] for c in await self.qmp("query-commands")}
        self.commands = parse_help(await self.hmp("help"))
        self.info = parse_help(await self.hmp("info"), prefix="info ")

    async def qmp(self, command: str, arguments: dict | None = None):
        """Execute one QMP command. ExecuteError (a QMP error reply) passes through."""
        try:
            return await self.client.execute(command, arguments)
        except ExecuteError:
            raise
        except (QMPError, OSError, EOFError):
            raise ConnectionLost(self.path) from None

    async def hmp(self, line: str, cpu_index: int | None = None) -> str:
        args: dict = {"command-line": line}
        cpu = self.cpu_index if cpu_index is None else cpu_index
        if cpu:
            args["cpu-index"] = cpu
        return str(await self.qmp("human-monitor-command", args))

    async def wait_closed(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(timeout):
                while self.connected:
                    await self.client.runstate_changed()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.disconnect()


def history_path() -> Path:
    """``$XDG_STATE_HOME/sevmon/history`` (default ``~/.local/state/sevmon/history``)."""
    base = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec says to ignore relative paths
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "sevmon" / "history"


class Shell:
    """Runs lines against a :class:`Monitor` and owns what the terminal shows."""

    def __init__(self, monitor: Monitor, interactive: bool):
        self.mon = monitor
        self.interactive = interactive
        self._status: str | None = None  # the progress line currently drawn, if any
        self._held: list[str] | None = None  # DUMP_COMPLETED lines kept while a dump's bar is drawn
        self._current: asyncio.Task | None = None
        quit_entry = next((e for e in monitor.commands if e.name == "quit"), None)
        self.quit_names = set(quit_entry.names) if quit_entry else {"quit", "q"}

    # -- output ----------------------------------------------------------------------------
    @staticmethod
    def _write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def show(self, text: str) -> None:
        """A command's output, as the daemon wrote it (CRLF -> the terminal's newline)."""
        text = text.replace("\r\n", "\n")
        if self.interactive and text and not text.endswith("\n"):
            text += "\n"  # keep the next prompt at the start of a line
        self._write(text)

    def error(self, text: str) -> None:
        self._end_status()
        print(text, file=sys.stderr, flush=True)

    def notice(self, text: str) -> None:
        """A whole line (an event) printed above the progress line, if one is drawn."""
        if self._status is not None:
            self._write(f"\r\x1b[K{text}\n{self._status}")
        else:
            print(text, flush=True)  # under patch_stdout: above the prompt

    def _draw_status(self, text: str) -> None:
        if sys.stdout.isatty():
            self._write(f"\r{text}\x1b[K")
        self._status = text

    def _end_status(self) -> None:
        if self._status is not None:
            self._write("\n" if sys.stdout.isatty() else self._status + "\n")
            self._status = None

    # -- one line --------------------------------------------------------------------------
    async def run_line(self, line: str) -> bool:
        """Run one line; False if it got a QMP error. Raises ShellExit, _Quit."""
        line = line.strip()
        if not line:
            return True
        words = line.split()
        try:
            if line.startswith("{"):
                return await self._run_qmp_json(line)
            if words[0] == "cpu":
                return await self._set_cpu(words)
            if self.interactive and is_dump_line(line) and "query-dump" in self.mon.qmp_commands:
                return await self._run_dump(line)
            if words[0] in self.quit_names:
                with contextlib.suppress(ConnectionLost):  # the daemon may close before replying
                    self.show(await self.mon.hmp(line))
                await self.mon.wait_closed(QUIT_WAIT)
                raise _Quit()
            out = await self.mon.hmp(line)
            self.show(out)
            return not hmp_failed(out)
        except ExecuteError as e:
            self.error(f"Error: {e} ({e.error_class})")
            return False

    async def _run_qmp_json(self, line: str) -> bool:
        try:
            msg = json.loads(line)
            if not isinstance(msg, dict) or not isinstance(msg.get("execute"), str):
                raise ValueError('expected {"execute": "command", "arguments": {...}}')
            args = msg.get("arguments")
            if args is not None and not isinstance(args, dict):
                raise ValueError('"arguments" must be an object')
        except ValueError as e:
            self.error(f"Error: not a QMP command: {e}")
            return False
        ret = await self.mon.qmp(msg["execute"], args)
        self.show(json.dumps(ret, indent=2) + "\n")
        return True

    async def _set_cpu(self, words: list[str]) -> bool:
        """``cpu N``: later lines run with cpu-index N (checked against the daemon)."""
        try:
            index = int(words[1], 0) if len(words) == 2 else -1
        except ValueError:
            index = -1
        if index < 0:
            self.show("invalid CPU index\n")
            return True
        try:
            await self.mon.hmp("info version", cpu_index=index)
        except ExecuteError:
            self.show("invalid CPU index\n")
            return True
        self.mon.cpu_index = index
        return True

    async def _run_dump(self, line: str) -> bool:
        """dump-guest-memory detached, with a progress bar from query-dump."""
        out = await self.mon.hmp(with_detach(line))
        if out.strip():  # an HMP error: the dump did not start
            self.show(out)
            return True
        self._held = []
        try:
            st = await watch_dump(lambda: self.mon.qmp("query-dump"), self._draw_status)
        except asyncio.CancelledError:  # Ctrl-C: stop watching; the caller ends the line
            self._status = None
            self._write("\ndump-guest-memory: still running in the daemon (query-dump shows its progress)")
            for text in self._held or []:
                self._write("\n" + text)
            self._held = None
            raise
        self._end_status()
        self._release_held()
        if st.get("status") == "failed":
            self.show("dump-guest-memory: the dump failed\n")
        return True

    # -- modes ----------------------------------------------------------------------------
    async def run_commands(self, lines: list[str]) -> int:
        status = 0
        for line in lines:
            if not await self.run_line(line):
                status = 1
        return status

    async def run_interactive(self) -> int:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.patch_stdout import patch_stdout
        from prompt_toolkit.shortcuts import CompleteStyle

        history = InMemoryHistory()
        with contextlib.suppress(OSError):
            path = history_path()
            open_private(path)  # mode 0600: commands can hold secrets
            history = FileHistory(str(path))
        completer = MonitorCompleter(self.mon.commands, self.mon.info)
        session = PromptSession(PROMPT, completer=completer, history=history,
                                complete_style=CompleteStyle.READLINE_LIKE, complete_while_typing=False)
        loop = asyncio.get_running_loop()
        self._write(banner(self.mon.client.greeting) + "\n")
        tasks = [asyncio.create_task(self._print_events()), asyncio.create_task(self._watch_link(session))]
        try:
            while True:
                if not self.mon.connected:
                    raise ConnectionLost(self.mon.path)
                with patch_stdout():
                    try:
                        line = await session.prompt_async()
                    except KeyboardInterrupt:  # Ctrl-C: drop the line
                        continue
                    except EOFError:  # Ctrl-D: leave
                        return 0
                self._current = asyncio.create_task(self.run_line(line))
                # The terminal is cooked while a command runs: Ctrl-C is SIGINT. (The prompt
                # installs and removes a SIGINT handler of its own, so this is set each time.)
                loop.add_signal_handler(signal.SIGINT, self._interrupt)
                try:
                    await self._current
                except asyncio.CancelledError:
                    if not self._current.cancelled() or asyncio.current_task().cancelling():
                        raise
                    self._end_status()
                    self._write("\n")  # after the terminal's ^C
                finally:
                    loop.remove_signal_handler(signal.SIGINT)
                    self._current = None
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _interrupt(self) -> None:
        """SIGINT while a command runs (the prompt reads Ctrl-C as a key itself)."""
        if self._current is not None:
            self._current.cancel()

    async def _print_events(self) -> None:
        async for event in self.mon.client.events:
            if self._held is not None and event.get("event") == "DUMP_COMPLETED":
                self._held.append(format_event(event))  # after the bar's 100%, not above a bar still at 96%
                continue
            self.notice(format_event(event))

    def _release_held(self) -> None:
        held, self._held = self._held or [], None
        for text in held:
            self.notice(text)

    async def _watch_link(self, session) -> None:
        """When the connection drops while the prompt waits, end the prompt."""
        while self.mon.connected:
            await self.mon.client.runstate_changed()
        while True:
            if session.app.is_running:
                session.app.exit(exception=ConnectionLost(self.mon.path))
                return
            await asyncio.sleep(0.05)


async def _main(path: str, lines: list[str]) -> int:
    mon = Monitor(path)
    try:
        await mon.connect()
        if not lines and not sys.stdin.isatty():
            lines = sys.stdin.read().splitlines()  # ``sevmon shell SOCK < script``: as -c lines
            interactive = False
        else:
            interactive = not lines
        shell = Shell(mon, interactive=interactive)
        return await (shell.run_interactive() if interactive else shell.run_commands(lines))
    except _Quit:
        return 0
    except ShellExit as e:
        sys.stdout.flush()
        print(f"sevmon shell: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        await mon.close()


def run_shell(args) -> int:
    """Entry point of ``sevmon shell`` (``args.socket``, ``args.command``)."""
    if not getattr(args, "verbose", False):
        # qemu.qmp logs a dropped connection itself; the shell says it in one sentence.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    try:
        return asyncio.run(_main(args.socket, list(args.command or [])))
    except KeyboardInterrupt:
        return 130
