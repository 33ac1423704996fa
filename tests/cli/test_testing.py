"""sevmon.testing: the SevmonDaemon launcher and the pytest plugin users write scripted monitor
tests with; the example in examples/ runs here under pytest, as a user runs it."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib

import pytest
from qemu.qmp import ExecuteError

from sevmon.testing import DaemonError, SevmonDaemon
from tests.conftest import ROOT

PLUGIN = "sevmon.testing.pytest_plugin"


def test_example_runs_under_pytest():
    out = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", PLUGIN, "-p", "no:cacheprovider",
                          "examples/test_sevmon_testing.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 passed" in out.stdout


def test_plugin_is_a_pytest11_entry_point():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["pytest11"] == {PLUGIN: PLUGIN}
    assert "sevmon.testing" in meta["tool"]["setuptools"]["packages"]
    if os.environ.get("CI") == "true":  # CI installs this tree: the entry point must be live
        eps = importlib.metadata.entry_points(group="pytest11")
        assert any(ep.value == PLUGIN for ep in eps)


def test_daemon_handle_cmd_hmp_events_and_cleanup():
    with SevmonDaemon("--no-workload", hmp=True) as d:
        directory, proc = d.dir, d.proc
        assert os.stat(directory).st_mode & 0o777 == 0o700 and os.path.exists(d.hmp_path)
        other = d.connect()
        d.qmp.cmd("stop")
        assert other.event_wait("STOP")["event"] == "STOP"       # every client gets the event
        assert [e["event"] for e in d.qmp.events(wait=5)] == ["STOP"]
        assert d.qmp.events() == []
        assert d.qmp.cmd("query-status")["status"] == "paused"
        assert d.qmp.hmp("gva2gpa 0x400000") == "gpa: 0x9930000\r\n"
        assert d.qmp.cmd("human-monitor-command", command_line="info version").startswith("7.2.")
        with pytest.raises(ExecuteError) as e:
            d.qmp.cmd("no-such-command")
        assert e.value.error_class == "CommandNotFound" and str(e.value) == "The command no-such-command has not been found"
    assert proc.returncode == 0 and not os.path.exists(directory)


def test_a_daemon_that_cannot_start_says_why():
    d = SevmonDaemon("--cbitpos", "99")
    with pytest.raises(DaemonError, match=r"exited with status 2: sevmon serve: error: argument --cbitpos: "
                                          r"99 is out of range \(accepted: 0..51\)"):
        d.start()
    assert not os.path.exists(d.dir)


def test_any_option_passes_through_attach_included():
    d = SevmonDaemon("--paging", "pae", attach="/run/qemu/guest.qmp")
    d.dir = "/tmp/x"
    assert d.argv()[1:] == ["-m", "sevmon", "serve", "--qmp", "/tmp/x/qmp.sock", "--paging", "pae",
                            "--attach", "/run/qemu/guest.qmp"]
    with SevmonDaemon("--paging", "pae", "--no-workload") as d:
        assert d.qmp.hmp("gva2gpa 0x08048000").startswith("gpa: 0x")


def test_fixtures(sevmon_daemon, sevmon_qmp):
    assert sevmon_qmp.cmd("query-kvm") == {"enabled": True, "present": True}
    plain = sevmon_daemon("--no-sev")
    assert plain.qmp.cmd("query-kvm") == {"enabled": False, "present": True}  # QEMU on TCG
