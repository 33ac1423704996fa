"""Request checking and the session's reply routing, in process (no socket): fast checks of the rules the
real-socket tests in this folder exercise end to end."""

from __future__ import annotations

import asyncio

import pytest

from sevmon.commands.registry import build
from sevmon.machine.builder import build_machine
from sevmon.machine.runner import MachineRunner
from sevmon.machine.spec import GuestSpec
from sevmon.qmp.dispatch import CheckFailed, check_request
from sevmon.qmp.server import QMPServer
from sevmon.qmp.session import QMPSession


@pytest.fixture(scope="module")
def runner():
    r = MachineRunner(build_machine(GuestSpec(sev=None, memory_mib=64, workload=False)))
    yield r
    r.shutdown()


@pytest.fixture(scope="module")
def registry(runner):
    return build(runner)[0]


def check(registry, msg, **kw):
    kw.setdefault("negotiated", True)
    kw.setdefault("oob_enabled", False)
    return check_request(msg, registry=registry, **kw)


def error_of(registry, msg, **kw):
    with pytest.raises(CheckFailed) as e:
        check(registry, msg, **kw)
    return e.value.error.desc, e.value.id


def test_before_negotiation_only_qmp_capabilities_is_accepted(registry):
    assert check(registry, {"execute": "qmp_capabilities"}, negotiated=False).name == "qmp_capabilities"
    desc, rid = error_of(registry, {"execute": "query-status", "id": 7}, negotiated=False)
    assert desc == "Expecting capabilities negotiation with 'qmp_capabilities'" and rid == 7


@pytest.mark.parametrize("msg, desc", [
    ([], "QMP input must be a JSON object"),
    ({"id": 1}, "QMP input lacks member 'execute'"),
    ({"execute": 1}, "QMP input member 'execute' must be a string"),
    ({"execute": "stop", "arguments": []}, "QMP input member 'arguments' must be an object"),
    ({"execute": "stop", "foo": 1}, "QMP input member 'foo' is unexpected"),
    ({"execute": "no-such-command"}, "The command no-such-command has not been found"),
    ({"execute": "memsave", "arguments": {"val": 0, "size": 1}}, "Parameter 'filename' is missing"),
])
def test_bad_requests_get_qemus_words(registry, msg, desc):
    assert error_of(registry, msg)[0] == desc


def test_session_commands_are_listed_and_checked_but_not_dispatched(registry):
    assert "qmp_capabilities" in registry and "qmp_capabilities" in registry.names()
    assert "qmp_capabilities" not in registry.handlers
    desc, _ = error_of(registry, {"execute": "qmp_capabilities", "arguments": {"enable": 3}})
    assert "enable" in desc


class RecordingSession(QMPSession):
    """A session whose output is a list: ``handle`` runs exactly as on a socket."""

    def __init__(self, server):
        super().__init__(server, None, None)
        self.sent: list[dict] = []

    def send(self, obj: dict) -> None:
        self.sent.append(obj)


def test_session_negotiates_then_replies_under_the_clients_id(runner, registry):
    async def go():
        server = QMPServer(runner, registry, build(runner)[1])
        s = RecordingSession(server)
        await s.handle({"execute": "query-status", "id": "early"})
        await s.handle({"execute": "qmp_capabilities", "id": 1})
        await s.handle({"execute": "qmp_capabilities", "id": 2})
        await s.handle({"execute": "stop", "id": {"nested": [1]}})
        await s.handle({"execute": "query-status", "id": "x"})
        await s.handle({"execute": "human-monitor-command", "arguments": {"command-line": "info status"}})
        return s.sent

    sent = asyncio.run(go())
    assert sent[0]["error"]["class"] == "CommandNotFound" and sent[0]["id"] == "early"
    assert sent[1] == {"return": {}, "id": 1}
    assert sent[2]["error"]["desc"] == "Capabilities negotiation is already complete, command ignored"
    assert sent[3] == {"return": {}, "id": {"nested": [1]}}
    assert sent[4] == {"return": {"status": "paused", "singlestep": False, "running": False}, "id": "x"}
    assert sent[5] == {"return": "VM status: paused\r\n"}
