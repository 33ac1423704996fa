"""Build the live-test guest once and cache it: a Debian cloud kernel and a busybox initramfs.

    python tests/live/build_guest.py          # prints the cache directory
    SEVMON_GUEST_DIR=/some/dir python tests/live/build_guest.py

The kernel is Debian's ``linux-image-*-cloud-amd64`` (the package the
``linux-image-cloud-amd64`` metapackage depends on), fetched with ``apt-get download`` and
unpacked with ``dpkg-deb -x``; the initramfs (cpio newc, gzip) holds busybox-static and an
``/init`` that mounts proc/sys, starts a few processes (so user page tables exist), then
prints ``READY_MARKER`` on the serial console once they have all exec'd. A second run finds
the files and does nothing (the initramfs is rebuilt when ``INIT`` changed). Needs: apt-get,
dpkg-deb, cpio, gzip, /bin/busybox (package busybox-static).

It also caches the kernel's debug vmlinux for crash and drgn: Debian's
``linux-image-<release>-dbg`` of exactly the kernel's Debian version (read from the bzImage's
own version string, so a cached kernel never meets the symbols of a newer one). The package is
about 280 MB; only ``usr/lib/debug/boot/vmlinux-<release>`` is kept.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

READY_MARKER = "SEVMON-GUEST-READY"
KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "/bin/busybox"

INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
# a few processes with user mappings of their own
sleep 100000 &
a=$!
sh -c 'while :; do sleep 1; done' &
b=$!
cat /dev/zero > /dev/null &
c=$!
# ready only once each of them has exec'd: a child is named "init" (this script's name) until then, and the tests
# pause the guest at the marker and look for these processes by name
for p in $a $b $c; do
    while [ "$(cat /proc/$p/comm)" = init ]; do sleep 0.05; done
done
echo {READY_MARKER}
exec sh -c 'while :; do sleep 3600; done'
"""


def cache_dir() -> Path:
    env = os.environ.get("SEVMON_GUEST_DIR")
    return Path(env) if env else Path.home() / ".cache" / "sevmon" / "guest"


def guest_files(directory: Path | None = None) -> tuple[Path, Path]:
    """(kernel, initrd) paths in the cache (they may not exist yet)."""
    d = directory or cache_dir()
    return d / "vmlinuz", d / "initrd.gz"


def kernel_version(vmlinuz: Path) -> tuple[str, str]:
    """(release, Debian version) of a bzImage, from the version string its setup header points at.

    The boot protocol's ``kernel_version`` field (offset 0x20e) holds the string's offset minus
    0x200; the string reads ``6.1.0-57-cloud-amd64 (debian-kernel@...) #1 SMP ... Debian 6.1.192-3 ...``.
    """
    data = vmlinuz.read_bytes()
    at = int.from_bytes(data[0x20E:0x210], "little") + 0x200
    text = data[at:at + 256].split(b"\0", 1)[0].decode("ascii", "replace")
    m = re.match(r"(\S+) .* Debian (\S+)", text)
    if m is None:
        raise SystemExit(f"{vmlinuz}: no Debian kernel version string ({text!r})")
    return m.group(1), m.group(2)


def debug_vmlinux_file(directory: Path | None = None) -> Path:
    """Where the cached kernel's debug vmlinux is (it may not exist yet)."""
    d = directory or cache_dir()
    release, _ = kernel_version(guest_files(d)[0])
    return d / f"vmlinux-{release}"


def build_debug_vmlinux(vmlinuz: Path, dest: Path) -> None:
    release, version = kernel_version(vmlinuz)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "-q", f"linux-image-{release}-dbg={version}"], check=True,
                       cwd=tmp)
        deb = glob.glob(os.path.join(tmp, "*.deb"))[0]
        member = f"./usr/lib/debug/boot/vmlinux-{release}"
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", tmp, member], stdin=tar.stdout, check=True)
        if tar.wait() != 0:
            raise SystemExit(f"dpkg-deb --fsys-tarfile {deb} failed")
        shutil.move(os.path.join(tmp, member), str(dest) + ".part")
        os.replace(str(dest) + ".part", dest)


def _kernel_package() -> str:
    out = subprocess.run(["apt-cache", "depends", KERNEL_META], check=True, capture_output=True,
                         text=True).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split()[-1]
    raise SystemExit(f"cannot resolve {KERNEL_META} (apt-get update?)")


def build_kernel(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "-q", _kernel_package()], check=True, cwd=tmp)
        deb = glob.glob(os.path.join(tmp, "*.deb"))[0]
        subprocess.run(["dpkg-deb", "-x", deb, os.path.join(tmp, "x")], check=True)
        vmlinuz = glob.glob(os.path.join(tmp, "x", "boot", "vmlinuz-*"))[0]
        shutil.copyfile(vmlinuz, str(dest) + ".part")
        os.replace(str(dest) + ".part", dest)


def build_initrd(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        for d in ("bin", "proc", "sys", "dev", "tmp"):
            (root / d).mkdir(parents=True)
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
        files = subprocess.run(["find", "."], cwd=root, check=True, capture_output=True).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=root, input=files,
                              check=True, capture_output=True).stdout
        gz = subprocess.run(["gzip", "-9n"], input=cpio, check=True, capture_output=True).stdout
        Path(str(dest) + ".part").write_bytes(gz)
        os.replace(str(dest) + ".part", dest)


def build(directory: Path | None = None) -> tuple[Path, Path]:
    kernel, initrd = guest_files(directory)
    kernel.parent.mkdir(parents=True, exist_ok=True)
    if not kernel.exists():
        build_kernel(kernel)
    stamp = initrd.with_name(initrd.name + ".init")  # the /init the cached initramfs holds: rebuilt when it changes
    if not initrd.exists() or not stamp.exists() or stamp.read_text() != INIT:
        build_initrd(initrd)
        stamp.write_text(INIT)
    vmlinux = debug_vmlinux_file(directory)
    if not vmlinux.exists():
        build_debug_vmlinux(kernel, vmlinux)
    return kernel, initrd


if __name__ == "__main__":
    k, i = build(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(k.parent)
