"""sevmon attached to a live QEMU 7.2 guest whose RAM is two memfd backends of equal size (two NUMA nodes),
created in the order opposite to their ids' (QEMU's fds and sevmon's sorted ids disagree): each node is mapped
from its own memfd and reads what QEMU's own monitor reads. Detaching closes every fd sevmon opened. One boot
per module."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from sevmon.attach.serve import attach, detach
from tests.live.conftest import Attached, Qemu, hmp

NODE = 512 << 20


@pytest.fixture(scope="module")
def qemu(module_tmp):
    q = Qemu(module_tmp, mem="1G", backend=None, extra=[
        "-object", f"memory-backend-memfd,id=node-b,size={NODE},share=on",   # created first: QEMU's lower fd
        "-object", f"memory-backend-memfd,id=node-a,size={NODE},share=on",
        "-numa", "node,nodeid=0,memdev=node-b", "-numa", "node,nodeid=1,memdev=node-a"])
    theirs = q.qmp("b")
    theirs.cmd("stop")
    yield q, theirs
    with contextlib.suppress(Exception):
        theirs.close()
    q.stop()


def _fds() -> set[str]:
    return {f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}" for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}


def test_each_node_is_mapped_from_its_own_backend_and_detach_closes_every_fd(qemu, tmp_path):
    q, theirs = qemu
    # premise: node 0 is node-b at [0, 512 MiB), node 1 is node-a above it, and their tops differ
    assert "node-b" in hmp(theirs, "gpa2hva 0x1000") and "node-a" in hmp(theirs, f"gpa2hva {NODE:#x}")
    tops = [NODE - 0x200000, 2 * NODE - 0x200000]
    qemus = []
    for i, gpa in enumerate(tops):
        f = tmp_path / f"theirs{i}.bin"
        theirs.cmd_raw("pmemsave", {"val": gpa, "size": 0x200000, "filename": str(f)})
        qemus.append(f.read_bytes())
    assert qemus[0] != qemus[1]

    before = _fds()

    async def attached():
        m = await attach(q.a)
        try:
            return [m.ram.read(gpa, 0x200000) for gpa in tops]
        finally:
            await detach(m)
    assert asyncio.run(attached()) == qemus
    assert _fds() == before  # the link's socket, the memfds, the mappings: all closed on detach


def test_the_daemon_reads_each_node_as_qemu_does(qemu, module_tmp, tmp_path):
    q, theirs = qemu
    sevmon = Attached(module_tmp, q.a)
    try:
        assert sevmon.proc.poll() is None, sevmon.output()
        ours = sevmon.qmp()
        for gpa in (0x100000, NODE - 0x100000, NODE, 2 * NODE - 0x100000):
            line = f"xp /16xg {gpa:#x}"
            assert hmp(ours, line) == hmp(theirs, line), line
        mine, qemus = tmp_path / "mine.bin", tmp_path / "qemus.bin"
        ours.cmd_raw("pmemsave", {"val": NODE - 0x40000, "size": 0x80000, "filename": str(mine)})  # across the nodes
        theirs.cmd_raw("pmemsave", {"val": NODE - 0x40000, "size": 0x80000, "filename": str(qemus)})
        assert mine.read_bytes() == qemus.read_bytes()
        ours.close()
    finally:
        sevmon.stop()
