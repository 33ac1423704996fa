"""The command line as a user meets it: a bad value is one line naming the option and the
accepted range, exit status 2, never a traceback; --cpu-state and --raw refuse or accept
what they must; --help is plain text with a help line for every option; -v logs commands."""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys

import pytest

from sevmon.cli import build_parser
from tests.conftest import FIXTURES, hmp, qmp_connect


def sevmon(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sevmon", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def assert_usage_error(out: subprocess.CompletedProcess, *words: str) -> str:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.mark.parametrize("sub", ["serve", "bench"])
@pytest.mark.parametrize("args, words", [
    (["--policy", "-1"], ["--policy", "0x0..0xffffffff"]),
    (["--policy", "0x100000000"], ["--policy", "0x0..0xffffffff"]),
    (["--policy", "nodbg"], ["--policy", "invalid integer value: 'nodbg'", "0x0..0xffffffff"]),
    (["--cbitpos", "99"], ["--cbitpos", "0..51"]),
    (["--cbitpos", "20"], ["--cbitpos", "256 MiB", "28..51"]),
    (["--memory", "4096", "--cbitpos", "31"], ["--cbitpos", "4096 MiB", "32..51"]),
    (["--reduced-phys-bits", "64"], ["--reduced-phys-bits", "1..63"]),
    (["--reduced-phys-bits", "0"], ["--reduced-phys-bits", "1..63"]),
    (["--memory", "1"], ["--memory", "32..16384"]),
    (["--memory", "8192", "--paging", "32"], ["--memory", "--paging 32", "32..4096"]),
    (["--debug-cache-mb", "-1"], ["--debug-cache-mb", "0..1048576"]),
    (["--cpu-state", "cpu.json"], ["--cpu-state", "only with --core or --raw"]),  # else silently unused
])
def test_bad_guest_option_is_one_line_exit_2(sub, args, words, tmp_path):
    line = assert_usage_error(sevmon(sub, "--qmp" if sub == "serve" else "--repeat",
                                     str(tmp_path / "q.sock") if sub == "serve" else "1", *args), *words)
    assert line.startswith(f"sevmon {sub}: error: argument ")


def test_cbitpos_checked_against_a_cores_ram(tmp_path):
    fx = FIXTURES / "linux-4level"
    line = assert_usage_error(sevmon("serve", "--core", str(fx / "core.elf"), "--cpu-state", str(fx / "cpu.json"),
                                     "--sev", "--cbitpos", "27"), "--cbitpos", "28..51")
    assert "0xfeb3000 bytes" in line


def test_cbitpos_is_free_without_sev(make_daemon):
    q = qmp_connect(make_daemon("--no-sev", "--cbitpos", "20", hmp=False))
    assert "0000000000400000-" in hmp(q, "info mem")
    q.close()


@pytest.mark.parametrize("args, words", [
    (["bench", "--repeat", "0"], ["--repeat", "1..1000"]),
    (["bench", "--scale", "-5"], ["--scale", "10..100000000"]),
    (["shell", "--no-such-option"], ["unrecognized arguments: --no-such-option"]),
    ([], ["the following arguments are required"]),
])
def test_other_bad_options_are_one_line_exit_2(args, words):
    assert_usage_error(sevmon(*args), *words)


def test_shell_verbose_help_says_what_the_shell_logs():
    """``shell -v`` logs the shell's own QMP client, not the daemon's commands (that is ``serve -v``)."""
    help_text = " ".join(sevmon("shell", "--help").stdout.split())
    assert "-v, --verbose log the QMP traffic and the client library's debug lines to stderr" in help_text
    assert "exit 1 if a line fails: a QMP error, or HMP's 'Error: ...', 'unknown command' or a bad argument" \
        in help_text
    serve_help = " ".join(sevmon("serve", "--help").stdout.split())
    assert "-v, --verbose log each command the daemon runs, with its duration" in serve_help


def _parsers():
    top = build_parser()
    yield "sevmon", top
    for name, p in top.subcommands.items():
        yield f"sevmon {name}", p


@pytest.mark.parametrize("prog, parser", list(_parsers()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_option_has_a_help_line(prog, parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            assert all(a.help for a in action._choices_actions), prog
            continue
        assert action.help and action.help is not argparse.SUPPRESS, f"{prog} {action.option_strings} has no help"


@pytest.mark.parametrize("sub", [[], ["serve"], ["shell"], ["bench"]])
def test_help_is_plain_text(sub):
    out = sevmon(*sub, "--help")
    assert out.returncode == 0 and "``" not in out.stdout and ":func:" not in out.stdout
    assert "-v, --verbose" in out.stdout


# -- --raw and --cpu-state --------------------------------------------------------------------------------
@pytest.mark.parametrize("regs, missing", [
    ({}, "cr0, cr3, cr4, efer"),
    ({"cr0": "0x80000011"}, "cr3, cr4, efer"),
    ({"cr0": "0x80000011", "cr3": "0x1000", "cr4": "0x20"}, "efer"),
    ({"cr0": "0x80000011", "cr3": "0x1000", "cr4": "0x10", "efer": "0x0", "rip": "0x1"}, None),  # 32-bit: complete
    ({"cr0": "0x11"}, None),  # paging off: cr0 says everything
])
def test_raw_cpu_state_must_name_the_paging_registers(make_daemon, tmp_path, regs, missing):
    img, cpu = tmp_path / "ram.bin", tmp_path / "cpu.json"
    img.write_bytes(bytes(0x4000))
    cpu.write_text(json.dumps(regs))
    args = ["--raw", str(img), "--cpu-state", str(cpu), "--no-sev"]
    if missing is None:  # complete: the daemon starts and walks the (empty) tables
        q = qmp_connect(make_daemon(*args, hmp=False))
        assert hmp(q, "info mem") == ("" if "cr3" in regs else "PG disabled\r\n")
        q.close()
        return
    out = sevmon("serve", "--qmp", str(tmp_path / "q.sock"), *args)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"sevmon: {cpu}: lacks {missing}: a raw image needs cr0, with CR0.PG "
                                               "set also cr3 and cr4, and with CR4.PAE set also efer (it tells PAE "
                                               "from 4- and 5-level paging)"]


@pytest.mark.parametrize("source", ["--raw", "--core"])
def test_unknown_cpu_state_key_is_one_line_not_ignored(tmp_path, source):
    """A typo in cpu.json (``cr_3``) is named: read as nothing, it would leave CR3 at 0 and walk garbage."""
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"cr0": "0x80050033", "cr_3": "0x1000", "cr4": "0x20", "efer": "0xd01"}))
    if source == "--raw":
        image = tmp_path / "ram.bin"
        image.write_bytes(bytes(0x4000))
    else:
        image = FIXTURES / "linux-4level" / "core.elf"
    out = sevmon("serve", "--qmp", str(tmp_path / "q.sock"), source, str(image), "--cpu-state", str(cpu))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"sevmon: {cpu}: unknown register 'cr_3': expected QEMU's info registers names "
        "(rax..r15, rip, rflags, cr0, cr2, cr3, cr4, efer, cs, cs_base...)"]
    assert not (tmp_path / "q.sock").exists()


@pytest.mark.parametrize("sev", [["--sev"], ["--no-sev"]], ids=["sev", "plain"])
def test_raw_image_of_any_size_is_padded_to_whole_pages(make_daemon, tmp_path, sev):
    img, cpu = tmp_path / "ram.bin", tmp_path / "cpu.json"
    data = bytes(range(256)) * 0x18F + b"tail!"         # 0x18f05 bytes: not a multiple of 4096
    img.write_bytes(data)
    cpu.write_text(json.dumps({"cr0": "0x11"}))           # protected mode, paging off: gva == gpa
    q = qmp_connect(make_daemon("--raw", str(img), "--cpu-state", str(cpu), *sev, hmp=False))
    assert hmp(q, "xp /5cb 0x18f00") == "0000000000018f00: 't' 'a' 'i' 'l' '!'\r\n"
    assert hmp(q, "xp /2xg 0x18ff0") == "0000000000018ff0: 0x0000000000000000 0x0000000000000000\r\n"
    assert hmp(q, "xp /1xb 0x19000") == "0000000000019000: Cannot access memory\r\n"
    q.close()


def test_verbose_logs_each_command_with_its_duration(make_daemon):
    d = make_daemon("-v")
    q = qmp_connect(d)
    hmp(q, "info mem")
    q.cmd("query-status")
    q.close()
    s = socket.socket(socket.AF_UNIX)
    s.connect(d.hmp)
    s.sendall(b"info tlb\n")
    buf = b""
    while buf.count(b"(qemu) ") < 2:
        buf += s.recv(1 << 16)
    s.close()
    log = d.output()
    assert re.search(r"^sevmon: QMP human-monitor-command: info mem: \d+\.\d ms$", log, re.M), log
    assert re.search(r"^sevmon: QMP query-status: \d+\.\d ms$", log, re.M), log
    assert re.search(r"^sevmon: HMP info tlb: \d+\.\d ms$", log, re.M), log
    assert "Using selector" not in log  # asyncio's own debug line says nothing to a user
