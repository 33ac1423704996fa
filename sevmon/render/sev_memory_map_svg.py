"""The C-bit map as a picture: the guest-physical address space as a grid of rows, each frame coloured
private / shared / aliased / not mapped / not RAM, with GiB/MiB labels and a legend.

A frame below the end of RAM that is not RAM is drawn "not RAM" (a device, the PCI hole) or, for a core or a
raw image, "not in the image" (a sparse dump leaves out what it did not save). Mappings past the end of RAM are
not drawn; the title counts them, with the mapped frames of each colour, in the words and numbers of ``info
sev-mem``'s summary line.

The row span is a power of two chosen so a guest of 16 MiB to 64 GiB fills at most 64 rows of 1024 px (16 MiB:
256 KiB rows, 64 GiB: 1 GiB rows). Narrow mapped extents are widened (private to one pixel, shared and
aliased to three) so a single 4 KiB page stays visible on a 64 GiB guest; each rectangle carries its exact extent (``data-gpa``,
``data-size``, ``data-category``) and a tooltip, so the picture can be checked against the map.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence

import drawsvg as draw

from sevmon.x86.sev_memory_map import SevMemoryMap, frames_text

__all__ = ["CATEGORIES", "classify", "render_svg", "size_label"]

#: drawing order (background first) and colour of each category
CATEGORIES = {
    "not RAM": "#ffffff",
    "not mapped": "#d0d0d0",
    "private": "#2f6db3",
    "shared": "#f59f00",
    "aliased": "#d62728",
}
_KIB, _MIB, _GIB = 1 << 10, 1 << 20, 1 << 30
_ROW_W, _ROW_H, _PITCH, _LEFT, _TOP = 1024, 12, 16, 86, 58
_MAX_ROWS = 64
#: narrow mapped extents are widened to stay visible; shared and aliased ones are what a reader looks for
_MIN_WIDTH = {"private": 1.0, "shared": 3.0, "aliased": 3.0}
MAX_EXACT_SEGMENTS = 8192   #: beyond this many extents, draw pixel runs instead


def size_label(n: int) -> str:
    """``3 GiB``, ``256 MiB``, ``12.5 MiB``, ``254.70 MiB``: the largest unit, quarters exact, else 2 decimals."""
    for unit, name in ((_GIB, "GiB"), (_MIB, "MiB"), (_KIB, "KiB")):
        if n >= unit:
            return f"{n / unit:g} {name}" if n % (unit // 4) == 0 else f"{n / unit:.2f} {name}"
    return f"{n} B" if n else "0"


def _contains(ranges: Sequence[tuple[int, int]], starts: list[int], addr: int) -> bool:
    i = bisect.bisect_right(starts, addr) - 1
    return i >= 0 and addr < ranges[i][0] + ranges[i][1]


def categories(hole: str = "not RAM") -> dict[str, str]:
    """Drawing order and colour of each category, the first named ``hole`` ("not RAM" or "not in the image")."""
    return {hole if k == "not RAM" else k: v for k, v in CATEGORIES.items()}


def classify(m: SevMemoryMap, ram: Sequence[tuple[int, int]], top: int,
             hole: str = "not RAM") -> list[tuple[int, int, str]]:
    """``[0, top)`` as ``(gpa, size, category)`` runs: ``hole`` wins, then aliased > shared > private > not mapped.

    ``ram`` is the guest's RAM (or an image's frames) as sorted ``(gpa, size)`` runs; a mapping of something that
    is not RAM (a device, a frame the image lacks) is drawn as ``hole``.
    """
    lists = {"ram": list(ram), "aliased": m.aliased, "shared": m.shared, "private": m.private}
    starts = {k: [g for g, _s in v] for k, v in lists.items()}
    cuts = {0, top}
    for v in lists.values():
        for g, s in v:
            cuts.update(x for x in (g, g + s) if 0 < x < top)
    points = sorted(cuts)
    out: list[tuple[int, int, str]] = []
    for a, b in zip(points, points[1:], strict=False):
        if not _contains(lists["ram"], starts["ram"], a):
            cat = hole
        else:
            cat = next((k for k in ("aliased", "shared", "private") if _contains(lists[k], starts[k], a)),
                       "not mapped")
        if out and out[-1][2] == cat and out[-1][0] + out[-1][1] == a:
            out[-1] = (out[-1][0], b - out[-1][0], cat)
        else:
            out.append((a, b - a, cat))
    return out


def _pixel_runs(segments: list[tuple[int, int, str]], span: int, top: int,
                names: list[str]) -> list[tuple[int, int, str]]:
    """A map too fragmented to draw extent by extent (the picture would weigh megabytes), as runs of whole
    pixels; each pixel takes the highest category in it, so a lone shared or aliased page still shows."""
    px = span // _ROW_W                           # bytes per pixel (span is a power of two >= 256 KiB)
    grid = bytearray(-(-top // px))
    for gpa, size, cat in segments:
        rank = names.index(cat)
        a, b = gpa // px, -(-(gpa + size) // px)
        for i in {a, b - 1}:                      # edge pixels may hold other extents too
            grid[i] = max(grid[i], rank)
        if b - a > 2:                             # inner pixels are this extent's alone (extents are disjoint)
            grid[a + 1:b - 1] = bytes([rank]) * (b - a - 2)
    out: list[tuple[int, int, str]] = []
    for run in re.finditer(rb"(.)\1*", bytes(grid), re.S):
        out.append((run.start() * px, min(run.end() * px, top) - run.start() * px, names[run.group()[0]]))
    return out


def row_span(top: int) -> int:
    span = 256 * _KIB
    while span * _MAX_ROWS < top:
        span *= 2
    return span


def render_svg(m: SevMemoryMap, ram: Sequence[tuple[int, int]], top: int, hole: str = "not RAM") -> str:
    """The SVG document (text) of the guest-physical space ``[0, top)``."""
    top = max(top, 4096)
    span = row_span(top)
    rows = -(-top // span)
    cats = categories(hole)
    segments = classify(m, ram, top, hole)
    counts = m.frame_counts(sorted(ram), top)
    frames = {"private": counts.private, "shared": counts.shared, "aliased": counts.aliased}
    totals = dict.fromkeys(cats, 0)
    for _g, s, cat in segments:
        totals[cat] += s
    legend_y = _TOP + rows * _PITCH + 14
    d = draw.Drawing(_LEFT + _ROW_W + 24, legend_y + 40, font_family="sans-serif")
    d.append(draw.Rectangle(0, 0, _LEFT + _ROW_W + 24, legend_y + 40, fill="#ffffff"))
    d.append(draw.Text(f"Guest-physical memory by C-bit: {size_label(top)}, one row = {size_label(span)}; "
                       f"{frames_text(m, counts, hole)}", 13, _LEFT - 70, 20, font_weight="bold"))
    for q in range(5):   # offsets within a row
        x = _LEFT + _ROW_W * q / 4
        d.append(draw.Line(x, _TOP - 6, x, _TOP - 2, stroke="#444444"))
        d.append(draw.Text("+" + size_label(span * q // 4), 10, x, _TOP - 10, text_anchor="middle"))
    if len(segments) > MAX_EXACT_SEGMENTS:
        segments = _pixel_runs(segments, span, top, list(cats))
        d.append(draw.Text(f"{len(segments)} extents drawn to the pixel ({size_label(span // _ROW_W)}): "
                           "a pixel takes the colour of the highest category in it (aliased > shared > private)",
                           10, _LEFT, 36))
    for cat in cats:   # background categories first, so small mapped extents stay on top
        for gpa, size, c in segments:
            if c != cat:
                continue
            pos, end = gpa, gpa + size
            while pos < end:
                r = pos // span
                piece_end = min(end, (r + 1) * span)
                x = _LEFT + _ROW_W * (pos - r * span) / span
                w = _ROW_W * (piece_end - pos) / span
                if cat in _MIN_WIDTH:
                    w = max(w, _MIN_WIDTH[cat])
                rect = draw.Rectangle(round(x, 3), _TOP + r * _PITCH, round(w, 3), _ROW_H, fill=cats[cat],
                                      data_category=cat, data_gpa=f"{pos:#x}", data_size=f"{piece_end - pos:#x}")
                rect.append_title(f"{pos:#x}-{piece_end - 1:#x} {cat} ({size_label(piece_end - pos)})")
                d.append(rect)
                pos = piece_end
    for r in range(rows):   # row labels and outlines last: on top of the extents
        y = _TOP + r * _PITCH
        d.append(draw.Text(size_label(r * span), 10, _LEFT - 6, y + _ROW_H - 2, text_anchor="end"))
        width = _ROW_W * min(span, top - r * span) / span
        d.append(draw.Rectangle(_LEFT, y, width, _ROW_H, fill="none", stroke="#888888", stroke_width=0.5))
    d.append(draw.Text("legend:", 12, _LEFT - 70, legend_y + 12))
    x = _LEFT
    for cat, colour in cats.items():
        d.append(draw.Rectangle(x, legend_y, 14, 14, fill=colour, stroke="#444444", stroke_width=0.5,
                                data_legend=cat))
        label = f"{cat}: {frames[cat]} frame{'' if frames[cat] == 1 else 's'} ({size_label(totals[cat])})" if cat in frames else \
            f"{cat} ({size_label(totals[cat])})"
        d.append(draw.Text(label, 12, x + 20, legend_y + 12))
        x += 34 + 7 * len(label)
    return d.as_svg()
