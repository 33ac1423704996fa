"""Replay every request of the real QEMU 7.2 QMP transcripts and compare replies.

The daemon opens the same guest QEMU ran (the fixture core, no SEV), so almost every
reply must equal QEMU's exactly (parsed JSON). Only replies that name the program itself
are checked for shape: query-version (sevmon's package string), query-commands and HMP
help (sevmon implements a subset of QEMU's commands).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import FIXTURE_NAMES, FIXTURES, RawClient


def _shape_only(send: str, want: dict) -> bool:
    """Replies that name the program: version info, the command list, HMP help text."""
    ret = want.get("return")
    if isinstance(ret, dict) and "qemu" in ret:
        return True
    if isinstance(ret, list) and ret and "name" in ret[0]:
        return True
    return '"command-line": "help' in send


def _check_shape(send: str, got: dict, want: dict) -> None:
    assert set(got) == set(want), (send, got)
    ret = want["return"]
    if isinstance(ret, dict):
        assert got["return"]["qemu"] == want["return"]["qemu"]
        assert isinstance(got["return"]["package"], str)
    elif isinstance(ret, list):
        names = [c["name"] for c in got["return"]]
        assert {"qmp_capabilities", "query-commands", "human-monitor-command", "query-sev"} <= set(names)
        sevmon_own = {"query-sev-debug-stats", "query-sev-memory-map", "sev-mem-map", "query-guest-kernel",
                      "read-guest-physical"}
        assert set(names) <= {c["name"] for c in want["return"]} | sevmon_own
    else:  # HMP help text: QEMU's "name params -- text" lines
        lines = got["return"].split("\r\n")
        assert lines[-1] == ""
        for line in lines[:-1]:
            assert " -- " in line or line.startswith(("\t", "[")), line
        want_lines = set(want["return"].split("\r\n"))
        shared = [ln for ln in lines[:-1] if ln.split(" ")[0] in {w.split(" ")[0] for w in want_lines}]
        assert shared, "no help line in common with QEMU's"


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_replay_transcript(make_daemon, name):
    fx = FIXTURES / name
    transcript = json.loads((fx / "qmp-transcript.json").read_text())
    d = make_daemon("--core", str(fx / "core.elf"), "--cpu-state", str(fx / "cpu.json"), "--no-sev", hmp=False)
    c = RawClient(d.qmp)
    greeting = transcript[0]["greeting"]
    assert c.greeting["QMP"]["version"]["qemu"] == greeting["QMP"]["version"]["qemu"]
    assert c.greeting["QMP"]["capabilities"] == greeting["QMP"]["capabilities"]
    negotiated = False
    exact = 0
    for entry in transcript[1:]:
        send, want = entry["send"], entry["recv"]
        already = any(r.get("error", {}).get("desc", "").startswith("Capabilities negotiation is already")
                      for r in want)
        if already and not negotiated:  # the capture negotiated here (not recorded)
            c.negotiate()
            negotiated = True
        c.send(send)
        got = [c.recv() for _ in want]
        for g, w in zip(got, want, strict=True):
            if _shape_only(send, w):
                _check_shape(send, g, w)
            else:
                assert g == w, send
                exact += 1
    assert exact >= 35
