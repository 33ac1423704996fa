"""Fixtures of the hardening suite (helpers live in ``support.py``)."""

from __future__ import annotations

import pytest

from tests.conftest import Daemon


@pytest.fixture(scope="module")
def module_daemon(tmp_path_factory):
    """One daemon for a whole module (the fuzzers hit the same long-lived process)."""
    d = Daemon(tmp_path_factory.mktemp("hardening"), [])
    yield d
    d.stop()
