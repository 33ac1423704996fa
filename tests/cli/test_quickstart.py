"""The README's quick start, as a newcomer runs it in the fresh venv CI made with
`pip install -e '.[test]'`: `sevmon serve` with no options, then a tour command."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def console_script(name: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    return [str(exe)] if exe.exists() else [shutil.which(name) or name]


def test_quick_start_serve_then_shell_tour(tmp_path):
    serve = subprocess.Popen(console_script("sevmon") + ["serve"], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        sock = tmp_path / "sevmon-qmp.sock"
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            assert serve.poll() is None, serve.stdout.read()
            time.sleep(0.05)
        out = subprocess.run(console_script("sevmon") + ["shell", str(sock), "-c", "info kvm", "-c", "info sev"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "kvm support: enabled\nmemory encryption: enabled\n" in out.stdout
        assert "state: running" in out.stdout and "debug: on" in out.stdout
    finally:
        serve.send_signal(signal.SIGINT)
        serve.wait(15)
    assert serve.returncode == 0
    assert "listening" in serve.stdout.read()
    assert not os.path.exists(tmp_path / "sevmon-qmp.sock")
