"""``sevmon serve --libvirt DOMAIN [--connect URI]``: attach to a domain that libvirt runs.

libvirt holds QEMU's only monitor. libvirt's ``virt-qemu-qmp-proxy DOMAIN SOCKET`` (Debian's
``libvirt-clients-qemu``) serves a QMP socket for a running domain through libvirt's own
QEMU-monitor API (commands and events), so libvirt keeps its monitor and goes on managing the
domain; sevmon starts one proxy on a socket of its own and attaches there as to any proxy
(``--attach SOCKET --qemu-pid PID``). QEMU's process is the one libvirt started with the
domain's ``-uuid``; its RAM must be libvirt's memfd backing, shared, for sevmon to map it.

Everything libvirt can refuse is checked with ``virsh`` before the proxy starts (one
sentence each): libvirt unreachable, no such domain, domain not running, no shared memfd
backing (the sentence gives the XML to add).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from sevmon.attach.errors import AttachError

PROXY = "virt-qemu-qmp-proxy"
MEMFD_XML = ("<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>")
PROXY_START_TIMEOUT = 30.0


def _virsh(uri: str | None, *args: str) -> subprocess.CompletedProcess:
    virsh = shutil.which("virsh")
    if virsh is None:
        raise AttachError("virsh is not installed: --libvirt needs libvirt's clients (Debian: libvirt-clients, "
                          "libvirt-clients-qemu)")
    cmd = [virsh, "-q", *(["-c", uri] if uri else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)


def _virsh_error(p: subprocess.CompletedProcess) -> str:
    """virsh's own reason, one line: its last 'error: ...' line without the prefix."""
    lines = [ln.removeprefix("error: ").strip() for ln in p.stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else f"virsh exited {p.returncode}"


@dataclass
class Domain:
    name: str
    uuid: str
    uri: str | None


def find_domain(name: str, uri: str | None) -> Domain:
    """The running domain ``name`` at ``uri`` with a shared memfd RAM backing, or AttachError."""
    where = uri or "libvirt's default URI"
    p = _virsh(uri, "domstate", name)
    if p.returncode != 0:
        err = p.stderr
        if "failed to connect" in err or "Failed to connect" in err:
            raise AttachError(f"libvirt is unreachable at {where}: {_virsh_error(p)}")
        if "failed to get domain" in err or "Domain not found" in err:
            raise AttachError(f"no domain '{name}' at {where} (virsh list --all shows the domains)")
        raise AttachError(f"libvirt: {_virsh_error(p)}")
    state = p.stdout.strip()
    if state not in ("running", "paused"):
        raise AttachError(f"domain '{name}' is not running ({state}): start it with virsh start {name}")
    p = _virsh(uri, "dumpxml", name)
    if p.returncode != 0:
        raise AttachError(f"libvirt: {_virsh_error(p)}")
    root = ET.fromstring(p.stdout)
    backing = root.find("memoryBacking")
    source = backing.find("source") if backing is not None else None
    access = backing.find("access") if backing is not None else None
    if (source is None or source.get("type") != "memfd" or access is None
            or access.get("mode") != "shared"):
        raise AttachError(f"domain '{name}' keeps its RAM where sevmon cannot map it: add {MEMFD_XML} to its "
                          f"<domain> (virsh edit {name}) and restart it")
    return Domain(name, root.findtext("uuid", "").strip(), uri)


def qemu_pid_of(domain: Domain) -> int:
    """QEMU's process for ``domain``: libvirt starts it with ``-uuid UUID`` (same host, same pid namespace)."""
    want = domain.uuid.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        for i, arg in enumerate(argv[:-1]):
            if arg == b"-uuid" and argv[i + 1] == want:
                return int(entry)
    raise AttachError(f"domain '{domain.name}' runs in no QEMU process on this host (libvirt at "
                      f"{domain.uri or 'its default URI'} is remote?): sevmon must run where QEMU does")


def _proxy_python(proxy: str) -> str:
    """The proxy needs libvirt's Python binding (python3-libvirt, for the system Python): run it with
    sevmon's own Python when that has the binding, else with the Python its '#!' names, not a venv's."""
    if importlib.util.find_spec("libvirt") is not None:
        return sys.executable
    return "/usr/bin/python3"


class Proxy:
    """One ``virt-qemu-qmp-proxy`` of sevmon's own, on a socket in a private directory."""

    def __init__(self, domain: Domain):
        path = shutil.which(PROXY)
        if path is None:
            raise AttachError(f"{PROXY} is not installed: --libvirt needs it (Debian: libvirt-clients-qemu, "
                              "python3-libvirt)")
        self.dir = tempfile.mkdtemp(prefix="sevmon-libvirt-")
        self.socket = os.path.join(self.dir, "qmp.sock")
        cmd = [_proxy_python(path), path, *(["--connect", domain.uri] if domain.uri else []), domain.name,
               self.socket]
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + PROXY_START_TIMEOUT
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                said = " ".join(self.log.read().split()) or f"exit status {self.proc.returncode}"
                self.close()
                raise AttachError(f"libvirt's QMP proxy for domain '{domain.name}' did not start: {said}")
            time.sleep(0.02)

    def close(self) -> None:
        """End the proxy (libvirt keeps the domain and its monitor) and remove its socket."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.socket)
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)


def open_libvirt(name: str, uri: str | None) -> tuple[Proxy, int]:
    """Check the domain, start the proxy: (the proxy, QEMU's pid)."""
    domain = find_domain(name, uri)
    pid = qemu_pid_of(domain)
    return Proxy(domain), pid
