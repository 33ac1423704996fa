"""HMP parsing and dispatch in process (no socket): the command table, QEMU's argument errors, and the
``Error: `` line that any failing command ends with."""

from __future__ import annotations

import pytest

from sevmon.commands.registry import build
from sevmon.machine.builder import build_machine
from sevmon.machine.runner import MachineRunner
from sevmon.machine.spec import GuestSpec, SevSpec


@pytest.fixture(scope="module")
def monitor():
    runner = MachineRunner(build_machine(GuestSpec(memory_mib=64, workload=False)))
    yield build(runner)[1]
    runner.shutdown()


def test_unknown_commands_and_bad_arguments_in_qemus_words(monitor):
    assert monitor.run("frobnicate now") == "unknown command: 'frobnicate'\n"
    assert monitor.run("info frob") == "unknown command: 'info frob'\n"
    assert monitor.run("xp /2x") == 'unexpected end of expression\nTry "help xp" for more information\n'
    assert monitor.run("gva2gpa zz") == "invalid char 'z' in expression\nTry \"help gva2gpa\" for more information\n"


def test_expressions_registers_and_formats(monitor):
    assert monitor.run("p /d 0x10 + 2 * 3") == "22\n"
    assert monitor.run("p /x $cr0") == "0x80050033\n"
    assert monitor.run("x /2gx $rip").startswith("ffffffff81001000: ")


def test_a_failing_command_prints_one_error_line(monitor, tmp_path):
    out = monitor.run(f'pmemsave 0 4096 "{tmp_path}/no/such/dir/f"')
    assert out == f"Error: Could not open '{tmp_path}/no/such/dir/f': No such file or directory\n"


def test_nodbg_refusal_is_one_error_line_after_what_was_printed():
    runner = MachineRunner(build_machine(GuestSpec(memory_mib=64, workload=False, sev=SevSpec(policy=1))))
    try:
        monitor = build(runner)[1]
        out = monitor.run("info tlb")
        assert out.startswith("Error: ") and "NODBG" in out and out.count("\n") == 1
        assert monitor.run("x /4x $rip") == "ffffffff81001000: Cannot access memory\n"
    finally:
        runner.shutdown()
