"""pytest fixtures for scripted monitor tests (entry point ``pytest11``: installing sevmon
is enough; ``-p sevmon.testing.pytest_plugin`` loads it explicitly).

* ``sevmon_daemon(*args, **kw)``: a factory of started :class:`~sevmon.testing.SevmonDaemon`;
  every daemon it made is stopped and its directory removed after the test.
* ``sevmon_qmp``: a negotiated :class:`~sevmon.testing.QMPHandle` on a default daemon (the
  built-in SEV guest).
"""

from __future__ import annotations

import pytest

from sevmon.testing import QMPHandle, SevmonDaemon


@pytest.fixture
def sevmon_daemon():
    daemons: list[SevmonDaemon] = []

    def start(*args: str, **kwargs) -> SevmonDaemon:
        d = SevmonDaemon(*args, **kwargs)
        daemons.append(d)
        return d.start()

    yield start
    for d in daemons:
        d.stop()


@pytest.fixture
def sevmon_qmp(sevmon_daemon) -> QMPHandle:
    return sevmon_daemon().qmp
