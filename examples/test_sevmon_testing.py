"""A scripted monitor test written with sevmon's pytest plugin: no conftest needed, the
fixtures ``sevmon_qmp`` and ``sevmon_daemon`` come with ``pip install sevmon``.

Run it with ``pytest examples/test_sevmon_testing.py``; sevmon's own suite runs it too
(tests/cli/test_testing.py)."""

import pytest
from qemu.qmp import ExecuteError

from sevmon.testing import HMPSocket


def test_stop_pauses_the_guest(sevmon_qmp):
    sevmon_qmp.cmd("stop")
    assert sevmon_qmp.event_wait("STOP")["event"] == "STOP"
    assert sevmon_qmp.cmd("query-status")["status"] == "paused"
    assert sevmon_qmp.hmp("gva2gpa 0x400000") == "gpa: 0x9930000\r\n"


def test_a_paused_info_tlb_costs_no_round_trip(sevmon_qmp):
    sevmon_qmp.cmd("stop")
    sevmon_qmp.hmp("info tlb")
    before = sevmon_qmp.cmd("query-sev-debug-stats")["round-trips"]
    sevmon_qmp.hmp("info tlb")
    assert sevmon_qmp.cmd("query-sev-debug-stats")["round-trips"] == before


def test_nodbg_policy_keeps_plaintext_in(sevmon_daemon):
    d = sevmon_daemon("--policy", "0x1", "--no-workload")
    assert d.qmp.hmp("x /2xg 0x400000") == "0000000000400000: Cannot access memory\r\n"
    with pytest.raises(ExecuteError) as e:
        d.qmp.cmd("memsave", val=0x400000, size=16, filename=f"{d.dir}/leak.bin")
    assert "NODBG" in str(e.value) or "debug" in str(e.value)


def test_the_hmp_socket_answers_as_the_qmp_handle_does(sevmon_daemon):
    d = sevmon_daemon("--no-workload", hmp=True)
    with HMPSocket(d.hmp_path) as hmp:
        assert hmp.banner.endswith("monitor - type 'help' for more information\r\n")
        assert hmp.run("stop") == ""
        assert hmp.run("info mem") == d.qmp.hmp("info mem")
