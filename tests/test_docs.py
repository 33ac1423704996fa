"""The documents a clone carries cite only what the clone holds: every relative link and every ``tests/...``,
``examples/...``, ``docs/...`` or ``sevmon/...`` path named in the README, ARCHITECTURE.md and the other Markdown
files exists in the repository, and every ``SEVMON_*`` environment variable the code or the tests read is
documented in the README."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the folder a development checkout may have beside it, which a user's clone does not
BESIDE_THE_CLONE = Path("..", "shared").as_posix()
DOCS = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", ROOT / "examples" / "README.md",
        ROOT / "tests" / "data" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH = re.compile(r"`((?:tests|examples|docs|sevmon|schemas)/[\w./-]*\w)`")
LINK = re.compile(r"\]\(([^)#:]+)(?:#[^)]*)?\)")


def test_docs_name_only_files_the_repository_holds():
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for m in PATH.finditer(text):
            if not (ROOT / m.group(1)).exists():
                missing.append(f"{doc.relative_to(ROOT)}: `{m.group(1)}`")
        for m in LINK.finditer(text):
            target = (doc.parent / m.group(1)).resolve()
            if not target.exists() or ROOT not in target.parents:
                missing.append(f"{doc.relative_to(ROOT)}: ({m.group(1)})")
        assert BESIDE_THE_CLONE not in text, doc
    assert missing == []


def test_environment_variables_are_documented():
    readme = (ROOT / "README.md").read_text()
    names = set()
    for src in [*ROOT.glob("sevmon/**/*.py"), *ROOT.glob("tests/**/*.py")]:
        names.update(re.findall(r"""environ(?:\.get\(|\[)["'](SEVMON_\w+)""", src.read_text()))
    assert "SEVMON_GUEST_DIR" in names
    assert sorted(n for n in names if n not in readme) == []
