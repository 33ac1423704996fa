"""HMP file names that start with `/` after a size expression must be quoted: unquoted, the
size expression reads `/` as division, exactly as QEMU 7.2 parses it (its answers, checked
live with qemu-system-x86_64 7.2, are the expected texts here). Quoted names work, spaces too."""

from __future__ import annotations

import pytest

from tests.conftest import hmp, qmp_connect


@pytest.fixture
def q(make_daemon):
    q = qmp_connect(make_daemon("--no-workload", hmp=False))
    yield q
    q.close()


@pytest.mark.parametrize("cmd, addr", [("memsave", "0x400000"), ("pmemsave", "0")])
def test_unquoted_slash_name_is_a_division_as_in_qemu(q, tmp_path, cmd, addr):
    target = tmp_path / "out.bin"
    assert hmp(q, f"{cmd} {addr} 4096 {target}") == (
        f"invalid char '{str(target)[1]}' in expression\r\nTry \"help {cmd}\" for more information\r\n")
    assert not target.exists()


@pytest.mark.parametrize("cmd, addr", [("memsave", "0x400000"), ("pmemsave", "0x9930000")])
def test_quoted_names_work(q, tmp_path, cmd, addr):
    for name in ("out.bin", "with space.bin"):
        target = tmp_path / name
        assert hmp(q, f'{cmd} {addr} 4096 "{target}"') == ""
        assert target.read_bytes().startswith(b"user page 0")
