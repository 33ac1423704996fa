"""The C-bit map through a real daemon and qemu.qmp: ``info sev-mem``, ``query-sev-memory-map`` and
``sev-mem-map`` on the built-in SEV guest, on the QEMU 7.2 fixtures (as SEV guests and plain), on a guest image
built here to alias one frame, under NODBG, and what each costs in round trips."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
import xml.etree.ElementTree as ET

import pytest

from tests.conftest import FIXTURE_NAMES, FIXTURES, hmp, qmp_connect

SVG = "{http://www.w3.org/2000/svg}"
NOT_SEV = "the guest is not an SEV guest: no page has a C-bit"


def sev_map(q, **args) -> dict:
    return q.cmd("query-sev-memory-map", **args)


def frames(runs) -> set[int]:
    return {f for r in runs for f in range(r["gpa"] >> 12, (r["gpa"] + r["size"]) >> 12)}


def frames_line(m: dict, hole: str = "not RAM") -> str:
    """What info sev-mem's summary and the picture's title must say, from query-sev-memory-map's physical view:
    every mapped frame in one class (aliased > shared > private in RAM, a hole below the end of RAM, past it)."""
    phys = m["physical"]
    top = max(r["gpa"] + r["size"] for r in phys["ram"]) >> 12
    ram = frames(phys["ram"])
    aliased = frames(phys["aliased"]) & ram
    shared = frames(phys["shared"]) & ram - aliased
    private = frames(phys["private"]) & ram - aliased - shared
    mapped = frames(phys["private"]) | frames(phys["shared"])
    assert len(mapped) == m["mapped-frames"]
    past = {f for f in mapped if f >= top}
    holes = mapped - ram - past
    assert m["frames"] == {"private": len(private), "shared": len(shared), "aliased": len(aliased),
                           "not-ram": len(holes), "past-ram": len(past)}
    extra = "".join(f"; {len(n)} {what}" for n, what in ((holes, hole), (past, "past the end of RAM")) if n)
    return (f"frames mapped: {m['mapped-frames']} ({len(private)} private, {len(shared)} shared, "
            f"{len(aliased)} aliased{extra})")


def gva2gpa(q, va: int) -> int:
    return int(hmp(q, f"gva2gpa {va:#x}").split()[1], 16)


def test_builtin_guest_bounce_buffer_is_the_one_shared_page(make_daemon, tmp_path):
    q = qmp_connect(make_daemon("--no-workload", hmp=False))
    q.cmd("stop")
    m = sev_map(q, physical=True)
    shared = [r for r in m["ranges"] if r["attribute"] == "shared"]
    # found by its attribute, not its address: the bounce buffer, and its page of the direct map, which the
    # guest decrypted too (Linux's set_memory_decrypted), so the frame is not aliased
    assert [r["size"] for r in shared] == [4096, 4096]
    va = shared[-1]["start"]
    signed = va - (1 << 64) if va >> 63 else va                   # memsave's val is QAPI 'int'
    q.cmd("memsave", val=signed, size=4096, filename=str(tmp_path / "page"))   # read as its leaf says: shared
    assert (tmp_path / "page").read_bytes().startswith(b"shared (unencrypted) bounce buffer\0")
    gpa = gva2gpa(q, va)
    assert gva2gpa(q, shared[0]["start"]) == gpa
    assert all(r["attribute"] == "private" for r in m["ranges"] if r not in shared)
    # totals add up: per attribute over the ranges, and frames private + shared - aliased = mapped
    assert m["private-bytes"] == sum(r["size"] for r in m["ranges"] if r["attribute"] == "private")
    assert m["shared-bytes"] == 8192
    phys = m["physical"]
    assert frames(phys["shared"]) == {gpa >> 12}
    assert len(frames(phys["private"])) + 1 == m["mapped-frames"]
    assert m["aliases"] == [] and m["aliased-frames"] == 0
    # the same numbers as text
    text = hmp(q, "info sev-mem").split("\r\n")
    assert text[:len(m["ranges"])] == [
        f"{r['start']:016x}-{r['end']:016x} {r['size']:016x} {r['prot']} {r['attribute']}" for r in m["ranges"]]
    # info mem's ranges, split only where the C-bit changes: merged back, they are info mem's lines
    merged: list[list] = []
    for r in m["ranges"]:
        if merged and merged[-1][1] == r["start"] and merged[-1][2] == r["prot"]:
            merged[-1][1] = r["end"]
        else:
            merged.append([r["start"], r["end"], r["prot"]])
    assert [f"{a:016x}-{b:016x} {b - a:016x} {p}" for a, b, p in merged] == hmp(q, "info mem").split("\r\n")[:-1]
    # frames counted as the picture counts them: the direct map's 1 GiB maps 768 MiB past the 256 MiB of RAM
    line = frames_line(m)
    assert line == (f"frames mapped: {m['mapped-frames']} (65535 private, 1 shared, 0 aliased; "
                    f"{m['mapped-frames'] - 65536} past the end of RAM)")
    assert m["mapped-frames"] - 65536 >= (768 << 20) >> 12
    assert text[len(m["ranges"]):] == [
        f"private: {m['private-bytes']} bytes, shared: 8192 bytes, {line}", "0 aliased frames", ""]
    q.close()


def test_round_trips_cold_then_warm_after_info_tlb(make_daemon):
    """Cold, the map costs what a cold info tlb costs (the same tables); after info tlb it costs none."""
    def trips(q) -> int:
        return q.cmd("query-sev-debug-stats")["round-trips"]

    tlb = qmp_connect(make_daemon("--no-workload", hmp=False))
    tlb.cmd("stop")
    before = trips(tlb)
    hmp(tlb, "info tlb")
    cold_tlb = trips(tlb) - before
    q = qmp_connect(make_daemon("--no-workload", hmp=False))
    q.cmd("stop")
    before = trips(q)
    hmp(q, "info sev-mem")
    assert trips(q) - before == cold_tlb > 0
    hmp(q, "info tlb")                                           # warm
    warm = trips(q)
    hmp(q, "info sev-mem")
    sev_map(q, physical=True)
    hmp(q, "sev-mem-map /dev/null")
    assert trips(q) == warm
    tlb.close()
    q.close()


@pytest.mark.parametrize("guest", ["builtin", "alias"])
def test_svg_parses_has_a_legend_and_draws_the_map(make_daemon, tmp_path, guest):
    if guest == "alias":
        q = aliased_guest(make_daemon, tmp_path)
    else:
        q = qmp_connect(make_daemon("--no-workload", hmp=False))
        q.cmd("stop")
    out = tmp_path / "map.svg"
    assert hmp(q, f"sev-mem-map {out}") == ""
    m = sev_map(q, physical=True)["physical"]
    root = ET.parse(out).getroot()
    assert root.tag == SVG + "svg"
    texts = [t.text for t in root.iter(SVG + "text")]
    assert "legend:" in texts
    legend = [r.get("data-legend") for r in root.iter(SVG + "rect") if r.get("data-legend")]
    hole = "not in the image" if guest == "alias" else "not RAM"  # a raw image, or the built-in guest's RAM
    assert legend == [hole, "not mapped", "private", "shared", "aliased"]
    # the title says what info sev-mem's summary says, and the legend counts the same frames
    full = sev_map(q, physical=True)
    line = frames_line(full, hole)
    assert any(t.endswith(f"; {line}") for t in texts)
    assert line in hmp(q, "info sev-mem")
    drawn: dict[str, set[int]] = {}
    for r in root.iter(SVG + "rect"):
        if r.get("data-category"):
            gpa, size = int(r.get("data-gpa"), 16), int(r.get("data-size"), 16)
            drawn.setdefault(r.get("data-category"), set()).update(range(gpa >> 12, (gpa + size) >> 12))
    everything = set().union(*drawn.values())
    assert everything == set(range(len(everything)))             # [0, top) drawn once, no gaps
    assert sum(map(len, drawn.values())) == len(everything)      # and no frame in two categories
    ram = frames(m["ram"]) & everything
    aliased = frames(m["aliased"]) & ram
    shared = frames(m["shared"]) & ram - aliased
    private = frames(m["private"]) & ram - aliased - shared
    assert drawn.get("aliased", set()) == aliased and len(aliased) == (guest == "alias")
    assert len(shared) == (guest == "builtin")
    assert drawn.get("shared", set()) == shared
    assert drawn["private"] == private
    for cat, got in (("private", private), ("shared", shared), ("aliased", aliased)):
        n = len(got)
        assert any(t.startswith(f"{cat}: {n} frame{'' if n == 1 else 's'} (") for t in texts)
    assert drawn.get("not mapped", set()) == ram - private - shared - aliased
    assert drawn.get(hole, set()) == everything - ram
    # QMP twin: the same picture
    assert q.cmd("sev-mem-map", filename=str(tmp_path / "qmp.svg")) == {}
    assert (tmp_path / "qmp.svg").read_text() == out.read_text()
    q.close()


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixtures_as_sev_guests_are_all_private_and_plain_are_not_sev(make_daemon, tmp_path, name):
    d = FIXTURES / name
    args = ["--core", str(d / "core.elf"), "--cpu-state", str(d / "cpu.json")]
    q = qmp_connect(make_daemon(*args, "--sev", "--cbitpos", "47", "--policy", "0", hmp=False))
    m = sev_map(q, physical=True)
    assert m["ranges"] and all(r["attribute"] == "private" for r in m["ranges"])
    line = frames_line(m, "not in the image")
    assert m["shared-bytes"] == 0 and m["aliases"] == [] and m["physical"]["shared"] == []
    lines = hmp(q, "info sev-mem").split("\r\n")
    expected = json.loads((d / "hmp.json").read_text())["info mem"].split("\r\n")[:-1]
    assert lines[:len(expected)] == [f"{line} private" for line in expected]
    assert lines[len(expected):] == [f"private: {m['private-bytes']} bytes, shared: 0 bytes, {line}",
                                     "0 aliased frames", ""]
    if name == "linux-4level":  # the case a user met: 65509 frames mapped, but the sparse dump holds 120 of them
        assert line == "frames mapped: 65509 (120 private, 0 shared, 0 aliased; 65083 not in the image; " \
                       "306 past the end of RAM)"
        assert m["frames"] == {"private": 120, "shared": 0, "aliased": 0, "not-ram": 65083, "past-ram": 306}
    # the picture says the same: its title, and "not in the image" where the dump has no frame
    assert q.cmd("sev-mem-map", filename=str(tmp_path / "core.svg")) == {}
    root = ET.parse(tmp_path / "core.svg").getroot()
    assert any(t.text.endswith(f"; {line}") for t in root.iter(SVG + "text"))
    legend = [r.get("data-legend") for r in root.iter(SVG + "rect") if r.get("data-legend")]
    assert legend == ["not in the image", "not mapped", "private", "shared", "aliased"]
    q.close()
    plain = qmp_connect(make_daemon(*args, hmp=False))
    assert hmp(plain, "info sev-mem") == f"Error: {NOT_SEV}\r\n"
    assert plain.cmd_obj({"execute": "query-sev-memory-map"})["error"] == {"class": "GenericError",
                                                                            "desc": NOT_SEV}
    plain.close()


@pytest.mark.parametrize("args", [["--policy", "1"], ["--debug-policy", "off"]])
def test_refused_as_info_mem_is_without_debug(make_daemon, args, tmp_path):
    q = qmp_connect(make_daemon(*args, hmp=False))
    refusal = hmp(q, "info mem")
    assert refusal.startswith("Error: ") and refusal.count("\r\n") == 1
    assert hmp(q, "info sev-mem") == refusal
    assert hmp(q, f"sev-mem-map {tmp_path / 'x.svg'}") == refusal and not (tmp_path / "x.svg").exists()
    err = q.cmd_obj({"execute": "query-sev-memory-map", "arguments": {"cpu-index": 0}})["error"]
    assert "Error: " + err["desc"] + "\r\n" == refusal
    assert q.cmd("query-sev-debug-stats")["bytes-decrypted"] == 0
    q.close()


def test_bad_arguments_one_line(make_daemon):
    q = qmp_connect(make_daemon("--no-workload", hmp=False))
    assert q.cmd_obj({"execute": "query-sev-memory-map", "arguments": {"cpu-index": 1}})["error"]["desc"] == \
        "Parameter 'cpu-index' expects a CPU number"
    assert q.cmd_obj({"execute": "query-sev-memory-map", "arguments": {"physical": 1}})["error"]["desc"] == \
        "Invalid parameter type for 'physical', expected: boolean"
    assert hmp(q, "sev-mem-map") == ("sev-mem-map: filename expected\r\n"
                                     'Try "help sev-mem-map" for more information\r\n')
    assert hmp(q, "sev-mem-map /nonexistent/dir/map.svg") == \
        "Error: Could not open '/nonexistent/dir/map.svg': No such file or directory\r\n"
    q.close()


# -- a guest image made here: one frame mapped private at 0x400000 and shared at 0x401000 -----------------------
P, RW, US = 0x1, 0x2, 0x4
PT, FRAME = 0x4000, 0x10000


def alias_image(path) -> None:
    """Raw RAM: 4-level tables at 0x1000.., one PT mapping VA 0x400000 and 0x401000 to FRAME, 0x402000 to the
    next frame. ``--sev`` sets the C-bit in every entry at launch; the test then clears it in one."""
    ram = bytearray(1 << 20)

    def put(addr: int, entry: int) -> None:
        ram[addr:addr + 8] = struct.pack("<Q", entry)

    put(0x1000, 0x2000 | P | RW | US)
    put(0x2000, 0x3000 | P | RW | US)
    put(0x3000 + 2 * 8, PT | P | RW | US)
    for i, frame in enumerate((FRAME, FRAME, FRAME + 0x1000)):
        put(PT + 8 * i, frame | P | RW | US)
    ram[FRAME:FRAME + 16] = b"aliased frame!!\0"
    path.write_bytes(bytes(ram))


def aliased_guest(make_daemon, tmp_path):
    """The guest owner (all-zero TEK/TIK, no DH session) injects a launch secret that rewrites two PTEs: the
    first keeps its C-bit, the second loses it. Returns a client of the paused guest."""
    image, cpu = tmp_path / "ram.bin", tmp_path / "cpu.json"
    alias_image(image)
    cpu.write_text(json.dumps({"cr0": "0x80050033", "cr3": "0x1000", "cr4": "0x3406e0", "efer": "0xd01"}))
    q = qmp_connect(make_daemon("--raw", str(image), "--cpu-state", str(cpu), "--sev", "--cbitpos", "47", "-S",
                                hmp=False))
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    c = 1 << 47
    secret = struct.pack("<QQ", FRAME | c | P | RW | US, FRAME | P | RW | US)
    measure = base64.b64decode(q.cmd("query-sev-launch-measure")["data"])[:32]
    iv = bytes(range(16))
    wrapped = Cipher(algorithms.AES(bytes(16)), modes.CTR(iv)).encryptor().update(secret)
    mac = hmac.new(bytes(16), b"\x01" + struct.pack("<I", 0) + iv + struct.pack("<II", len(secret), len(wrapped))
                   + wrapped + measure, hashlib.sha256).digest()
    assert q.cmd("sev-inject-launch-secret", **{
        "packet-header": base64.b64encode(struct.pack("<I", 0) + iv + mac).decode(),
        "secret": base64.b64encode(wrapped).decode(), "gpa": PT}) == {}
    q.cmd("cont")
    q.cmd("stop")
    return q


def test_guest_image_aliasing_one_frame_reports_that_frame(make_daemon, tmp_path):
    """The map must report exactly FRAME, at 0x400000 (private) and 0x401000 (shared)."""
    q = aliased_guest(make_daemon, tmp_path)
    m = sev_map(q)
    assert [(r["start"], r["size"], r["attribute"]) for r in m["ranges"]] == [
        (0x400000, 0x1000, "private"), (0x401000, 0x1000, "shared"), (0x402000, 0x1000, "private")]
    assert m["aliases"] == [{"gpa": FRAME, "size": 4096, "private": [{"cpu-index": 0, "va": 0x400000}],
                             "shared": [{"cpu-index": 0, "va": 0x401000}]}]
    assert (m["mapped-frames"], m["aliased-frames"]) == (2, 1)
    assert hmp(q, "info sev-mem").split("\r\n")[-4:] == [
        "private: 8192 bytes, shared: 4096 bytes, frames mapped: 2 (1 private, 0 shared, 1 aliased)",
        f"aliased {FRAME:016x}-{FRAME + 0xfff:016x}: private cpu 0 0000000000400000, shared cpu 0 0000000000401000",
        "1 aliased frame", ""]
    # the two views really differ: plaintext through the private one, ciphertext through the shared one
    assert hmp(q, "x /2xg 0x400000") != hmp(q, "x /2xg 0x401000").replace("401000", "400000")
    q.close()
