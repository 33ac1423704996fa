"""Tests carry their data (issue 19, finding 7): no test reads a fixture from outside the repository, and the fixtures
it names are all in tests/data, so a missing one is a failure (FileNotFoundError), never a skip or a fallback."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).parent
ROOT = TESTS.parent

def test_no_test_names_a_fixture_path_outside_the_repository():
    bad = []
    for path in TESTS.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"""["'](/(?:work|home|root|srv|mnt|opt)/[^"']*|\.\./shared[^"']*)["']""", text):
            bad.append(f"{path.relative_to(ROOT)}: {m.group(1)}")
    assert bad == []


def test_every_fixture_directory_named_by_the_tests_exists():
    named = set()
    for path in TESTS.rglob("*.py"):
        named |= set(re.findall(r"""FIXTURES\s*/\s*["']([\w.-]+)["']""", path.read_text()))
    assert named and all((TESTS / "data" / n).is_dir() for n in named), sorted(named)
