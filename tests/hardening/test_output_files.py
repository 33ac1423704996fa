"""Files sevmon writes guest plaintext into (memsave, pmemsave, sev-mem-map, dump-guest-memory), as a user on a
shared host meets them: created 0600, never written through a symlink, and an existing file survives every refused
or failed command exactly as it was (issue 19, finding 2). Real daemons, QMP and HMP."""

from __future__ import annotations

import os
import signal
import stat

import pytest

from tests.conftest import FIXTURES, hmp, qmp_connect

OLD = b"the user's own file, not to be lost\n"
NOT_RAM = 0x20000000   # beyond the built-in guest's 256 MiB


def _commands(path: str) -> list[dict]:
    return [
        {"execute": "memsave", "arguments": {"val": 0x400000, "size": 4096, "filename": path}},
        {"execute": "pmemsave", "arguments": {"val": 0x1000000, "size": 4096, "filename": path}},
        {"execute": "sev-mem-map", "arguments": {"filename": path}},
        {"execute": "dump-guest-memory", "arguments": {"paging": False, "protocol": f"file:{path}"}},
    ]


def _leftovers(directory) -> list[str]:
    return [n for n in os.listdir(directory) if n.endswith(".sevmon-part")]


def test_new_files_are_0600_whatever_the_umask(make_daemon, tmp_path):
    old = os.umask(0)          # the daemon inherits it: QEMU's files would be 0666
    try:
        d = make_daemon("--no-workload", hmp=False)
    finally:
        os.umask(old)
    q = qmp_connect(d)
    for i, c in enumerate(_commands(str(tmp_path / "out-{}"))):
        path = tmp_path / f"out-{i}"
        c = {**c, "arguments": {k: (v.replace("out-{}", f"out-{i}") if isinstance(v, str) else v)
                                for k, v in c["arguments"].items()}}
        r = q.cmd_obj(c)
        assert r.get("return") == {}, r
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, c["execute"]
    assert _leftovers(tmp_path) == []
    q.close()


def test_a_symlink_at_the_name_is_refused_and_its_target_untouched(make_daemon, tmp_path):
    d = make_daemon("--no-workload", hmp=False)
    q = qmp_connect(d)
    victim = tmp_path / "victim"
    victim.write_bytes(OLD)
    link = tmp_path / "link"
    link.symlink_to(victim)
    for c in _commands(str(link)):
        r = q.cmd_obj(c)
        assert r["error"]["desc"] == f"Could not open '{link}': it is a symbolic link; sevmon does not write " \
                                     "through links", c["execute"]
        assert victim.read_bytes() == OLD and link.is_symlink()
    assert hmp(q, f'memsave 0x400000 16 "{link}"') == \
        f"Error: Could not open '{link}': it is a symbolic link; sevmon does not write through links\r\n"
    assert victim.read_bytes() == OLD and _leftovers(tmp_path) == []
    q.close()


def test_a_hard_link_keeps_the_other_name_s_contents(make_daemon, tmp_path):
    """The output replaces the name; the inode it pointed at (another name of some other file) keeps its bytes."""
    d = make_daemon("--no-workload", hmp=False)
    q = qmp_connect(d)
    other = tmp_path / "other"
    other.write_bytes(OLD)
    os.link(other, tmp_path / "out")
    q.cmd("memsave", val=0x400000, size=4096, filename=str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes().startswith(b"user page 0") and other.read_bytes() == OLD
    q.close()


@pytest.mark.parametrize("refusal", [["--policy", "0x1"], ["--debug-policy", "off"]])
def test_a_refused_command_leaves_an_existing_file_as_it_was(make_daemon, tmp_path, refusal):
    d = make_daemon("--no-workload", *refusal, hmp=False)
    q = qmp_connect(d)
    f = tmp_path / "existing"
    f.write_bytes(OLD)
    os.chmod(f, 0o640)
    for c in _commands(str(f)):
        r = q.cmd_obj(c)
        assert "error" in r, c["execute"]
        assert "policy" in r["error"]["desc"], r
        assert f.read_bytes() == OLD and stat.S_IMODE(f.stat().st_mode) == 0o640, c["execute"]
    assert _leftovers(tmp_path) == []
    q.close()


@pytest.mark.parametrize("refusal", [["--policy", "0x1"], ["--debug-policy", "off"]])
def test_pmemsave_over_non_ram_is_refused_when_debugging_is(make_daemon, tmp_path, refusal):
    """Non-RAM reads as zeros without a decrypt: it used to "succeed" where debugging is forbidden."""
    d = make_daemon("--no-workload", *refusal, hmp=False)
    q = qmp_connect(d)
    f = tmp_path / "zeros"
    r = q.cmd_obj({"execute": "pmemsave", "arguments": {"val": NOT_RAM, "size": 4096, "filename": str(f)}})
    assert "policy" in r["error"]["desc"] and not f.exists()
    q.close()


def test_failed_commands_leave_an_existing_file_as_it_was(make_daemon, tmp_path):
    d = make_daemon("--no-workload", hmp=False)
    q = qmp_connect(d)
    f = tmp_path / "existing"
    f.write_bytes(OLD)
    r = q.cmd_obj({"execute": "memsave", "arguments": {"val": 0x400000, "size": 64 << 20, "filename": str(f)}})
    assert r["error"]["desc"] == f"Invalid addr 0x{0x400000:016x}/size {64 << 20} specified"
    r = q.cmd_obj({"execute": "memsave", "arguments": {"val": 0x400000, "size": -1, "filename": str(f)}})
    assert "error" in r
    r = q.cmd_obj({"execute": "memsave", "arguments": {"val": 0x400000, "size": 16, "filename": str(f),
                                                       "cpu-index": 7}})
    assert r["error"]["desc"] == "Parameter 'cpu-index' expects a CPU number"
    assert f.read_bytes() == OLD and _leftovers(tmp_path) == []
    q.cmd("memsave", val=0x400000, size=4096, filename=str(f))     # and a command that works replaces it
    assert f.read_bytes().startswith(b"user page 0") and stat.S_IMODE(f.stat().st_mode) == 0o600
    q.close()


def test_a_directory_or_a_missing_directory_is_one_sentence(make_daemon, tmp_path):
    d = make_daemon("--no-workload", hmp=False)
    q = qmp_connect(d)
    r = q.cmd_obj({"execute": "pmemsave", "arguments": {"val": 0, "size": 16, "filename": str(tmp_path)}})
    assert r["error"]["desc"] == f"Could not open '{tmp_path}': Is a directory"
    r = q.cmd_obj({"execute": "dump-guest-memory", "arguments": {"paging": False,
                                                                 "protocol": f"file:{tmp_path}/no/d.elf"}})
    assert r["error"]["desc"] == f"Could not open '{tmp_path}/no/d.elf': No such file or directory"
    q.close()


def _dump_under_way(make_daemon, tmp_path, out):
    """A daemon on a 256 MiB raw SEV guest (big enough that its dump is still running when a signal comes), with a
    detached dump into ``out`` under way: (daemon, the raw image to remove)."""
    raw = tmp_path / "ram.bin"
    raw.write_bytes(os.urandom(256 << 20))
    cpu = tmp_path / "cpu.json"
    cpu.write_text('{"cr0": "0x11"}')
    d = make_daemon("--raw", str(raw), "--cpu-state", str(cpu), "--sev", hmp=False)
    q = qmp_connect(d)
    q.cmd("dump-guest-memory", paging=False, protocol=f"file:{out}", detach=True)
    assert q.cmd("query-dump")["status"] == "active"
    return d, raw


def test_a_failed_dump_never_destroys_the_existing_file(make_daemon, tmp_path):
    """A dump interrupted half-way (SIGTERM while detached) fails; the file it would replace is intact, no part
    is left; a dump that completes replaces it."""
    fx = FIXTURES / "linux-4level"
    d = make_daemon("--core", str(fx / "core.elf"), "--cpu-state", str(fx / "cpu.json"), "--sev", hmp=False)
    q = qmp_connect(d)
    out = tmp_path / "dump.elf"
    out.write_bytes(OLD)
    q.cmd("dump-guest-memory", paging=False, protocol=f"file:{out}")
    assert out.read_bytes()[:4] == b"\x7fELF" and stat.S_IMODE(out.stat().st_mode) == 0o600
    q.close()

    out.write_bytes(OLD)
    d, raw = _dump_under_way(make_daemon, tmp_path, out)
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    assert out.read_bytes() == OLD and _leftovers(tmp_path) == []
    raw.unlink()


def test_a_daemon_killed_mid_dump_leaves_no_partial_file(make_daemon, tmp_path):
    """SIGKILL gives the daemon no chance to clean up: the dump is written to a file with no name (O_TMPFILE) until
    it is complete, so the kernel frees it, and the file the dump would replace is intact."""
    out = tmp_path / "out" / "dump.elf"
    out.parent.mkdir()
    out.write_bytes(OLD)
    d, raw = _dump_under_way(make_daemon, tmp_path, out)
    d.proc.send_signal(signal.SIGKILL)
    assert d.proc.wait(30) == -signal.SIGKILL
    assert os.listdir(out.parent) == ["dump.elf"] and out.read_bytes() == OLD
    raw.unlink()


def test_a_fifo_nobody_reads_is_refused_at_once(make_daemon, tmp_path):
    """A FIFO or a character device is written in place (a pipe to a compressor works as with QEMU), but a FIFO
    without a reader is one sentence, not a monitor that hangs."""
    d = make_daemon("--no-workload", hmp=False)
    q = qmp_connect(d)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    r = q.cmd_obj({"execute": "pmemsave", "arguments": {"val": 0x1000000, "size": 4096, "filename": str(fifo)}})
    assert r["error"]["desc"] == f"Could not open '{fifo}': No such device or address"
    q.cmd("pmemsave", val=0x1000000, size=4096, filename="/dev/null")
    q.close()
