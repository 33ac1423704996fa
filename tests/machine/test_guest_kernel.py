"""The guest kernel found through the debug path (VMCOREINFO), and walks from its own page tables when the vCPU's
registers cannot be read: real daemons on real sockets.

The built-in guest keeps a VMCOREINFO page as Linux does; its RAM saved with ``pmemsave`` and opened as a raw image
without ``--cpu-state`` (as an SEV guest) must show the kernel half of what the built-in guest itself shows, walked
from its CR3. (tests/live/test_kernel_tables.py does the same with a real Linux guest under QEMU.)
"""

from __future__ import annotations

import re

import pytest

from sevmon.x86.vmcoreinfo import VmcoreinfoError, find, parse
from tests.conftest import hmp, qmp_connect

MEM = 32  # MiB: the smallest built-in guest


def qmp(q, name: str, **args) -> dict:
    """The whole answer (``return`` or ``error``)."""
    return q.cmd_obj({"execute": name, "arguments": args})


def without_cost(text: str) -> str:
    return re.sub(r"; found after \d+ pages in \d+ requests", "", text)


def kernel_half(text: str) -> str:
    return "".join(ln + "\r\n" for ln in text.split("\r\n") if ln and int(ln.split("-")[0].split(":")[0], 16) >> 63)


@pytest.fixture(params=["4", "5"])
def builtin_and_image(request, make_daemon, tmp_path):
    """A paused plain built-in guest's answers, and its RAM as a raw image."""
    q = qmp_connect(make_daemon("--no-sev", "--no-workload", "--memory", str(MEM), "--paging", request.param,
                                hmp=False, subdir="builtin"))
    q.cmd("stop")
    answers = {c: hmp(q, c) for c in ("info mem", "info tlb", "info registers", "x /4xg 0xffffffff81000000",
                                      "gva2gpa 0xffffffff81201000", "info guest-kernel")}
    image = tmp_path / "ram.bin"
    assert q.cmd("pmemsave", val=0, size=MEM << 20, filename=str(image)) == {}
    q.close()
    return request.param, answers, image


def test_builtin_guest_reports_its_kernel_with_its_own_root(make_daemon):
    q = qmp_connect(make_daemon("--no-workload", hmp=False))
    q.cmd("stop")
    cr3 = int(hmp(q, "p $cr3"), 0)
    r = q.cmd("query-guest-kernel")
    me_mask = 1 << 47  # the default C-bit: the root is reported as an address, CR3 carries the C-bit
    assert r["root"] != cr3 & ~me_mask and r["paging-levels"] == 4  # init_top_pgt: the kernel's, not the process's
    assert r["release"] == "6.1.0-sevmon-builtin" and r["kaslr-offset"] == 0 and r["phys-base"] == 0
    assert r["vmcoreinfo"].startswith("OSRELEASE=6.1.0-sevmon-builtin\n")
    assert f"SYMBOL(init_top_pgt)={0xffffffff80000000 + r['root']:x}\n" in r["vmcoreinfo"]
    assert 0 < r["scan-requests"] <= r["scanned-pages"] <= (256 << 20) >> 12
    text = hmp(q, "info guest-kernel")
    assert text.startswith("release: 6.1.0-sevmon-builtin\r\n")
    assert f"page table root: 0x{r['root']:x} (init_top_pgt, 4-level paging)\r\n" in text
    assert text.endswith("KERNELOFFSET=0\r\n")
    # cached while the guest stays paused: asking again costs no round trip
    before = q.cmd("query-sev-debug-stats")["round-trips"]
    assert q.cmd("query-guest-kernel")["root"] == r["root"]
    assert q.cmd("query-sev-debug-stats")["round-trips"] == before
    # a reset forgets it: it is found again, through the firmware again
    q.cmd("system_reset")
    assert q.cmd("query-guest-kernel")["root"] == r["root"]
    assert q.cmd("query-sev-debug-stats")["round-trips"] > before
    q.close()


@pytest.mark.parametrize("sev", [["--sev"], ["--no-sev"]], ids=["sev", "plain"])
def test_raw_image_without_cpu_state_walks_the_kernels_tables(builtin_and_image, make_daemon, sev):
    paging, want, image = builtin_and_image
    q = qmp_connect(make_daemon("--raw", str(image), *sev, hmp=False))
    assert hmp(q, "info registers") == "CPU#0: registers not available: the raw image carries no vCPU state " \
                                       "(no --cpu-state)\r\n"
    # the same text at the same place (what the scan cost differs: the built-in guest's RAM is only the frames
    # it wrote, the image's is every frame)
    assert without_cost(hmp(q, "info guest-kernel")) == without_cost(want["info guest-kernel"])
    tlb = hmp(q, "info tlb")
    assert tlb == kernel_half(want["info tlb"]) and tlb.count("\r\n") > 3
    assert hmp(q, "info mem") == kernel_half(want["info mem"])
    for c in ("x /4xg 0xffffffff81000000", "gva2gpa 0xffffffff81201000"):
        assert hmp(q, c) == want[c]
    assert hmp(q, "x /2xg 0x400000") == ("Error: 0x400000 is a user address: it needs a process's page tables "
                                         "(CR3), and only the kernel's are known (the raw image carries no vCPU "
                                         "state (no --cpu-state))\r\n")
    assert hmp(q, "gva2gpa 0x400000").startswith("Error: 0x400000 is a user address")
    r = qmp(q, "memsave", val=0x400000, size=16, filename="/dev/null")
    assert r["error"]["desc"].startswith("0x400000 is a user address")
    assert qmp(q, "memsave", val=0xffffffff81000000 - (1 << 64), size=4096, filename="/dev/null") == {"return": {}}
    if sev == ["--sev"]:
        assert "private" in hmp(q, "info sev-mem")
        assert q.cmd("query-sev-debug-stats")["firmware-calls"] > 0
    q.close()


def test_raw_image_without_linux_says_the_tables_are_unknown(make_daemon, tmp_path):
    image = tmp_path / "ram.bin"
    image.write_bytes(b"OSRELEASE=not really\n".ljust(4096, b"\0") + bytes(0x3F000))
    q = qmp_connect(make_daemon("--raw", str(image), "--sev", hmp=False))
    unknown = ("the guest's page tables are unknown: the raw image carries no vCPU state (no --cpu-state), and no "
               "64-bit Linux kernel (VMCOREINFO) was found in its memory")
    for c in ("info mem", "info tlb", "x /2xg 0xffffffff81000000", "gva2gpa 0xffffffff81000000", "info sev-mem"):
        assert hmp(q, c) == f"Error: {unknown}\r\n", c
    assert qmp(q, "memsave", val=0xffffffff81000000 - (1 << 64), size=8, filename="/dev/null")["error"]["desc"] == unknown
    err = qmp(q, "query-guest-kernel")["error"]
    assert err == {"class": "GenericError", "desc": "no 64-bit Linux kernel was found in guest memory (no page "
                                                    "starts with a usable VMCOREINFO text)"}
    assert hmp(q, "xp /3cb 0") == "0000000000000000: 'O' 'S' 'R'\r\n"  # physical reads need no tables
    q.close()


def test_nodbg_refuses_discovery_as_every_read(builtin_and_image, make_daemon):
    _, _, image = builtin_and_image
    q = qmp_connect(make_daemon("--raw", str(image), "--sev", "--policy", "0x1", hmp=False))
    nodbg = "the SEV guest policy 0x1 forbids debug access (NODBG): guest memory cannot be decrypted"
    assert qmp(q, "query-guest-kernel")["error"]["desc"] == nodbg
    assert hmp(q, "info mem") == f"Error: {nodbg}\r\n"
    q.close()


# -- the parser and the scan, in process ------------------------------------------------------------------
TEXT = ("OSRELEASE=6.1.0-13-cloud-amd64\nPAGESIZE=4096\nSYMBOL(init_top_pgt)=ffffffff8d60a000\n"
        "NUMBER(pgtable_l5_enabled)=1\nNUMBER(phys_base)=-4096\nKERNELOFFSET=c000000\n")


def test_parse_takes_linuxs_formats():
    k = parse(TEXT, 0x1234000)
    assert (k.release, k.kaslr_offset, k.levels, k.gpa) == ("6.1.0-13-cloud-amd64", 0xC000000, 5, 0x1234000)
    assert k.phys_base == (1 << 64) - 4096            # %ld: negative numbers are addresses modulo 2^64
    assert k.root == 0xD60A000 - 4096


@pytest.mark.parametrize("text, why", [
    ("OSRELEASE=5.10\nSYMBOL(swapper_pg_dir)=c1a00000\n", "no SYMBOL(init_top_pgt)"),   # a 32-bit kernel
    ("OSRELEASE=6.1\nSYMBOL(init_top_pgt)=ffffffff8d60a000\n", "no NUMBER(phys_base)"),
    ("OSRELEASE=6.1\nSYMBOL(init_top_pgt)=zz\nNUMBER(phys_base)=0\n", "not hexadecimal"),
    ("OSRELEASE=6.1\nSYMBOL(init_top_pgt)=ffffffff8d60a008\nNUMBER(phys_base)=0\n", "not page-aligned"),
])
def test_parse_refuses_what_cannot_be_walked(text, why):
    with pytest.raises(VmcoreinfoError, match=why.replace("(", r"\(").replace(")", r"\)")):
        parse(text)


class Pages:
    """A PhysicalMemory of a few pages that counts requests."""

    def __init__(self, pages: dict[int, bytes]):
        self.pages, self.requests = pages, []

    def read_frames(self, pfns, fill=True):
        pfns = list(pfns)
        self.requests.append((pfns[0], len(pfns)))
        return {p: self.pages[p] for p in pfns if p in self.pages}


def test_scan_goes_up_in_batches_passes_over_unusable_texts_and_stops_at_the_first_usable_one():
    page = TEXT.encode().ljust(4096, b"\0")
    mem = Pages({3: b"OSRELEASE=junk\n".ljust(4096, b"\0"), 700: page, 900: page.replace(b"6.1.0", b"9.9.9")})
    k = find(mem, [(0, 1024)], batch_pages=512)
    assert k.gpa == 700 << 12 and k.release == "6.1.0-13-cloud-amd64"
    assert mem.requests == [(0, 512), (512, 512)]
    assert find(Pages({}), [(0, 10), (100, 3)]) is None


def test_gdb_stub_memory_walks_the_kernels_tables(builtin_and_image, make_daemon):
    """The gdb stub's ``m`` packets on a guest without CPU state: kernel addresses through init_top_pgt (the same
    bytes ``x`` shows), a user address refused (an error packet, nothing read)."""
    from tests.gdb.gdb_support import RspClient
    _, want, image = builtin_and_image
    d = make_daemon("--raw", str(image), "--sev", "--gdb", "unix:./gdb.sock", hmp=False)
    rsp = RspClient(d.qmp.replace("qmp.sock", "gdb.sock"))
    try:
        data = bytes.fromhex(rsp.ask("mffffffff81000000,20"))
        words = [int.from_bytes(data[i:i + 8], "little") for i in range(0, 32, 8)]
        x = want["x /4xg 0xffffffff81000000"]  # "ffffffff81000000: 0x... 0x...\r\n" twice
        assert words == [int(w, 16) for w in re.findall(r"0x([0-9a-f]{16})", x)]
        assert rsp.ask("m400000,8").startswith("E")
    finally:
        rsp.close()
