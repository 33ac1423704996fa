"""The README's five-minute tour, run as a reader runs it: its `sevmon serve` line in a fresh
directory, `sevmon shell` on a pseudo-terminal, each `(qemu)` line typed in turn. What the
shell shows must match the README's excerpt (`...` stands for lines left out; everything
else, the banner, `[event]` lines and the `info sev-debug` figures included, must be there
exactly and in order), so the README cannot drift from what the tour produces."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time

from tests.conftest import ROOT
from tests.shell.test_shell import SHELL, Terminal

GAP = "..."


def tour() -> tuple[list[str], list[tuple[str, list[str]]], list[str]]:
    """(serve argv, [(typed line, expected lines)], banner lines) from the README's tour section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## A five-minute tour"):]
    section = section[:section.index("\n## ", 4)]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, re.S)
    sh = next(body for lang, body in blocks if lang == "sh")
    serve = shlex.split(sh.splitlines()[0].split("#")[0])
    assert serve[:2] == ["sevmon", "serve"], serve
    session = next(body for lang, body in blocks if "(qemu) " in body)
    banner: list[str] = []
    steps: list[tuple[str, list[str]]] = []
    for line in session.splitlines():
        if line.startswith("(qemu) "):
            steps.append((line[len("(qemu) "):], []))
        elif steps:
            steps[-1][1].append(line)
        else:
            banner.append(line)
    return serve[2:], steps, banner


def matches(expected: list[str], actual: list[str]) -> bool:
    """``expected`` with ``...`` gaps: the pieces appear in order; no gap at an end pins that end."""
    pieces: list[list[str]] = [[]]
    for line in expected:
        if line == GAP:
            pieces.append([])
        else:
            pieces[-1].append(line)
    pos = 0
    for i, piece in enumerate(pieces):
        if not piece:
            continue
        first, last = i == 0, i == len(pieces) - 1
        if first:
            if actual[:len(piece)] != piece:
                return False
            pos = len(piece)
            if last:
                return pos == len(actual)
            continue
        if last:
            return len(actual) - len(piece) >= pos and actual[len(actual) - len(piece):] == piece
        for j in range(pos, len(actual) - len(piece) + 1):
            if actual[j:j + len(piece)] == piece:
                pos = j + len(piece)
                break
        else:
            return False
    return True


def _lines(text: str) -> list[str]:
    return [ln.rstrip() for ln in text.replace("\r", "\n").split("\n") if ln.strip()]


def test_matches():
    assert matches(["a", GAP, "z"], ["a", "b", "z"]) and not matches(["a", GAP, "y"], ["a", "b", "z"])
    assert matches(["a", GAP], ["a", "b"]) and not matches(["a"], ["a", "b"])
    assert matches([GAP, "c", GAP, "z"], ["a", "c", "d", "z"]) and not matches(["a", "b"], ["b", "a"])


def test_readme_tour_shows_what_the_readme_says(tmp_path):
    serve, steps, banner = tour()
    assert [cmd for cmd, _ in steps][:3] == ["info kvm", "info sev", "stop"] and len(steps) >= 9
    env = dict(os.environ, TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1", XDG_STATE_HOME=str(tmp_path / "state"),
               HOME=str(tmp_path))
    log = open(tmp_path / "daemon.log", "w")
    daemon = subprocess.Popen([sys.executable, "-m", "sevmon", "serve", *serve], cwd=tmp_path, stdout=log,
                              stderr=subprocess.STDOUT)
    term = None
    try:
        qmp = tmp_path / serve[serve.index("--qmp") + 1]
        deadline = time.monotonic() + 30
        while True:
            assert daemon.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(qmp))
                break
            except OSError:
                time.sleep(0.05)
        term = Terminal([*SHELL, str(qmp)], env)
        shown = term.expect("(qemu)")
        assert _lines(shown) == banner
        for cmd, expected in steps:
            term.type(cmd + "\r")
            term.expect(cmd + "\r")  # the accepted line (earlier draws of it are followed by a prompt)
            for event in (ln for ln in expected if ln.startswith("[event] ")):
                term.expect(event)  # an event may be drawn after the next prompt: wait for it first
            out = term.expect("(qemu)")
            actual = [ln for ln in _lines(out) if not ln.startswith("[event] ")]
            actual += [ln for ln in expected if ln.startswith("[event] ")]
            want = [ln for ln in expected if not ln.startswith("[event] ")]
            want += [ln for ln in expected if ln.startswith("[event] ")]
            assert matches(want, actual), f"README tour, {cmd!r}:\nREADME:\n" + "\n".join(expected) + \
                "\nshell:\n" + "\n".join(_lines(out))
        term.type("\x04")
        assert term.wait() == 0
    finally:
        if term is not None:
            term.close()
        daemon.terminate()
        daemon.wait(15)
        log.close()
