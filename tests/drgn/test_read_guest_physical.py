"""``read-guest-physical``: guest-physical bytes for clients that read the guest themselves (``sevmon drgn``).

Every read takes the path ``xp`` takes: the debug-refusal rule, then DBG_DECRYPT through the page cache, counted in
``query-sev-debug-stats``. Checked here on the built-in SEV guest, raw images opened as SEV and SEV-ES guests, and
sevmon attached to an SEV and an SEV-ES QEMU (the simulated QEMU process, the mirror VM opened as on hardware);
attached to a real plain QEMU and on a real guest's dump: tests/live/test_drgn_live.py.
"""

from __future__ import annotations

import asyncio
import base64
import os

import pytest
from qemu.qmp import ExecuteError

from sevmon.attach.machine import AttachedMachine
from sevmon.commands.memory import MAX_PHYSICAL_READ, read_guest_physical
from sevmon.debug.access import DebugMemory
from sevmon.debug.ops import SevOps
from sevmon.debug.refusal import SECURITY_POLICY
from sevmon.errors import CommandError
from sevmon.memory.ram import RAM
from sevmon.model import SimulatedHost
from sevmon.model.sim_qemu import SimulatedQemu, attach_simulated
from sevmon.sev.vmsa import BSP_RESET_EIP, reset_vmsa

USER_PAGE = 0x9930000   # the built-in guest's first user page (gva 0x400000): "user page 0"
RAM_END = 256 << 20     # the built-in guest's default RAM


def read(q, addr: int, size: int) -> bytes:
    return base64.b64decode(q.cmd("read-guest-physical", addr=addr, size=size)["data"])


def stats(q) -> dict:
    return q.cmd("query-sev-debug-stats")


def test_bytes_are_the_guests_plaintext_as_xp_shows_them(sevmon_qmp):
    q = sevmon_qmp
    q.cmd("stop")
    data = read(q, USER_PAGE, 16)
    assert data[:8] == b"user pag"
    xp = q.hmp(f"xp /2xg 0x{USER_PAGE:x}")
    words = [int(w, 16) for w in xp.split(":")[1].split()]
    assert data == b"".join(w.to_bytes(8, "little") for w in words)
    assert q.cmd("read-guest-physical", addr=USER_PAGE, size=1)["running"] is False
    assert "read-guest-physical" in {c["name"] for c in q.cmd("query-commands")}


def test_a_paused_guest_decrypts_each_page_once(sevmon_daemon):
    """The daemon's page cache: a page read again while the guest is paused costs no round trip; pages that are
    missing in one read are one round trip together (a contiguous run)."""
    q = sevmon_daemon("--no-workload").qmp
    q.cmd("stop")
    s0 = stats(q)
    read(q, USER_PAGE + 8, 8)
    s1 = stats(q)
    assert s1["round-trips"] - s0["round-trips"] == 1 and s1["bytes-decrypted"] - s0["bytes-decrypted"] == 4096
    read(q, USER_PAGE + 100, 200)
    read(q, USER_PAGE, 4096)
    s2 = stats(q)
    assert s2["round-trips"] == s1["round-trips"] and s2["bytes-decrypted"] == s1["bytes-decrypted"]
    assert s2["cache-hits"] - s1["cache-hits"] == 2
    read(q, USER_PAGE + 4000, 3 * 4096)   # the cached page and three more: one run of three pages
    s3 = stats(q)
    assert s3["round-trips"] - s2["round-trips"] == 1 and s3["bytes-decrypted"] - s2["bytes-decrypted"] == 3 * 4096


def test_a_running_guest_is_read_fresh_and_says_so(sevmon_daemon):
    q = sevmon_daemon("--no-workload").qmp
    q.cmd("cont")
    s0 = stats(q)
    for _ in range(3):
        assert q.cmd("read-guest-physical", addr=USER_PAGE, size=8)["running"] is True
    assert stats(q)["round-trips"] - s0["round-trips"] == 3
    q.cmd("stop")
    assert q.cmd("read-guest-physical", addr=USER_PAGE, size=8)["running"] is False


def test_size_is_bounded_per_call(sevmon_qmp):
    q = sevmon_qmp
    for size in (0, -1, MAX_PHYSICAL_READ + 1):
        with pytest.raises(ExecuteError) as e:
            q.cmd("read-guest-physical", addr=0, size=size)
        assert str(e.value) == f"Parameter 'size' expects a number of bytes from 1 to {MAX_PHYSICAL_READ}"
    assert len(read(q, 0, MAX_PHYSICAL_READ)) == MAX_PHYSICAL_READ
    with pytest.raises(ExecuteError) as e:
        q.cmd("read-guest-physical", addr=(1 << 64) - 8, size=16)
    assert str(e.value) == "Invalid addr 0xfffffffffffffff8/size 16 specified"
    with pytest.raises(ExecuteError) as e:
        q.cmd("read-guest-physical", addr=0, size="8")
    assert str(e.value) == "Invalid parameter type for 'size', expected: integer"


def test_memory_that_is_not_ram_is_an_error_not_zeros(sevmon_qmp):
    q = sevmon_qmp
    with pytest.raises(ExecuteError) as e:
        q.cmd("read-guest-physical", addr=RAM_END - 8, size=16)
    assert str(e.value) == f"Invalid addr 0x{RAM_END - 8:016x}/size 16 specified: 0x{RAM_END:x} is not RAM"
    assert len(read(q, RAM_END - 8, 8)) == 8


@pytest.mark.parametrize("args, reason", [
    (("--policy", "0x1"), "the SEV guest policy 0x1 forbids debug access (NODBG): guest memory cannot be decrypted"),
    (("--debug-policy", "off"), SECURITY_POLICY),
])
def test_refused_as_every_debug_read(sevmon_daemon, args, reason):
    q = sevmon_daemon(*args).qmp
    s0 = stats(q)
    with pytest.raises(ExecuteError) as e:
        q.cmd("read-guest-physical", addr=USER_PAGE, size=8)
    assert str(e.value) == reason
    assert stats(q)["firmware-calls"] == s0["firmware-calls"]


@pytest.mark.parametrize("policy", ["0x0", "0x4"])  # SEV, SEV-ES
def test_a_raw_image_opened_as_an_sev_guest(sevmon_daemon, tmp_path, policy):
    image = os.urandom(2 << 20)
    (tmp_path / "ram.bin").write_bytes(image)
    q = sevmon_daemon("--raw", str(tmp_path / "ram.bin"), "--sev", "--policy", policy).qmp
    s0 = stats(q)
    assert read(q, 0x12345, 9000) == image[0x12345:0x12345 + 9000]
    assert stats(q)["round-trips"] - s0["round-trips"] == 1      # through DBG_DECRYPT (the RAM is ciphertext)


# -- attached to an SEV / SEV-ES QEMU (simulated QEMU process, the mirror VM as on hardware) -----------------------

IMAGE = bytes(range(256)) * 64


class QemuLink:
    """QEMU's monitor as attach sees it: ``status`` is what query-status answers."""

    def __init__(self, qemu: SimulatedQemu, status: str):
        self.qemu, self.status, self.asked, self.on_event, self.loop, self.proxied = qemu, status, [], None, None, False

    def call_sync(self, coro):
        return asyncio.new_event_loop().run_until_complete(coro)

    async def hmp(self, line: str, cpu_index: int = 0) -> str:
        self.asked.append(line)
        return ("RIP=0000000000000000 RFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0\n"
                "CR0=00000011 CR2=0000000000000000 CR3=0000000000000000 CR4=00000000\n")

    async def execute(self, name: str, args: dict | None = None):
        self.asked.append(name)
        if name == "query-status":
            return {"status": self.status, "running": self.status == "running"}
        return self.qemu.query_sev()

    def drain(self) -> None:
        pass


@pytest.fixture(params=[0x0, 0x4, 0x1], ids=["sev", "sev-es", "nodbg"])
def attached(request):
    host = SimulatedHost(min_asid=16, sev_es=True)
    es = request.param & 0x4
    qemu = SimulatedQemu(host, RAM(16 << 20), [(0x100000, IMAGE)], policy=request.param,
                         **({"vmsas": [reset_vmsa(BSP_RESET_EIP, 0x800F12)]} if es else {}))
    mirror = attach_simulated(qemu)
    yield qemu, mirror
    mirror.close()
    qemu.exit()


def machine_of(qemu, mirror, status: str):
    link = QemuLink(qemu, status)
    m = AttachedMachine(link, mirror.ram, DebugMemory(mirror.ram, SevOps(mirror.ram, mirror)), 1, status,
                        sev=mirror, memory_encryption=True)
    return m, link


def command(m, addr: int, size: int) -> dict:
    m.begin_command()
    return read_guest_physical(m, addr, size)


def test_attached_sev_paused_is_cached_running_is_not(attached):
    qemu, mirror = attached
    if mirror.policy & 0x1:
        m, _ = machine_of(qemu, mirror, "paused")
        with pytest.raises(CommandError) as e:
            command(m, 0x100000, 8)
        assert "NODBG" in str(e.value)
        return
    m, link = machine_of(qemu, mirror, "paused")
    r0 = mirror.stats.round_trips
    for off in (0, 8, 4000):
        r = command(m, 0x100000 + off, 64)
        assert base64.b64decode(r["data"]) == IMAGE[off:off + 64] and r["running"] is False
    assert mirror.stats.round_trips - r0 == 1                 # one page, decrypted once while QEMU's guest is paused
    assert link.asked.count("query-status") >= 2              # each command checked that it stayed paused
    assert qemu.vm.ram.read(0x100000, 64) != IMAGE[:64]       # at rest it is ciphertext
    m, link = machine_of(qemu, mirror, "running")
    r0 = mirror.stats.round_trips
    for _ in range(3):
        assert command(m, 0x100000, 64)["running"] is True
    assert mirror.stats.round_trips - r0 == 3                 # a running guest is read fresh every time
