"""Fixtures for the SEV layer tests (helpers live in sev_helpers.py)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def image() -> bytes:
    """64 KiB of random guest image: plaintext that must never appear at rest."""
    return os.urandom(64 * 1024)
